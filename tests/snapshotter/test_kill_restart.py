"""A snapshotter killed with SIGKILL (or stopped with SIGTERM) under a running container, and
started again: the container's reads fail while no snapshotter runs (EIO; what the page cache
holds stays readable), and read the right bytes again once the new snapshotter has taken over
its layers' loop devices (`lazyfs/snapshotter/adopt.py`). Nothing stale stays mounted."""

from __future__ import annotations

import io
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.lazyfs_cli import wait_until
from tests.support.mounts import mounts_below
from tests.support.registry_images import PublishedImage
from tests.support.snapshotter_images import (
    SHOW,
    check_output,
    erofs_mounts,
    layer_stats,
    lazy_pull,
)

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

MIB = 1 << 20
PIECE_BYTES = 4096
READ_WAIT_S = 30.0
# The container reads one 4 KiB piece of /opt/big.bin (8 MiB, never read before) each time
# the test asks (/out/goN holds the piece's index in 4 KiB blocks): a megabyte apart, no
# piece is in a page cache or a readahead window of the one before. It records dd's exit
# status last, so that the test knows the piece is complete.
READER = (
    "n=0; while :; do "
    "if [ -e /out/go$n ]; then read block < /out/go$n; "
    "/bin/busybox dd if=/opt/big.bin of=/out/data$n bs=4096 count=1 skip=$block "
    "2>/out/err$n; echo $? > /out/rc$n; n=$((n+1)); "
    "else /bin/busybox usleep 20000; fi; done"
)


def big_file(image: PublishedImage) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(image.layers[1])) as tar:
        member = tar.extractfile("opt/big.bin")
        assert member is not None
        return member.read()


class Reader:
    """The test's side of READER: ask for a piece, wait for the container's answer."""

    def __init__(self, out: Path, expected: bytes) -> None:
        self.out = out
        self.expected = expected
        self.count = 0

    def read(self, offset: int) -> tuple[int, bytes, str, float]:
        """(dd's exit status, the bytes, dd's stderr, seconds) of the piece at `offset`."""
        n, self.count = self.count, self.count + 1
        started = time.monotonic()
        (self.out / f"go{n}.tmp").write_text(f"{offset // PIECE_BYTES}\n")
        (self.out / f"go{n}.tmp").rename(self.out / f"go{n}")
        rc = self.out / f"rc{n}"
        wait_until(lambda: rc.exists() and rc.read_text().endswith("\n"),
                   f"the container's read {n}", READ_WAIT_S)
        data = (self.out / f"data{n}").read_bytes() if (self.out / f"data{n}").exists() else b""
        return (int(rc.read_text()), data, (self.out / f"err{n}").read_text().strip(),
                time.monotonic() - started)

    def assert_reads(self, offset: int) -> float:
        status, data, error, seconds = self.read(offset)
        assert status == 0, error
        assert data == self.expected[offset:offset + PIECE_BYTES]
        return seconds


def stop_snapshotter(containerd: Containerd, signum: signal.Signals) -> None:
    proc = containerd.snapshotter.proc
    assert proc is not None
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == (-signum if signum == signal.SIGKILL else 0)
    containerd.snapshotter.proc = None


@pytest.fixture
def reader(containerd: Containerd, image: PublishedImage) -> Iterator[Reader]:
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    out = containerd.work / "out"
    out.mkdir()
    containerd.ctr("run", "-d", "--snapshotter", "lazyfs",
                   "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw",
                   image.converted, "reader", "/bin/sh", "-c", READER)
    try:
        yield Reader(out, big_file(image))
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", "reader", check=False)
        wait_until(lambda: "STOPPED" in containerd.ctr("tasks", "ls", check=False).stdout
                   or "reader" not in containerd.ctr("tasks", "ls", check=False).stdout,
                   "the reader to stop")
        containerd.ctr("tasks", "delete", "reader", check=False)
        containerd.ctr("containers", "delete", "reader", check=False)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_a_running_container_reads_again_after_a_restart(
    containerd: Containerd, image: PublishedImage, reader: Reader, signum: signal.Signals
) -> None:
    reader.assert_reads(0)
    stop_snapshotter(containerd, signum)

    # No snapshotter: a piece never read fails; one read before is still in the page cache.
    status, _, error, seconds = reader.read(1 * MIB)
    print(f"read with no snapshotter: exit status {status}, {error!r}, {seconds:.3f} s")
    assert status != 0 and "Input/output error" in error, error
    reader.assert_reads(0)

    started = time.monotonic()
    containerd.snapshotter.start()
    print(f"snapshotter back after {time.monotonic() - started:.3f} s")
    for offset in (2 * MIB, 1 * MIB, 0, 7 * MIB):
        seconds = reader.assert_reads(offset)
        print(f"read at {offset} after the restart: {seconds:.3f} s")

    # The kernel mounts of before were taken over: one FUSE mount, one EROFS mount and one
    # loop device per layer, nothing left of the dead file system.
    root = containerd.snapshotter.root
    kinds = [kind for _, kind in mounts_below(root)]
    assert kinds.count("fuse.lazyfs") == 1, mounts_below(root)
    assert len(erofs_mounts(containerd)) == len(layer_stats(containerd)) == 2
    wait_until(lambda: containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls",
                                      check=False).returncode == 0, "containerd reconnecting")
    # And a new container on the same snapshots sees the image as before.
    check_output(containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.converted,
                                "show", "/bin/sh", "-c", SHOW).stdout)
