"""Every read(2) returns within --read-timeout, however many readers wait on a stalled chunk.

`lazyfs mount` (a subprocess) over a range server that stalls a frame mid-stream, for every
request that reaches the stalled byte (tests/support/stalling_server.py: retries included), and
many threads that each read one file of the layer with one pread(2) through the kernel EROFS
mount, all at once. Each read is timed from the test's side of the kernel, so a wait the
daemon cannot see (a request queued for a worker, the kernel retrying a failed read) counts.

The bound is READ_TIMEOUT_S + MARGIN_S. The daemon's deadline runs from when its FUSE handler
is called; on top come the kernel handing the request over and the error back, and the
retries the kernel makes of the pages that failed, each of which must fail at once (a few
milliseconds). MARGIN_S leaves room for a busy two-core machine and is far below one more
read timeout, which is what a read that waits twice costs. The numbers are printed
(`pytest -s` shows them).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyfs.format.descriptor import parse_descriptor
from tests.support.forge import blob_metadata
from tests.support.lazyfs_cli import REPO, Lazyfs
from tests.support.stalling_server import StallingServer

pytestmark = [pytest.mark.root, pytest.mark.network]

READ_TIMEOUT_S = 2.0
MARGIN_S = 0.5
CHUNK_SIZE = 128 * 1024
FILE_SIZE = 12 * 1024
FILE_COUNT = 256
# Short attempts: a stalled transfer is retried (and stalls again) within the read timeout.
OPTIONS = ("--read-timeout", str(READ_TIMEOUT_S), "--low-speed-limit", "16K",
           "--low-speed-time", "0.5")


@dataclass(frozen=True)
class Layer:
    tree: Path
    served: Path
    files_by_chunk: dict[int, list[str]]  # the files wholly inside each data chunk
    frames: dict[int, tuple[int, int]]  # blob range of each chunk's frame

    def stall_byte(self, chunk: int) -> int:
        """A byte a little into the chunk's frame: readers of the chunk all wait for it."""
        start, end = self.frames[chunk]
        return start + min(512, (end - start) // 8)


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    """FILE_COUNT files of random bytes (a chunk compresses to a frame of about its size,
    so a miss brings only a couple of chunks with it), in 128 KiB chunks."""
    import zstandard

    work = tmp_path_factory.mktemp("deadline-layer")
    tree, served = work / "tree", work / "served"
    rng = random.Random(7)
    for index in range(FILE_COUNT):
        path = tree / f"d{index // 32:02d}" / f"f{index:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(FILE_SIZE))
    served.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "convert", str(tree), "-o", str(served / "layer.blob"),
         "--chunk-size", str(CHUNK_SIZE)], cwd=REPO, capture_output=True, text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    blob = (served / "layer.blob").read_bytes()
    descriptor = parse_descriptor((served / "layer.descriptor.json").read_text())
    metadata = blob_metadata(blob, descriptor.seekable())
    image = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    files_by_chunk: dict[int, list[str]] = {}
    for path in sorted(tree.rglob("*.bin")):
        offset = image.find(path.read_bytes())
        assert offset >= 0
        first, last = offset // CHUNK_SIZE, (offset + FILE_SIZE - 1) // CHUNK_SIZE
        if first == last:
            files_by_chunk.setdefault(first, []).append(str(path.relative_to(tree)))
    frames = {index: metadata.frame_range(index) for index in range(metadata.table.chunk_count)}
    return Layer(tree, served, files_by_chunk, frames)


@pytest.fixture
def server(layer: Layer) -> Iterator[StallingServer]:
    with StallingServer(layer.served) as running:
        yield running


@dataclass(frozen=True)
class Timed:
    name: str
    seconds: float
    outcome: str  # "ok", "EIO" or "wrong"


def read_all_at_once(mountpoint: Path, layer: Layer, names: list[str]) -> list[Timed]:
    """One pread(2) of each file, each in its own thread, all started together."""
    descriptors = {name: os.open(mountpoint / name, os.O_RDONLY) for name in names}
    results: list[Timed] = []
    start = threading.Barrier(len(names))

    def read(name: str) -> None:
        start.wait()
        began = time.monotonic()
        try:
            data = os.pread(descriptors[name], FILE_SIZE, 0)
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{name}: {exc}"
            outcome = "EIO"
        else:
            outcome = "ok" if data == (layer.tree / name).read_bytes() else "wrong"
        results.append(Timed(name, time.monotonic() - began, outcome))

    threads = [threading.Thread(target=read, args=(name,)) for name in names]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)
    return results


