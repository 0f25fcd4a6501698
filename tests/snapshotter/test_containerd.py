"""The snapshotter under Debian's containerd, running real containers with runc: ordinary
gzip images, lazily mounted seekable EROFS images, restarts, concurrency and bad inputs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse.registry_images import PublishedImage, publish
from tests.support.containerd import Containerd, running_containerd
from tests.support.registry import Registry, running_registry

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

# Reads a file of each layer, and files the second layer removed (whiteout, opaque dir).
SHOW = (
    "cat /etc/hostname /etc/passwd; ls /var/cache/app; "
    "test -e /etc/os-release && echo os-release-visible; test -e /var/log && echo log-visible; "
    "echo end"
)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    # Short: containerd's socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="lzc-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def registry(work: Path) -> Iterator[Registry]:
    with running_registry(work / "registry") as server:
        yield server


@pytest.fixture(scope="module")
def image(work: Path, registry: Registry) -> PublishedImage:
    return publish(work / "images", registry.host)


@pytest.fixture
def containerd(work: Path, registry: Registry, request: pytest.FixtureRequest
               ) -> Iterator[Containerd]:
    with running_containerd(work / f"c{request.node.name[-12:]}") as running:
        yield running


def check_output(stdout: str) -> None:
    assert stdout.splitlines()[0] == "changed"  # the top layer's /etc/hostname
    assert "root:x:0:0" in stdout  # the base layer's /etc/passwd
    assert "fresh.txt" in stdout and "a.bin" not in stdout  # opaque directory
    assert "os-release-visible" not in stdout and "log-visible" not in stdout  # whiteouts
    assert stdout.rstrip().endswith("end")


def test_ordinary_gzip_image_runs(containerd: Containerd, image: PublishedImage) -> None:
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "lazyfs", image.original)
    result = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.original, "gz1",
                            "/bin/sh", "-c", SHOW)
    check_output(result.stdout)
    # Its two layers are ordinary committed snapshots of ours.
    listing = containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout
    assert listing.count("Committed") == 2
