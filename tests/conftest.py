"""Suite-wide fixtures and markers.

Tests that need root, /dev/fuse or kernel mounts are marked `root`; they are skipped where the
machine cannot run them, so a quick `pytest -m "not slow"` stays quick anywhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

VECTORS_DIR = Path(
    os.environ.get("LAZYFS_VECTORS")
    or Path(__file__).resolve().parents[2] / "shared" / "vectors"
)


def _can_mount() -> str | None:
    """Return why kernel/FUSE tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "needs fusermount3 (fuse3)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _can_mount()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def private_disk_cache(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets a disk cache of its own (mounts use one by default): none writes into
    the machine's, and no test sees what another left there."""
    directory = tmp_path_factory.mktemp("disk-cache")
    monkeypatch.setenv("LAZYFS_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The containerd-written test vectors, used in place; skip when they are absent, except in
    CI (CI=true), where a test that silently skipped would hide a broken checkout."""
    if not VECTORS_DIR.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"containerd vectors not found at {VECTORS_DIR} (CI=true: they must "
                        "be there)")
        pytest.skip(f"containerd vectors not found at {VECTORS_DIR}")
    return VECTORS_DIR
