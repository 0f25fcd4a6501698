"""Faults stay small and short, through the kernel: `lazyfs mount` (a subprocess) over a
fault-injecting range server (tests/support/fault_server.py), EROFS mounted on the verified
FUSE file, every file of the tree read through it.

Each test counts the files that stay readable (wrong bytes never: every file read is
compared with its source) and measures how long reads and unmount take, with short
configured timeouts and generous bounds (several times the configured time) so that a busy
machine does not make them flaky. The numbers are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from converter.tree import compare_trees, scan_directory
from lazyfs.format.descriptor import parse_descriptor
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from tests.support.fault_server import Fault, FaultServer
from tests.support.forge import blob_metadata, image_offset_of
from tests.support.lazyfs_cli import REPO, Lazyfs, pid_gone, wait_until
from tools.sample_tree import make_sample_tree

pytestmark = [pytest.mark.root, pytest.mark.network]

READ_TIMEOUT_S = 2.0
RETRY_S = 1.0  # --retry-bad-after, and about the hold-off of a chunk after a failed fetch
FAST = ("--read-timeout", str(READ_TIMEOUT_S), "--low-speed-limit", "16K",
        "--low-speed-time", "0.5", "--retry-bad-after", str(RETRY_S))
# A file in the middle of the image, of several chunks: a fault on one of its chunks
# touches it and no other file.
TARGET = "usr/lib/data/blob1.bin"


@dataclass(frozen=True)
class Layer:
    tree: Path
    served: Path
    chunk_size: int

    @property
    def blob(self) -> Path:
        return self.served / "layer.blob"

    def files(self) -> list[Path]:
        return [path.relative_to(self.tree) for path in sorted(self.tree.rglob("*"))
                if path.is_file() and not path.is_symlink() and path.name != ".sample-tree"]

    def frame_at(self, image_offset: int) -> tuple[int, int]:
        """(chunk index, a blob offset inside its frame) of an image offset."""
        descriptor = parse_descriptor((self.served / "layer.descriptor.json").read_text())
        metadata = blob_metadata(self.blob.read_bytes(), descriptor.seekable())
        index = image_offset // metadata.table.chunk_size
        start, end = metadata.frame_range(index)
        return index, (start + end) // 2

    def target_frame(self) -> tuple[int, int]:
        """The chunk in the middle of TARGET, and a blob offset in its frame."""
        content = (self.tree / TARGET).read_bytes()
        image = self._image()
        middle = image_offset_of(image, content[len(content) // 2:len(content) // 2 + 4096])
        return self.frame_at(middle)

    def target_first_chunk(self) -> int:
        """The chunk that holds TARGET's first block."""
        content = (self.tree / TARGET).read_bytes()
        return self.frame_at(image_offset_of(self._image(), content[:4096]))[0]

    def _image(self) -> bytes:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(self.blob.read_bytes(),
                                                            read_across_frames=True)
        return reader.read()


def convert(tree: Path, served: Path, *options: str) -> None:
    served.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "convert", str(tree), "-o", str(served / "layer.blob"),
         *options], cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    """About 8 MiB of files in 66 chunks of 128 KiB."""
    work = tmp_path_factory.mktemp("fault-layer")
    tree = make_sample_tree(work / "tree", 8 * 1024 * 1024, seed=3)
    convert(tree, work / "served", "--chunk-size", "128K")
    return Layer(tree, work / "served", 128 * 1024)


@pytest.fixture
def server(layer: Layer) -> Iterator[FaultServer]:
    with FaultServer(layer.served) as running:
        yield running


@dataclass
class Outcome:
    correct: int
    eio: int
    wrong: int
    slowest_s: float
    total_s: float

    def __str__(self) -> str:
        return (f"{self.correct} readable, {self.eio} EIO, {self.wrong} wrong; slowest read "
                f"{self.slowest_s:.2f} s, all {self.total_s:.2f} s")


