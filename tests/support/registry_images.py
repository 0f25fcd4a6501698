"""Converted test images in a local docker-registry, and checks that nothing stayed mounted.

The busybox image of tests/support/images.py is pushed with skopeo as `test/busybox:v1` and
converted with `lazyfs convert REF --push REF2` into `test/busybox:v1-erofs`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.images import busybox_layers, skopeo_push, write_oci_image
from tests.support.mounts import cleanup, mounts_below
from tests.support.registry import Registry, running_registry

REPO = Path(__file__).resolve().parents[2]
ORIGINAL = "test/busybox:v1"
CONVERTED = "test/busybox:v1-erofs"


@dataclass(frozen=True)
class PublishedImage:
    """An image in a registry: the original tag, the converted one, its uncompressed layers."""

    host: str
    original: str
    converted: str
    layers: list[bytes]


def lazyfs_command(*args: str, env: dict[str, str] | None = None,
                   timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazyfs", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def convert_push(source: str, target: str, *options: str) -> str:
    """`lazyfs convert SOURCE --push TARGET` (plain HTTP); returns the new digest."""
    result = lazyfs_command("convert", source, "--push", target, "--insecure-registry",
                            "--reproducible", *options)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def publish(work: Path, host: str, *, layers: list[bytes] | None = None,
            repository: str = "test/busybox", creds: str | None = None) -> PublishedImage:
    """Build an image (the busybox one by default), push it to `host` and convert it there."""
    layers = layers if layers is not None else busybox_layers()
    image = write_oci_image(work / repository.replace("/", "-"), "v1", layers)
    original, converted = f"{host}/{repository}:v1", f"{host}/{repository}:v1-erofs"
    skopeo_push(image.layout, "v1", host, f"{repository}:v1", creds=creds)
    convert_push(original, converted, *(["--creds", creds] if creds else []))
    return PublishedImage(host, original, converted, layers)


def loop_devices_below(path: Path) -> list[str]:
    """Lines of `losetup -a` whose backing file lies below `path`."""
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    return [line for line in listing.stdout.splitlines() if str(path) in line]


def assert_nothing_left(*paths: Path) -> None:
    """No mount at or below any of `paths` (from /proc/self/mountinfo), no loop device backed
    by a file below them."""
    for path in paths:
        assert mounts_below(path) == [], path
        assert loop_devices_below(path) == [], path


# Module-scoped fixtures a test module takes by binding them to its own names
# (`registry = registry_images.registry`): a registry of its own, and the busybox image
# published and converted there.
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture(scope="module")
def busybox(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> PublishedImage:
    return publish(tmp_path_factory.mktemp("busybox"), registry.host)


class PrivateCommand:
    """A `lazyfs COMMAND` with a private state directory and TMPDIR, both checked and
    cleaned: no mounts, loop devices, records, scratch directories or daemon logs left."""

    def __init__(self, tmp_path: Path, command: str, timeout_s: float) -> None:
        self.command = command
        self.timeout_s = timeout_s
        self.state_dir = tmp_path / "state"
        self.tmp_dir = tmp_path / "tmp"
        self.tmp_dir.mkdir()
        self.env = {**os.environ, "LAZYFS_STATE_DIR": str(self.state_dir),
                    "TMPDIR": str(self.tmp_dir)}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lazyfs", self.command, *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=self.timeout_s, check=False)

    def assert_clean(self) -> None:
        assert_nothing_left(self.tmp_dir, self.state_dir)
        assert os.listdir(self.tmp_dir) == []
        assert not self.state_dir.exists() or os.listdir(self.state_dir) == []


@contextlib.contextmanager
def private_command(tmp_path: Path, command: str, timeout_s: float) -> Iterator[PrivateCommand]:
    """A `PrivateCommand`; whatever it left mounted or attached is cleaned up afterwards,
    also when the test fails."""
    tool = PrivateCommand(tmp_path, command, timeout_s)
    try:
        yield tool
    finally:
        cleanup(backing_prefixes=[tool.tmp_dir, tool.state_dir])

