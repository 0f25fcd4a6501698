"""What the snapshotter and CRI test packages share: a short work directory, the registry
with the app image, and the tails of containerd's and the snapshotter's logs in the report of
a test that failed (so that CI shows why)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.registry import Registry, running_registry
from tests.support.registry_images import PublishedImage
from tests.support.snapshotter_images import publish_app_image

LOG_TAIL_BYTES = 12_000


def short_work_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory under /tmp: containerd's socket paths must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(scope="package", name="registry")
def registry_fixture(work: Path) -> Iterator[Registry]:
    with running_registry(work / "registry") as server:
        yield server


@pytest.fixture(scope="package", name="image")
def image_fixture(work: Path, registry: Registry) -> PublishedImage:
    return publish_app_image(work, registry)


def log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"({exc})"
    return data[-LOG_TAIL_BYTES:].decode(errors="replace")


def add_logs(report: pytest.TestReport, containerd: Containerd) -> None:
    """The tails of `containerd`'s log and its snapshotter's, as sections of `report`."""
    report.sections.append((f"containerd log ({report.when})", log_tail(containerd.log)))
    report.sections.append((f"lazyfs snapshotter log ({report.when})",
                            log_tail(containerd.snapshotter.log)))
