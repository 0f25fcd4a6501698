"""Bulk reads through a lazy mount: a large file read in order reaches the daemon as large
FUSE requests (the kernel's readahead of the block file raised before EROFS is mounted on it),
and the daemon fetches what follows in a few large requests (its readahead grows); reading
many times its chunk cache, the daemon's memory grows by no more than the cache and a
margin."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.lazyfs_cli import REPO, Lazyfs
from tests.support.nginx import serve_directory

pytestmark = [pytest.mark.root, pytest.mark.network]

BIG_FILE_BYTES = 24 * 1024 * 1024
MiB = 1024 * 1024
# The memory test: a file of many times the chunk cache, read in order.
MEMORY_FILE_BYTES = 192 * MiB
MEMORY_CACHE_BYTES = 64 * MiB
# What a daemon's resident memory may grow by while it reads, besides its chunk cache: streams
# in flight, their decoders, replies, and the heap's free memory, handed back once the RSS
# passes the cache by lazyfs.mount.heap.HEAP_SLACK_BYTES (16 MiB), looked at every 0.1 s.
# Measured: 20-23 MiB (7.5 MiB when each large buffer had a mapping of its own, which cost a
# bulk read half its CPU in page faults; 19 MiB more when every frame of a run kept its zstd
# decoder until the run ended).
MEMORY_MARGIN_BYTES = 32 * MiB


@pytest.fixture(scope="module")
def bulk_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source tree, served dir with layer.blob): one 24 MiB file, 512 KiB chunks."""
    return weights_layer(tmp_path_factory.mktemp("bulk-layer"), BIG_FILE_BYTES)


def weights_layer(work: Path, size: int) -> tuple[Path, Path]:
    """(source tree, served dir with layer.blob): one file of `size` bytes, 512 KiB chunks."""
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=bulk\n")
    rng = random.Random(3)
    with open(tree / "weights.bin", "wb") as stream:
        for _ in range(size // MiB):
            half = rng.randbytes(1 << 19)
            stream.write(half + half)  # compresses 2:1, as weights about do
    served = work / "served"
    served.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "convert", str(tree), "-o", str(served / "layer.blob")],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return tree, served


def test_a_large_file_read_in_order_comes_in_large_requests(
    lazyfs: Lazyfs, mountpoint: Path, bulk_layer: tuple[Path, Path]
) -> None:
    tree, served = bulk_layer
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), mountpoint=mountpoint)
        with open(mountpoint / "weights.bin", "rb", buffering=0) as stream:
            data = bytearray()
            while piece := stream.read(1 << 20):
                data += piece
        assert data == (tree / "weights.bin").read_bytes()
        result = lazyfs.run("stats", str(mountpoint), "--json")
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        daemon = stats["daemon"]
        # The kernel asked for more than its default 128 KiB at a time.
        assert daemon["read_bytes"] / daemon["reads"] > 256 * 1024, daemon
        layer = next(iter(stats["layers"].values()))
        # The file's chunks fetched in a few requests that grow, not one a chunk or two.
        assert layer["chunks_fetched"] == layer["chunk_count"], layer
        assert layer["chunk_fetches"] * 3 <= layer["chunk_count"], layer
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0


@pytest.fixture(scope="module")
def memory_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return weights_layer(tmp_path_factory.mktemp("memory-layer"), MEMORY_FILE_BYTES)


def memory_of(pid: int, field: str) -> int:
    """`field` (VmRSS, VmHWM) of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def test_reading_far_more_than_the_cache_keeps_the_daemon_within_its_bound(
    lazyfs: Lazyfs, mountpoint: Path, memory_layer: tuple[Path, Path]
) -> None:
    """A measured bound, not a timing: the daemon's peak resident memory (VmHWM) over what it
    held once ready is at most its chunk cache and a margin, while the file read through it
    is three times the cache (no disk cache: the frames it may hold back for the disk are
    bounded on their own, `DiskCache.put_later`)."""
    tree, served = memory_layer
    with serve_directory(served) as server:
        record = lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--no-disk-cache",
                              "--cache-size", str(MEMORY_CACHE_BYTES), mountpoint=mountpoint)
        pid = record["pid"]
        ready = memory_of(pid, "VmRSS")
        digest = hashlib.sha256()
        with open(mountpoint / "weights.bin", "rb", buffering=0) as stream:
            while piece := stream.read(MiB):
                digest.update(piece)
        assert digest.digest() == hashlib.sha256((tree / "weights.bin").read_bytes()).digest()
        grown = memory_of(pid, "VmHWM") - ready
        bound = MEMORY_CACHE_BYTES + MEMORY_MARGIN_BYTES
        assert grown <= bound, (
            f"the daemon grew by {grown / MiB:.1f} MiB reading {MEMORY_FILE_BYTES // MiB} MiB "
            f"with a {MEMORY_CACHE_BYTES // MiB} MiB cache (bound {bound / MiB:.0f} MiB)")
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0
