"""RemoteImage over local blobs written by the encoder: correctness, integrity, efficiency."""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.errors import FetchError
from lazyfs.format.errors import IntegrityError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.layer.errors import ImageReadError, LayerOpenError, UntrustedLayerError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning, PrefetchOptions
from lazyfs.startup.open import LayerSource, open_layer
from lazyfs.startup.prefetch import BackgroundLoader
from tests.layer.helpers import flip_byte, make_image_bytes, run_with_layer, write_blob

CHUNK = 64 * 1024
IMAGE = make_image_bytes(10 * CHUNK + 12345)
NO_READAHEAD = ImageTuning(readahead_chunks=0)
# Readahead after sequential reads only: no chunk follows a miss.
SEQUENTIAL_ONLY = ImageTuning(readahead_chunks=3, follow_miss_bytes=0)


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    return write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]


async def read_all(image: RemoteImage, piece: int = 131072) -> bytes:
    out = bytearray()
    for offset in range(0, image.size, piece):
        out += await image.read(offset, piece)
    return bytes(out)


def test_sequential_read_equals_image(blob: Path) -> None:
    data = run_with_layer(LayerSource(str(blob)), read_all)
    assert data == IMAGE


@settings(max_examples=40, deadline=None)
@given(reads=st.lists(st.tuples(st.integers(0, len(IMAGE) + 100), st.integers(0, 3 * CHUNK)),
                      min_size=1, max_size=12))
def test_random_reads_equal_image(tmp_path_factory: pytest.TempPathFactory,
                                  reads: list[tuple[int, int]]) -> None:
    directory = tmp_path_factory.mktemp("blob")
    blob_path = write_blob(directory, IMAGE, chunk_size=CHUNK)[0]

    async def body(image: RemoteImage) -> object:
        return [await image.read(offset, size) for offset, size in reads]

    results = run_with_layer(LayerSource(str(blob_path)), body, cache_bytes=3 * CHUNK)
    for (offset, size), data in zip(reads, results, strict=True):
        assert data == IMAGE[offset:offset + size]


@pytest.mark.parametrize("verity", [True, False])
@pytest.mark.parametrize("chunk_size", [4096, 3 * 4096, CHUNK])
def test_chunk_sizes_and_verity(tmp_path: Path, verity: bool, chunk_size: int) -> None:
    blob_path = write_blob(tmp_path, IMAGE[:200_000], chunk_size=chunk_size, verity=verity)[0]
    assert run_with_layer(LayerSource(str(blob_path)), read_all) == IMAGE[:200_000]


def test_single_block_image(tmp_path: Path) -> None:
    blob_path = write_blob(tmp_path, b"x" * 100, chunk_size=CHUNK)[0]
    assert run_with_layer(LayerSource(str(blob_path)), read_all) == b"x" * 100