def report(what: str, results: list[Timed], lazyfs: Lazyfs, mountpoint: Path) -> str:
    """One line: the reads' times and outcomes, and the daemon's own p99 of its FUSE reads
    (which cannot see a wait before its handler runs, nor the kernel retrying)."""
    times = sorted(result.seconds for result in results)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    outcomes = {kind: sum(r.outcome == kind for r in results) for kind in ("ok", "EIO", "wrong")}
    stats = lazyfs.run("stats", str(mountpoint), "--json")
    fuse_p99_ms = json.loads(stats.stdout)["daemon"]["read_latency"]["p99_ms"]
    line = (f"{what}: {len(results)} reads, max {times[-1]:.2f} s, p99 {p99:.2f} s, "
            f"median {times[len(times) // 2]:.2f} s; {outcomes}; FUSE reads p99 "
            f"{fuse_p99_ms / 1000:.2f} s")
    print(f"\n[read deadline] {line}")
    return line


def fetch_failures(lazyfs: Lazyfs, chunk: int) -> int:
    """How many log lines report a failed fetch that includes `chunk`."""
    count = 0
    for line in lazyfs.logs().splitlines():
        if "fetch failed" not in line or " chunks " not in line:
            continue
        first, _, last = line.split(" chunks ", 1)[1].split(":", 1)[0].partition("-")
        count += int(first) <= chunk <= int(last or first)
    return count


def prepare(lazyfs: Lazyfs, mountpoint: Path, server: StallingServer, layer: Layer,
            names: list[str], *options: str) -> None:
    """Mount, and look every file up before any stall (the reads then read data only)."""
    lazyfs.expected_log_levels.add("WARNING")
    lazyfs.mount(server.url + "layer.blob", str(mountpoint), *OPTIONS, *options,
                 mountpoint=mountpoint)
    for name in names:
        os.stat(mountpoint / name)


def test_readers_of_a_chunk_that_came_with_a_miss_fail_within_the_timeout(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: StallingServer
) -> None:
    # A start-up reads a file, and the chunk after it comes along in the same request; the
    # frame of that chunk stalls, and 8 readers of it wait for it.
    chunk = sorted(layer.files_by_chunk)[len(layer.files_by_chunk) // 2]
    lead = layer.files_by_chunk[chunk - 1][0]
    names = layer.files_by_chunk[chunk][:8]
    assert len(names) == 8
    prepare(lazyfs, mountpoint, server, layer, [lead, *names])
    server.stall_at("/layer.blob", layer.stall_byte(chunk))
    assert (mountpoint / lead).read_bytes() == (layer.tree / lead).read_bytes()
    results = read_all_at_once(mountpoint, layer, names)
    line = report(f"8 readers of chunk {chunk}, which came with a miss", results, lazyfs,
                  mountpoint)
    assert all(result.outcome == "EIO" for result in results), line
    assert max(result.seconds for result in results) <= READ_TIMEOUT_S + MARGIN_S, line
    assert fetch_failures(lazyfs, chunk) == 1, lazyfs.logs()


def test_more_readers_than_the_kernel_sends_at_a_time_fail_within_the_timeout(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: StallingServer
) -> None:
    # 16 stalled chunks, 3 readers each: 48 reads waiting at once, each chunk its own request,
    # more chunks than the 12 requests a FUSE daemon is sent at a time by default.
    chunks = [index for index in sorted(layer.files_by_chunk)
              if index >= 2 and len(layer.files_by_chunk[index]) >= 3][:16]
    assert len(chunks) == 16
    names = [name for index in chunks for name in layer.files_by_chunk[index][:3]]
    prepare(lazyfs, mountpoint, server, layer, names, "--readahead", "0")
    for index in chunks:
        server.stall_at("/layer.blob", layer.stall_byte(index))
    results = read_all_at_once(mountpoint, layer, names)
    line = report(f"48 readers of 16 stalled chunks {chunks[0]}-{chunks[-1]}", results, lazyfs,
                  mountpoint)
    assert all(result.outcome == "EIO" for result in results), line
    assert max(result.seconds for result in results) <= READ_TIMEOUT_S + MARGIN_S, line
    for index in chunks:
        assert fetch_failures(lazyfs, index) == 1, lazyfs.logs()