def read_tree(mountpoint: Path, layer: Layer, files: list[Path] | None = None) -> Outcome:
    """Read every file (or `files`) through the mount and compare it with its source."""
    correct = eio = wrong = 0
    slowest = 0.0
    began = time.monotonic()
    for name in files if files is not None else layer.files():
        started = time.monotonic()
        try:
            data = (mountpoint / name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{name}: {exc}"
            eio += 1
        else:
            if data == (layer.tree / name).read_bytes():
                correct += 1
            else:
                wrong += 1
        slowest = max(slowest, time.monotonic() - started)
    return Outcome(correct, eio, wrong, slowest, time.monotonic() - began)


def stats(lazyfs: Lazyfs, mountpoint: Path) -> dict[str, object]:
    result = lazyfs.run("stats", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    (layer_stats,) = json.loads(result.stdout)["layers"].values()
    return layer_stats  # type: ignore[no-any-return]


def mount(lazyfs: Lazyfs, server: FaultServer, mountpoint: Path, *options: str) -> None:
    lazyfs.mount(server.url + "layer.blob", str(mountpoint), *FAST, *options,
                 mountpoint=mountpoint)


def umount(lazyfs: Lazyfs, mountpoint: Path, *options: str) -> float:
    started = time.monotonic()
    result = lazyfs.run("umount", *options, str(mountpoint))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    return elapsed


def report(what: str, *values: object) -> None:
    print(f"\n[faults] {what}: " + "; ".join(str(value) for value in values))


# -- availability ---------------------------------------------------------------------------


def test_etag_changing_at_every_answer_is_no_error(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    mount(lazyfs, server, mountpoint)
    server.etag_per_response = True  # and Last-Modified: two origins, a touch, a re-copy
    outcome = read_tree(mountpoint, layer)
    report("ETag per answer", outcome)
    assert outcome.eio == 0 and outcome.wrong == 0
    assert umount(lazyfs, mountpoint) < 5


def test_a_5xx_burst_costs_little_and_nothing_lasting(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    mount(lazyfs, server, mountpoint)
    server.add(Fault("status", status=503, times=10))
    first = read_tree(mountpoint, layer)
    time.sleep(RETRY_S * 2)
    second = read_tree(mountpoint, layer)
    report("503 burst of 10", f"first pass {first}", f"second pass {second}")
    assert first.wrong == 0 and first.correct >= 0.9 * len(layer.files())
    assert second.correct == len(layer.files())
    umount(lazyfs, mountpoint)


def test_a_range_failing_for_good_fails_only_its_file(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    chunk, offset = layer.target_frame()
    mount(lazyfs, server, mountpoint, "--readahead", "0")
    server.add(Fault("status", status=503, at=offset))
    outcome = read_tree(mountpoint, layer)
    layer_stats = stats(lazyfs, mountpoint)
    server.clear()
    time.sleep(RETRY_S * 2)
    healed = read_tree(mountpoint, layer, [Path(TARGET)])
    report("permanent 503 on one range", outcome, f"failing chunks {layer_stats['failing_chunks']}",
           f"after the fault is gone: {healed}")
    assert outcome.wrong == 0 and outcome.eio == 1
    assert outcome.correct == len(layer.files()) - 1
    # The chunk held off is the first of the failed request, which the file's read made: the
    # faulty chunk, or one of the file's before it (the chunks after the first of a read count
    # as read ahead, and are not held off); none once the hold-off has passed.
    failing = layer_stats["failing_chunks"]
    assert failing == [] or (len(failing) == 1
                             and layer.target_first_chunk() <= failing[0] <= chunk), failing
    assert healed.correct == 1
    umount(lazyfs, mountpoint)


def test_one_corrupted_response_is_refetched(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    _, offset = layer.target_frame()
    mount(lazyfs, server, mountpoint)
    server.add(Fault("corrupt", at=offset, times=1))
    outcome = read_tree(mountpoint, layer)
    layer_stats = stats(lazyfs, mountpoint)
    report("one corrupted response", outcome, f"refetches {layer_stats['refetches']}")
    assert outcome.correct == len(layer.files()) and outcome.eio == 0
    assert layer_stats["refetches"] == 1 and layer_stats["verify_failures"] == 0
    assert layer_stats["bad_chunks"] == []
    umount(lazyfs, mountpoint)


def test_a_chunk_corrupted_for_a_while_is_bad_for_a_while(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.update(("ERROR",))
    chunk, offset = layer.target_frame()
    mount(lazyfs, server, mountpoint)
    server.add(Fault("corrupt", at=offset))
    outcome = read_tree(mountpoint, layer)
    layer_stats = stats(lazyfs, mountpoint)
    served = len(server.range_requests("corrupt"))
    server.clear()  # a proxy's bad copy expired, or the origin was fixed
    time.sleep(RETRY_S * 1.5)
    healed = read_tree(mountpoint, layer)
    report("corrupted for a while", outcome, f"corrupt answers {served}",
           f"after --retry-bad-after: {healed}")
    assert outcome.wrong == 0 and outcome.eio == 1
    # Bad for --retry-bad-after (it may have expired, and failed again, during the pass).
    assert layer_stats["bad_chunks"] in ([chunk], []) and layer_stats["verify_failures"] >= 1
    assert served >= 3
    assert healed.correct == len(layer.files())
    umount(lazyfs, mountpoint)


@pytest.mark.parametrize("kind", ["reset", "short", "ignore_range"])
def test_broken_answers_pass(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer, kind: str
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    mount(lazyfs, server, mountpoint)
    server.add(Fault(kind, times=6))
    first = read_tree(mountpoint, layer)
    time.sleep(RETRY_S * 2)
    second = read_tree(mountpoint, layer)
    report(f"6 answers of kind {kind}", f"first pass {first}", f"second pass {second}")
    assert first.wrong == 0 and first.correct >= 0.9 * len(layer.files())
    assert second.correct == len(layer.files())
    umount(lazyfs, mountpoint)


def test_blob_swapped_for_other_bytes_of_the_same_size(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))
    mount(lazyfs, server, mountpoint, "--readahead", "0")
    original = layer.blob.read_bytes()
    server.swap("layer.blob", bytes(reversed(original)))
    some = layer.files()[::16]
    swapped = read_tree(mountpoint, layer, some)
    server.swap("layer.blob", original)
    time.sleep(RETRY_S * 1.5)
    back = read_tree(mountpoint, layer)
    report("blob swapped (same size)", f"swapped: {swapped}", f"swapped back: {back}")
    assert swapped.wrong == 0 and swapped.correct < len(some)
    assert back.correct == len(layer.files())
    umount(lazyfs, mountpoint)


def test_blob_swapped_for_one_of_another_size(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    mount(lazyfs, server, mountpoint, "--readahead", "0")
    original = layer.blob.read_bytes()
    server.swap("layer.blob", original + b"appended")
    some = layer.files()[::16]
    swapped = read_tree(mountpoint, layer, some)
    server.swap("layer.blob", original)
    time.sleep(RETRY_S * 2)
    back = read_tree(mountpoint, layer)
    report("blob swapped (other size)", f"swapped: {swapped}", f"swapped back: {back}")
    assert swapped.wrong == 0 and swapped.eio >= 1
    assert back.correct == len(layer.files())
    assert "blob is now" in lazyfs.logs()
    umount(lazyfs, mountpoint)


def test_a_server_that_went_away_fails_fast_logged_once_and_comes_back(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    mount(lazyfs, server, mountpoint, "--readahead", "0")
    server.stop()
    down = read_tree(mountpoint, layer)
    with FaultServer(layer.served, port=server.port):
        time.sleep(3.0)  # past the hold-off, however often it doubled
        back = read_tree(mountpoint, layer)
        report("server down", f"down: {down}", f"back: {back}")
        assert down.wrong == 0 and down.eio >= len(layer.files()) // 2
        # The first read pays the reader's retries; later ones fail at once.
        assert down.total_s < 10
        assert back.correct == len(layer.files())
        umount(lazyfs, mountpoint)
    unreachable = [line for line in lazyfs.logs().splitlines() if "unreachable" in line]
    assert len(unreachable) == 1, unreachable


# -- bounded time ---------------------------------------------------------------------------


def test_a_stalled_server_fails_reads_within_the_read_timeout(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    mount(lazyfs, server, mountpoint, "--readahead", "0")
    server.add(Fault("stall"))
    some = layer.files()[::128]
    stalled = read_tree(mountpoint, layer, some)
    server.clear()
    time.sleep(RETRY_S * 2)
    back = read_tree(mountpoint, layer)
    report("stalled server", f"stalled: {stalled}", f"released: {back}")
    # (A file in the chunks read at mount is cached.)
    assert stalled.eio >= len(some) - 1 and stalled.wrong == 0
    assert stalled.slowest_s < 3 * READ_TIMEOUT_S
    assert back.correct == len(layer.files())
    umount(lazyfs, mountpoint)


def test_a_trickling_server_is_bounded_by_the_low_speed_limit(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    _, offset = layer.target_frame()
    mount(lazyfs, server, mountpoint, "--readahead", "0")
    server.add(Fault("trickle", at=offset, rate_bytes_per_s=2000))
    trickled = read_tree(mountpoint, layer, [Path(TARGET)])
    server.clear()
    server.add(Fault("trickle", at=offset, times=1, rate_bytes_per_s=2000))
    time.sleep(RETRY_S * 2)
    once = read_tree(mountpoint, layer, [Path(TARGET)])
    report("trickle at 2000 B/s", f"always: {trickled}", f"once: {once}")
    assert trickled.eio == 1 and trickled.slowest_s < 3 * READ_TIMEOUT_S
    assert once.correct == 1 and once.slowest_s < 3 * READ_TIMEOUT_S
    umount(lazyfs, mountpoint)


def test_umount_with_a_read_stalled_in_flight(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("WARNING")
    # A read timeout far longer than the test: only unmount ends the stalled fetch.
    lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--read-timeout", "120",
                 "--low-speed-time", "120", mountpoint=mountpoint)
    pid = lazyfs.record(mountpoint)["pid"]  # type: ignore[index]
    server.add(Fault("stall"))
    reader = subprocess.Popen(["cat", str(mountpoint / TARGET)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert reader.poll() is None  # blocked in the stalled fetch
        elapsed = umount(lazyfs, mountpoint, "--lazy")
        unmounted = time.monotonic()
        wait_until(lambda: reader.poll() is not None, "the blocked reader to end", 10)
        reader_after = time.monotonic() - unmounted
    finally:
        reader.kill()
        reader.wait()
    report("umount --lazy, a read stalled in flight",
           f"umount {elapsed:.2f} s, the reader ended {reader_after:.2f} s later")
    assert elapsed < 2.0 and reader_after < 2.0
    assert reader.returncode != 0  # EIO, not the file's bytes
    assert pid_gone(pid)


def test_umount_with_a_readahead_stalled_in_flight(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer
) -> None:
    lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--read-timeout", "120",
                 "--low-speed-time", "120", "--readahead", "4", mountpoint=mountpoint)
    chunk, _ = layer.target_frame()
    _, offset = layer.frame_at((chunk + 3) * layer.chunk_size)
    server.add(Fault("stall", at=offset))
    # Reading the file streams it: readahead runs ahead into the stalled chunk.
    with open(mountpoint / TARGET, "rb") as stream:
        stream.read(256 * 1024)
    wait_until(lambda: len(server.range_requests("stall")) >= 1, "a fetch to stall", 10)
    elapsed = umount(lazyfs, mountpoint)
    report("umount, a readahead stalled in flight", f"umount {elapsed:.2f} s")
    assert elapsed < 2.0


# -- mount errors and options ---------------------------------------------------------------


@pytest.mark.parametrize("what", ["frame", "tree"])
def test_chunk_0_failing_verification_is_named_in_the_mount_error(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer, what: str
) -> None:
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))
    if what == "frame":
        _, offset = layer.frame_at(0)
        expected = "chunk 0: verification failed: chunk 0 (frame at offset 0, "
    else:
        annotations = parse_descriptor(
            (layer.served / "layer.descriptor.json").read_text()).seekable()
        assert annotations.verity_offset is not None
        # 8 MiB image: level 0 of 33 blocks under one level-1 block; level 0 after it.
        offset = annotations.verity_offset + SKIPPABLE_HEADER_SIZE + 2 * 4096 + 100
        expected = "hash block 0 of level 0"
    server.add(Fault("corrupt", at=offset))
    result = lazyfs.run("mount", server.url + "layer.blob", str(mountpoint), *FAST)
    report(f"chunk 0 bad ({what}) at mount", result.stderr.strip())
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert "superblock" in result.stderr and "loop" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mountpoint) and lazyfs.records() == []


def test_a_cache_smaller_than_a_chunk_is_refused(
    lazyfs: Lazyfs, mountpoint: Path, server: FaultServer
) -> None:
    lazyfs.expected_log_levels.add("ERROR")
    result = lazyfs.run("mount", server.url + "layer.blob", str(mountpoint),
                        "--cache-size", "100K")
    assert result.returncode == 2
    assert "smaller than one chunk" in result.stderr and "131072" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mountpoint) and lazyfs.records() == []


def test_options_after_the_mountpoint_and_a_live_trace(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, server: FaultServer, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.jsonl"
    lazyfs.mountpoints.append(mountpoint)
    result = lazyfs.run("mount", server.url + "layer.blob", "--trace", str(trace),
                        str(mountpoint), "--read-timeout", "5")
    assert result.returncode == 0, result.stderr
    lazyfs.pids.append(lazyfs.record(mountpoint)["pid"])  # type: ignore[index]
    assert read_tree(mountpoint, layer, [Path("etc/hostname")]).correct == 1
    # Flushed within a second or so, while the mount lives.
    wait_until(lambda: trace.exists() and b'"event":"fetch"' in trace.read_bytes(),
               "the trace to show the fetch", 3)
    umount(lazyfs, mountpoint)


# -- any chunk size -------------------------------------------------------------------------


def test_chunk_size_not_a_multiple_of_the_verity_block_mounts_lazily(
    lazyfs: Lazyfs, mountpoint: Path, layer: Layer, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    convert(layer.tree, served, "--chunk-size", "1000003", "--verity-block-size", "512")
    with FaultServer(served) as odd:
        lazyfs.mount(odd.url + "layer.blob", str(mountpoint), *FAST, mountpoint=mountpoint)
        assert compare_trees(scan_directory(layer.tree), scan_directory(mountpoint)) == []
        layer_stats = stats(lazyfs, mountpoint)
        assert layer_stats["verify_failures"] == 0
        assert layer_stats["chunk_count"] == -(-layer_stats["image_size"] // 1000003) > 1
        umount(lazyfs, mountpoint)