def test_corrupt_frame_fails_only_its_chunk(blob: Path, caplog: pytest.LogCaptureFixture) -> None:
    flip_byte(blob, 3 * CHUNK // 4 + 100)  # inside an early frame, far from chunk 9

    async def body(image: RemoteImage) -> object:
        bad = bisect.bisect_right(image.metadata.table.frame_offsets, 3 * CHUNK // 4 + 100) - 1
        with pytest.raises(ImageReadError):
            await image.read(bad * CHUNK, 4096)
        with pytest.raises(ImageReadError):  # remembered: no second fetch
            await image.read(bad * CHUNK + 8192, 4096)
        good = await image.read(9 * CHUNK, CHUNK)
        return bad, good, image.stats_snapshot()

    with caplog.at_level(logging.ERROR):
        bad, good, stats = run_with_layer(LayerSource(str(blob)), body, tuning=NO_READAHEAD)
    assert good == IMAGE[9 * CHUNK:10 * CHUNK]
    assert stats["verify_failures"] == 1
    assert stats["bad_chunks"] == [bad]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"chunk {bad}" in errors[0].getMessage()


@pytest.mark.parametrize("window", [0, 16 * 1024])
def test_corrupt_level0_tree_block_fails_covered_chunk(tmp_path: Path, window: int) -> None:
    # sha512 level 0 has one hash block per 64 data blocks; a 2 MiB image has 512 data blocks,
    # 8 level-0 blocks and a top level. With a window of 16 KiB the bad block comes with the
    # metadata (checked at open), without one it is fetched when read.
    image_bytes = make_image_bytes(2 * 1024 * 1024, seed=7)
    blob_path, result = write_blob(tmp_path, image_bytes, chunk_size=CHUNK)
    verity_payload = result.annotations.verity_offset + SKIPPABLE_HEADER_SIZE
    # Payload: superblock block, level 1 (1 block), then level 0 blocks; corrupt level-0 block 2.
    flip_byte(blob_path, verity_payload + 4096 * (2 + 2) + 10)

    async def body(image: RemoteImage) -> object:
        with pytest.raises(ImageReadError):
            await image.read(2 * 64 * 4096, 4096)  # data block 128 -> level-0 block 2
        return await image.read(0, CHUNK)

    tuning = ImageTuning(readahead_chunks=0, verity_window_bytes=window)
    assert run_with_layer(LayerSource(str(blob_path)), body, tuning=tuning) == image_bytes[:CHUNK]


def test_corrupt_upper_tree_refuses_open(tmp_path: Path) -> None:
    image_bytes = make_image_bytes(2 * 1024 * 1024, seed=8)
    blob_path, result = write_blob(tmp_path, image_bytes, chunk_size=CHUNK)
    flip_byte(blob_path, result.annotations.verity_offset + SKIPPABLE_HEADER_SIZE + 4096 + 5)
    with pytest.raises(IntegrityError, match="root digest"):
        run_with_layer(LayerSource(str(blob_path)), read_all)


def test_wrong_chunk_digest_refuses_open(blob: Path) -> None:
    source = LayerSource(str(blob), chunk_table_offset=None)
    descriptor = blob.with_name("layer.descriptor.json")
    document = json.loads(descriptor.read_text())
    key = "dev.containerd.erofs.zstd.chunk_digest"
    digest = document["annotations"][key]
    document["annotations"][key] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    descriptor.write_text(json.dumps(document))
    with pytest.raises(IntegrityError, match="chunk table digest mismatch"):
        run_with_layer(source, read_all)


def test_missing_descriptor_is_a_clear_error(blob: Path) -> None:
    blob.with_name("layer.descriptor.json").unlink()
    with pytest.raises(LayerOpenError, match="no descriptor found"):
        run_with_layer(LayerSource(str(blob)), read_all)


def test_untrusted_refused_unless_insecure(blob: Path) -> None:
    _, result = write_blob(blob.parent, IMAGE, chunk_size=CHUNK)
    offset = result.annotations.chunk_table_offset
    with pytest.raises(UntrustedLayerError, match="--insecure"):
        run_with_layer(LayerSource(str(blob), chunk_table_offset=offset), read_all)
    source = LayerSource(str(blob), chunk_table_offset=offset, insecure=True)
    assert run_with_layer(source, read_all) == IMAGE


def test_explicit_annotations(blob: Path) -> None:
    _, result = write_blob(blob.parent, IMAGE, chunk_size=CHUNK)
    a = result.annotations
    source = LayerSource(str(blob), chunk_table_offset=a.chunk_table_offset,
                         chunk_digest=a.chunk_digest, verity_offset=a.verity_offset,
                         root_digest=a.root_digest)
    assert run_with_layer(source, read_all) == IMAGE


def test_concurrent_reads_of_one_chunk_fetch_once(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        before = image.reader.stats.requests
        results: list[bytes] = []

        async def reader(offset: int) -> None:
            results.append(await image.read(offset, 4096))

        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(reader, 5 * CHUNK + index * 2048)
        return results, image.reader.stats.requests - before

    results, requests = run_with_layer(LayerSource(str(blob)), body, tuning=NO_READAHEAD)
    assert sorted(results) == sorted(IMAGE[5 * CHUNK + i * 2048:5 * CHUNK + i * 2048 + 4096]
                                     for i in range(20))
    assert requests == 1


def test_adjacent_missing_chunks_are_coalesced(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        before = image.reader.stats.requests
        data = await image.read(2 * CHUNK + 10, 4 * CHUNK)
        return data, image.reader.stats.requests - before

    data, requests = run_with_layer(LayerSource(str(blob)), body, tuning=NO_READAHEAD)
    assert data == IMAGE[2 * CHUNK + 10:6 * CHUNK + 10]
    assert requests == 1


def test_coalescing_respects_cap(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        before = image.reader.stats.requests
        await image.read(0, 6 * CHUNK)
        return image.reader.stats.requests - before

    tuning = ImageTuning(readahead_chunks=0, coalesce_bytes=1)
    assert run_with_layer(LayerSource(str(blob)), body, tuning=tuning) == 6


def _frame_bytes(blob: Path, index: int) -> int:
    async def body(image: RemoteImage) -> int:
        start, end = image.metadata.frame_range(index)
        return end - start

    return int(run_with_layer(LayerSource(str(blob)), body))


def _read_then_settle(*offsets: int) -> Callable[[RemoteImage], Awaitable[dict[str, Any]]]:
    """Read 100 bytes at each offset; the stats and the requests the reads took."""
    async def body(image: RemoteImage) -> dict[str, Any]:
        before = image.reader.stats.requests
        for offset in offsets:
            await image.read(offset, 100)
        await trio.sleep(0.2)
        return {**image.stats_snapshot(), "read_requests": image.reader.stats.requests - before}

    return body


def test_the_next_chunk_follows_a_miss_in_the_same_request(blob: Path) -> None:
    """A start-up jumps from file to file: the chunk after a miss comes along, when its frame
    fits the budget, and a read of it then costs no request."""
    tuning = ImageTuning(follow_miss_bytes=_frame_bytes(blob, 1))
    stats = run_with_layer(LayerSource(str(blob)), _read_then_settle(0, CHUNK + 7), tuning=tuning)
    assert stats["chunks_fetched"] == 2 and stats["readahead_chunks"] == 1
    assert stats["read_requests"] == 1  # the second read found it loading or loaded


@pytest.mark.parametrize("tuning", [
    ImageTuning(follow_miss_bytes=0),
    ImageTuning(readahead_chunks=0),
    ImageTuning(partial_frames=False),
])
def test_no_chunk_follows_a_miss_when_told_not_to_read_ahead(
    blob: Path, tuning: ImageTuning
) -> None:
    """Off with follow_miss_bytes=0 or --readahead 0, and without streaming (the read would
    wait for the whole request)."""
    stats = run_with_layer(LayerSource(str(blob)), _read_then_settle(0), tuning=tuning)
    assert stats["chunks_fetched"] == 1 and stats["readahead_chunks"] == 0


def test_only_frames_within_the_budget_follow_a_miss(blob: Path) -> None:
    budget = _frame_bytes(blob, 4) + _frame_bytes(blob, 5)
    tuning = ImageTuning(follow_miss_bytes=budget)
    stats = run_with_layer(LayerSource(str(blob)), _read_then_settle(3 * CHUNK), tuning=tuning)
    assert stats["chunks_fetched"] == 3 and stats["readahead_chunks"] == 2
    tuning = ImageTuning(follow_miss_bytes=_frame_bytes(blob, 4) - 1)
    stats = run_with_layer(LayerSource(str(blob)), _read_then_settle(3 * CHUNK), tuning=tuning)
    assert stats["chunks_fetched"] == 1


def test_no_chunk_follows_a_miss_in_a_layer_with_a_prefetch_list(blob: Path) -> None:
    """The list says what comes next better than the layout does."""
    async def body(image: RemoteImage) -> dict[str, Any]:
        BackgroundLoader([image], [(5, 6)], PrefetchOptions())  # not run: it only says so
        return await _read_then_settle(0)(image)

    stats = run_with_layer(LayerSource(str(blob)), body)
    assert stats["chunks_fetched"] == 1


def test_sequential_reads_trigger_readahead(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        for offset in range(0, CHUNK, 16384):  # one whole chunk, streamed in order
            await image.read(offset, 16384)
        await trio.sleep(0.2)
        return image.stats_snapshot()

    stats = run_with_layer(LayerSource(str(blob)), body, tuning=SEQUENTIAL_ONLY)
    assert stats["readahead_chunks"] == 3
    assert stats["chunks_fetched"] == 4


def test_small_reads_in_one_chunk_do_not_read_ahead(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        await image.read(0, 4096)
        await image.read(4096, 4096)
        await image.read(20000, 4096)
        await trio.sleep(0.1)
        return image.stats_snapshot()

    stats = run_with_layer(LayerSource(str(blob)), body, tuning=SEQUENTIAL_ONLY)
    assert stats["readahead_chunks"] == 0
    assert stats["chunks_fetched"] == 1


def test_random_reads_do_not_read_ahead(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        await image.read(7 * CHUNK, 4096)
        await image.read(2 * CHUNK, 4096)
        await trio.sleep(0.1)
        return image.stats_snapshot()

    stats = run_with_layer(LayerSource(str(blob)), body, tuning=SEQUENTIAL_ONLY)
    assert stats["readahead_chunks"] == 0
    assert stats["chunks_fetched"] == 2


def test_cache_stays_within_cap(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        data = await read_all(image)
        return data, image.cache.size_bytes

    data, cached = run_with_layer(LayerSource(str(blob)), body, cache_bytes=2 * CHUNK)
    assert data == IMAGE
    assert cached <= 2 * CHUNK


def _fail_first_fetch(image: RemoteImage) -> None:
    real_read = image.reader.read
    calls = 0

    async def flaky(offset: int, size: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise FetchError(f"test: {offset}+{size} refused")
        return await real_read(offset, size)

    image.reader.read = flaky  # type: ignore[method-assign]


def test_a_failed_fetch_holds_off_the_chunk_read_not_the_one_that_followed(blob: Path) -> None:
    """A chunk that only came along (it follows a miss) was not asked for: its next read
    fetches it at once instead of failing for the hold-off."""
    async def body(image: RemoteImage) -> object:
        real_stream = image.reader.read_stream  # type: ignore[attr-defined]
        calls = 0

        async def flaky(offset: int, size: int, sink: Callable[[bytes], Awaitable[None]]
                        ) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise FetchError(f"test: {offset}+{size} refused")
            await real_stream(offset, size, sink)

        image.reader.read_stream = flaky  # type: ignore[attr-defined]
        with pytest.raises(ImageReadError):
            await image.read(4 * CHUNK, 10)
        followed = await image.read(5 * CHUNK, 10)
        return followed, calls, image.stats_snapshot()["failing_chunks"]

    tuning = ImageTuning(follow_miss_bytes=1 << 20, readahead_chunks=1, retry_after_s=30)
    followed, calls, failing = run_with_layer(LayerSource(str(blob)), body, tuning=tuning)
    assert followed == IMAGE[5 * CHUNK:5 * CHUNK + 10]
    assert calls == 2 and failing == [4]


def test_fetch_failure_is_eio_and_not_remembered(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        _fail_first_fetch(image)
        with pytest.raises(ImageReadError):
            await image.read(4 * CHUNK, 10)
        return await image.read(4 * CHUNK, 10), image.stats_snapshot()

    tuning = ImageTuning(readahead_chunks=0, retry_after_s=0)
    data, stats = run_with_layer(LayerSource(str(blob)), body, tuning=tuning)
    assert data == IMAGE[4 * CHUNK:4 * CHUNK + 10]
    assert stats["fetch_failures"] == 1 and stats["verify_failures"] == 0


def test_a_fetch_failure_holds_off_its_chunk_for_a_while_and_no_other(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        _fail_first_fetch(image)
        with pytest.raises(ImageReadError):
            await image.read(4 * CHUNK, 10)
        # Another chunk loads at once: one failing range does not block the others.
        other = await image.read(6 * CHUNK, 10)
        requests = image.reader.stats.requests
        with pytest.raises(ImageReadError, match=r"fetch failed \(.*refused\); tried again in"):
            await image.read(4 * CHUNK, 10)  # its own chunk: no request is even sent
        assert image.reader.stats.requests == requests
        assert image.stats_snapshot()["failing_chunks"] == [4]
        await trio.sleep(0.3)
        return other, await image.read(4 * CHUNK, 10), image.stats_snapshot()["failing_chunks"]

    tuning = ImageTuning(readahead_chunks=0, retry_after_s=0.2)
    other, data, failing = run_with_layer(LayerSource(str(blob)), body, tuning=tuning)
    assert other == IMAGE[6 * CHUNK:6 * CHUNK + 10]
    assert data == IMAGE[4 * CHUNK:4 * CHUNK + 10]
    assert failing == []


def test_read_past_end_is_empty(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        return await image.read(len(IMAGE), 4096), await image.read(len(IMAGE) + 10**9, 1)

    assert run_with_layer(LayerSource(str(blob)), body) == (b"", b"")


def test_vectors_read_back(vectors_dir: Path) -> None:
    import hashlib

    for descriptor in sorted(vectors_dir.glob("*.descriptor.json")):
        blob_path = descriptor.with_name(descriptor.name.replace(".descriptor.json", ".blob"))
        listing = json.loads(descriptor.with_name(
            descriptor.name.replace(".descriptor.json", ".files.json")).read_text())
        data = run_with_layer(LayerSource(str(blob_path)), read_all)
        assert hashlib.sha256(data).hexdigest() == listing["raw_erofs_sha256"]


def test_read_spanning_a_bad_chunk_leaves_no_claim_behind(blob: Path) -> None:
    """A read that fails on a chunk remembered as bad must not leave the chunks before it
    claimed: a later read of those would wait for a load nobody started, forever."""

    async def body(image: RemoteImage) -> object:
        start, end = image.metadata.frame_range(1)
        flip_byte(blob, (start + end) // 2)  # the reader holds the same file open
        with pytest.raises(ImageReadError):
            await image.read(CHUNK, 10)
        with pytest.raises(ImageReadError):
            await image.read(0, 2 * CHUNK)  # chunk 0 is missing, chunk 1 is bad
        with trio.fail_after(5):
            return await image.read(0, 10)

    assert run_with_layer(LayerSource(str(blob)), body, tuning=NO_READAHEAD) == IMAGE[:10]


def test_finished_load_does_not_fail_a_later_load_of_the_same_chunk(
    blob: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk completed early in a run and gone from the cache (here: a cache too small to
    keep it) may be claimed again while the run still decodes its other chunks; the run's
    end must not fail that newer load, whose own completion would then find no claim."""
    from lazyfs.layer import whole_frames

    real = whole_frames.decode_frame
    decodes: list[int] = []

    def slow(metadata: Any, chunk_index: int, frame: bytes, offset: int) -> bytes:
        import time

        decodes.append(chunk_index)
        if chunk_index == 1:
            time.sleep(0.3)  # the run [0, 1] is still busy after chunk 0 completed
        elif decodes.count(0) == 2:
            time.sleep(0.8)  # the second load of chunk 0 outlasts the run
        return real(metadata, chunk_index, frame, offset)

    monkeypatch.setattr(whole_frames, "decode_frame", slow)

    async def body(image: RemoteImage) -> object:
        results: dict[str, bytes] = {}

        async def first() -> None:
            results["first"] = await image.read(0, 2 * CHUNK)

        async def second() -> None:
            while 0 not in image.stats.chunks_fetched:
                await trio.sleep(0.01)
            results["second"] = await image.read(0, 10)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                nursery.start_soon(second)
            await trio.sleep(1)  # the second load completes in the background nursery
        return results

    tuning = ImageTuning(readahead_chunks=0, partial_frames=False)  # whole frames decode here
    results = run_with_layer(LayerSource(str(blob)), body, cache_bytes=0, tuning=tuning)
    assert results == {"first": IMAGE[:2 * CHUNK], "second": IMAGE[:10]}


def _hashless_blob(directory: Path, image: bytes, name: str, verity: bool) -> LayerSource:
    """A blob whose chunk table carries no frame hashes (algorithm 0), named by annotations."""
    from lazyfs.format.chunk_table import HASH_NONE
    from tests.format import build_blob, make_superblock

    built = build_blob(image, chunk_size=4096, hash_algorithm=HASH_NONE,
                       verity=make_superblock(len(image)) if verity else None)
    path = directory / f"{name}.blob"
    path.write_bytes(built.blob)
    a = built.annotations
    return LayerSource(str(path), chunk_table_offset=a.chunk_table_offset,
                       chunk_digest=a.chunk_digest, verity_offset=a.verity_offset,
                       root_digest=a.root_digest, name=name)


def test_frames_without_hashes_and_without_verity_are_untrusted(tmp_path: Path) -> None:
    """A chunk digest pins a table that authenticates nothing when it lists no frame hashes:
    without a verity root no byte of such a layer can be checked."""
    image = make_image_bytes(3 * 4096 + 100)
    source = _hashless_blob(tmp_path, image, "bare", verity=False)
    with pytest.raises(UntrustedLayerError, match="frame hashes"):
        run_with_layer(source, read_all)
    assert run_with_layer(replace(source, insecure=True), read_all) == image


def test_hashless_layers_with_equal_tables_do_not_share_cached_chunks(tmp_path: Path) -> None:
    """Without frame hashes the chunk table does not name the content (equal frame sizes give
    equal tables): one layer's chunks must not be served as another's, unchecked by its root."""
    import random

    size = 3 * 4096
    first = random.Random(1).randbytes(size)  # incompressible: frames of equal size
    second = random.Random(2).randbytes(size)
    source_a = _hashless_blob(tmp_path, first, "a", verity=True)
    source_b = _hashless_blob(tmp_path, second, "b", verity=True)
    assert source_a.chunk_digest == source_b.chunk_digest
    assert source_a.root_digest != source_b.root_digest

    async def main() -> tuple[bytes, bytes]:
        cache = ChunkCache(1 << 20)
        async with trio.open_nursery() as nursery:
            image_a = await open_layer(source_a, cache=cache, nursery=nursery)
            image_b = await open_layer(source_b, cache=cache, nursery=nursery)
            try:
                return await read_all(image_a), await read_all(image_b)
            finally:
                await image_a.aclose()
                await image_b.aclose()
                nursery.cancel_scope.cancel()

    assert trio.run(main) == (first, second)


def test_corrupt_tree_block_fails_only_its_chunks_of_a_coalesced_run(tmp_path: Path) -> None:
    """A run of adjacent chunks (a long read, readahead) whose tree blocks include a bad one
    fails the chunks that block covers; the others verify and stay readable."""
    image_bytes = make_image_bytes(2 * 1024 * 1024, seed=7)
    blob_path, result = write_blob(tmp_path, image_bytes, chunk_size=CHUNK)
    verity_payload = result.annotations.verity_offset + SKIPPABLE_HEADER_SIZE
    # Level-0 block 2 (after the superblock block and level 1) covers chunks 8-11.
    flip_byte(blob_path, verity_payload + 4096 * (2 + 2) + 10)

    async def body(image: RemoteImage) -> object:
        with pytest.raises(ImageReadError):
            await image.read(11 * CHUNK, 2 * CHUNK)  # chunks 11 and 12, fetched as one run
        stats = image.stats_snapshot()
        return await image.read(12 * CHUNK, CHUNK), stats["bad_chunks"], stats["partial_chunks"]

    for partial in (True, False):
        tuning = ImageTuning(readahead_chunks=0, partial_frames=partial)
        data, bad, kept = run_with_layer(LayerSource(str(blob_path)), body, tuning=tuning)
        assert data == image_bytes[12 * CHUNK:13 * CHUNK]
        # Whole frames fail chunk 11; a partial frame keeps it, failing the blocks under the
        # bad hash block (all of chunk 11's).
        assert (bad, kept) == (([], [11]) if partial else ([11], []))


def test_trace_records_fetches_hits_and_bad_chunks(blob: Path, tmp_path: Path) -> None:
    from lazyfs.layer.stats import TraceWriter

    flip_byte(blob, 3 * CHUNK // 4 + 100)
    trace_path = tmp_path / "trace.jsonl"
    trace = TraceWriter.open(str(trace_path))

    async def body(image: RemoteImage) -> object:
        bad = bisect.bisect_right(image.metadata.table.frame_offsets, 3 * CHUNK // 4 + 100) - 1
        await image.read(9 * CHUNK, 100)
        await image.read(9 * CHUNK + 200, 100)
        with pytest.raises(ImageReadError):
            await image.read(bad * CHUNK, 100)
        return bad

    bad = run_with_layer(LayerSource(str(blob)), body, tuning=NO_READAHEAD, trace=trace)
    trace.close()
    records = [json.loads(line) for line in trace_path.read_text().splitlines()]
    assert [(r["chunk"], r["event"]) for r in records] == [(9, "fetch"), (9, "hit"),
                                                             (bad, "bad")]
    fetch = records[0]
    assert fetch["reason"] == "read" and fetch["layer"] == "layer.blob"
    assert fetch["bytes"] > 0 and fetch["latency_ms"] >= 0 and fetch["t"] >= 0


def test_closing_a_layer_ends_the_loads_in_flight_before_its_readers_close(
        blob: Path) -> None:
    """A load still running when the layer closes (a readahead nobody waits for) is
    cancelled, not left to use a closed reader (httpx raises RuntimeError for that)."""
    ended: list[str] = []

    async def body(image: RemoteImage) -> None:
        async def load() -> None:
            with image.loader.load_scope(trio.current_time() + 60):
                try:
                    await trio.sleep_forever()
                finally:
                    ended.append("cancelled")

        with trio.fail_after(10):  # not the loads' own 60 s
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load)
                await trio.sleep(0.01)
                await image.aclose()
            assert ended == ["cancelled"]
            # And a load that starts after it is cancelled at once.
            with image.loader.load_scope(trio.current_time() + 60):
                await trio.sleep_forever()
            ended.append("late load cancelled")

    run_with_layer(LayerSource(str(blob)), body)
    assert ended == ["cancelled", "late load cancelled"]
