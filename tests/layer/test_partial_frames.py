"""Partial frames (lazyfs/layer/frame_stream.py) against a server that stalls mid-frame: reads
answered from the verified prefix of a frame still arriving, one request for all its readers,
a corrupt tail never served (forged frames that decode cleanly included: dm-verity catches the
forged block before it is served), and without dm-verity frames served only whole."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from lazyfs.format.chunk_table import chunk_table_digest, serialize_chunk_table
from lazyfs.format.descriptor import parse_descriptor
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning, PrefetchOptions
from lazyfs.startup.open import LayerSource
from lazyfs.startup.prefetch import BackgroundLoader
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support.forge import blob_metadata, forge_layer
from tests.support.stalling_server import StallingServer

pytestmark = pytest.mark.network

CHUNK = 1024 * 1024
NOISE = random.Random(41).randbytes(CHUNK)  # chunk 1: stored in raw zstd blocks
IMAGE = make_image_bytes(CHUNK, seed=41) + NOISE + make_image_bytes(CHUNK - 5000, seed=42)
NO_READAHEAD = ImageTuning(readahead_chunks=0)
BLOB = "/layer.blob"


def frame_of(image: RemoteImage, index: int) -> tuple[int, int]:
    start, end = image.metadata.frame_range(index)
    return start, end - start


async def read_in_background(image: RemoteImage, offset: int, size: int,
                             nursery: trio.Nursery) -> dict[str, bytes | Exception]:
    """Start a read; its outcome appears in the returned dict as "data" or "error"."""
    outcome: dict[str, bytes | Exception] = {}

    async def read() -> None:
        try:
            outcome["data"] = await image.read(offset, size)
        except ImageReadError as exc:
            outcome["error"] = exc

    nursery.start_soon(read)
    return outcome


def test_a_read_is_answered_before_its_frame_has_arrived(tmp_path: Path) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> None:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size // 2)
            with trio.fail_after(10):
                assert await image.read(CHUNK + 5000, 4096) == NOISE[5000:9096]
            assert await trio.to_thread.run_sync(server.wait_stalled)
            assert 1 not in image.stats.chunks_fetched
            async with trio.open_nursery() as nursery:
                tail = await read_in_background(image, 2 * CHUNK - 4096, 4096, nursery)
                await trio.sleep(0.3)
                assert not tail  # its blocks have not come yet
                gate.set()
            assert tail == {"data": NOISE[-4096:]}
            assert 1 in image.stats.chunks_fetched  # and the whole chunk is in the cache now
            requests = len(server.requests)
            assert await image.read(CHUNK, CHUNK) == NOISE and len(server.requests) == requests

        run_with_layer(LayerSource(server.url + "layer.blob"), body, tuning=NO_READAHEAD)


def test_readers_of_a_frame_in_flight_share_its_request(tmp_path: Path) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> None:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size // 2)
            offsets = [CHUNK + step * 100_003 for step in range(10)]
            async with trio.open_nursery() as nursery:
                outcomes = [await read_in_background(image, offset, 3000, nursery)
                            for offset in offsets]
                with trio.fail_after(10):
                    while not outcomes[0]:
                        await trio.sleep(0.01)
                gate.set()
            for offset, outcome in zip(offsets, outcomes, strict=True):
                assert outcome == {"data": IMAGE[offset:offset + 3000]}
            assert [r for r in server.requests if r[0] == BLOB and r[1] == start] == [
                (BLOB, start, start + size - 1)]

        run_with_layer(LayerSource(server.url + "layer.blob"), body, tuning=NO_READAHEAD)


def frame_requests(server: StallingServer, image: RemoteImage, index: int) -> int:
    """How many requests asked for bytes of chunk `index`'s frame."""
    start, size = frame_of(image, index)
    return sum(1 for path, first, last in server.requests
               if path == BLOB and first < start + size and start <= last)


def test_a_read_is_answered_from_a_prefetch_in_flight_without_a_second_request(
    tmp_path: Path
) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> None:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size // 2)
            loader = BackgroundLoader([image], [(1,)], PrefetchOptions(request_bytes=size))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(loader.run)
                assert await trio.to_thread.run_sync(server.wait_stalled)
                with trio.fail_after(10):  # from the prefetch's stream, before it ends
                    assert await image.read(CHUNK + 5000, 4096) == NOISE[5000:9096]
                assert not image.needs_fetch(1) and image.claim_for_background([1]) == []
                tail = await read_in_background(image, 2 * CHUNK - 4096, 4096, nursery)
                await trio.sleep(0.3)
                assert not tail
                gate.set()
            assert tail == {"data": NOISE[-4096:]}
            assert frame_requests(server, image, 1) == 1
            assert image.background.prefetched_chunks == 1
            assert await image.read(CHUNK, CHUNK) == NOISE

        run_with_layer(LayerSource(server.url + "layer.blob"), body, tuning=NO_READAHEAD)


def test_a_prefetch_skips_a_chunk_streaming_for_readahead(tmp_path: Path) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> None:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size // 2)
            assert await image.read(0, CHUNK) == IMAGE[:CHUNK]  # streams: readahead of 1
            assert await trio.to_thread.run_sync(server.wait_stalled)
            with trio.fail_after(10):
                await BackgroundLoader([image], [(1, 2)], PrefetchOptions()).run()
            assert image.background.skipped_chunks == 1
            assert image.background.prefetched_chunks == 1  # chunk 2
            gate.set()
            with trio.fail_after(10):
                assert await image.read(CHUNK, CHUNK) == NOISE
            assert frame_requests(server, image, 1) == 1

        run_with_layer(LayerSource(server.url + "layer.blob"), body,
                       tuning=ImageTuning(readahead_chunks=1))


@pytest.mark.parametrize("table", [False, True], ids=["frame-hash", "verity-alone"])
def test_a_forged_tail_is_never_served(tmp_path: Path, table: bool,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """The frame's last quarter holds a forged block that decodes cleanly: its first quarter
    is served while the second half is held back, and from the forged block on nothing is.
    With the chunk table forged too (`verity-alone`) only dm-verity can catch it."""
    blob, _ = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    forgery = forge_layer(blob, tmp_path / "layer.descriptor.json", CHUNK + 3 * CHUNK // 4 + 77,
                          table=table)
    assert forgery.chunk_index == 1
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> dict[int, bytes | None]:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size // 2)
            pieces: dict[int, bytes | None] = {}
            for offset in range(CHUNK, 2 * CHUNK, 4096):
                if offset >= CHUNK + CHUNK // 4:  # the first two zstd blocks came: release
                    gate.set()
                try:
                    with trio.fail_after(10):
                        pieces[offset] = await image.read(offset, 4096)
                except ImageReadError:
                    pieces[offset] = None
            with pytest.raises(ImageReadError):  # remembered: no further fetch
                await image.read(CHUNK, 10)
            # Streamed once, fetched again whole `refetches` times, then reported bad.
            assert len([r for r in server.requests if r[1] == start]) == 1 + NO_READAHEAD.refetches
            assert image.stats_snapshot()["bad_chunks"] == [1]
            return pieces

        with caplog.at_level(logging.ERROR):
            pieces = run_with_layer(LayerSource(server.url + "layer.blob"), body,
                                    tuning=NO_READAHEAD)
    forged_page = forgery.image_offset - forgery.image_offset % 4096
    served = [offset for offset, piece in pieces.items() if piece is not None]
    assert pieces[forged_page] is None and max(served) < forged_page
    # What was served is a prefix of the chunk, all of what came before the release among it;
    # a piece of the frame that holds a bad block publishes nothing, so it may stop earlier.
    assert served == list(range(CHUNK, CHUNK + 4096 * len(served), 4096))
    assert len(served) >= CHUNK // 4 // 4096
    for offset in served:
        assert pieces[offset] == IMAGE[offset:offset + 4096]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "chunk 1 " in errors[0]
    assert "dm-verity: data block" in errors[0] or not table


def test_a_frame_failing_its_sha512_at_the_end_is_dropped(tmp_path: Path) -> None:
    """Every block verifies, but the table (authenticated by the descriptor) lists another
    SHA-512 for the frame: blocks already verified were served (dm-verity vouched for each),
    the frame is not cached, and the readers still waiting fail."""
    blob, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    data = bytearray(blob.read_bytes())
    metadata = blob_metadata(bytes(data), result.annotations)
    digests = list(metadata.table.frame_digests)
    digests[1] = hashlib.sha512(b"another frame").digest()
    payload = serialize_chunk_table(replace(metadata.table, frame_digests=tuple(digests)))
    at = result.annotations.chunk_table_offset + SKIPPABLE_HEADER_SIZE
    data[at:at + len(payload)] = payload
    blob.write_bytes(data)
    descriptor = tmp_path / "layer.descriptor.json"
    document = json.loads(descriptor.read_text())
    document["annotations"]["dev.containerd.erofs.zstd.chunk_digest"] = chunk_table_digest(payload)
    descriptor.write_text(json.dumps(document))
    parse_descriptor(descriptor.read_text())
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> None:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size // 2)
            with trio.fail_after(10):
                assert await image.read(CHUNK, 4096) == NOISE[:4096]
            async with trio.open_nursery() as nursery:
                tail = await read_in_background(image, 2 * CHUNK - 10, 10, nursery)
                gate.set()
            assert "SHA-512 mismatch" in str(tail["error"])
            assert image.stats_snapshot()["bad_chunks"] == [1]
            assert 1 not in image.stats.chunks_fetched

        run_with_layer(LayerSource(server.url + "layer.blob"), body, tuning=NO_READAHEAD)


def test_without_dm_verity_a_frame_is_served_only_whole(tmp_path: Path) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=CHUNK, verity=False)
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> None:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size - 100)
            async with trio.open_nursery() as nursery:
                first = await read_in_background(image, CHUNK, 4096, nursery)
                assert await trio.to_thread.run_sync(server.wait_stalled)
                await trio.sleep(0.3)
                assert not first
                gate.set()
            assert first == {"data": NOISE[:4096]}

        run_with_layer(LayerSource(server.url + "layer.blob"), body, tuning=NO_READAHEAD)


def test_a_frame_stopped_early_is_fetched_again_from_its_start(tmp_path: Path) -> None:
    """`finish_frames` off (for measurements): the transfer stops once nobody waits, nothing
    of the frame is cached, and the next read in it fetches the frame again."""
    write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    with StallingServer(tmp_path) as server:

        async def body(image: RemoteImage) -> None:
            start, size = frame_of(image, 1)
            gate = server.stall(BLOB, start, size // 2)
            assert await image.read(CHUNK + 10, 100) == NOISE[10:110]
            gate.set()  # the rest comes, nobody waits for it: the transfer stops
            await trio.sleep(0.3)
            assert 1 not in image.stats.chunks_fetched
            assert await image.read(2 * CHUNK - 100, 100) == NOISE[-100:]
            assert len([r for r in server.requests if r[1] == start]) == 2

        tuning = ImageTuning(readahead_chunks=0, finish_frames=False)
        run_with_layer(LayerSource(server.url + "layer.blob"), body, tuning=tuning)


def test_a_bad_hash_block_fails_only_the_blocks_under_it(tmp_path: Path) -> None:
    """A level-0 hash block covers 256 KiB: a bad one fails that quarter of a 1 MiB chunk, and
    the chunk's other blocks are served, kept by the layer (not refetched, not cached)."""
    blob, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    assert result.annotations.verity_offset is not None
    payload = result.annotations.verity_offset + SKIPPABLE_HEADER_SIZE
    # 768 data blocks: 12 level-0 blocks at payload offset 8192 under the top block at 4096.
    # Level-0 block 5 covers data blocks 320-383: bytes 256-512 KiB of chunk 1.
    with open(blob, "r+b") as stream:
        stream.seek(payload + 8192 + 5 * 4096 + 99)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 4]))

    async def body(image: RemoteImage) -> tuple[list[bytes | None], dict[str, object]]:
        outcomes: list[bytes | None] = []
        for offset in range(CHUNK, 2 * CHUNK, 128 * 1024):
            try:
                outcomes.append(await image.read(offset, 128 * 1024))
            except ImageReadError:
                outcomes.append(None)
        await trio.sleep(0.2)  # the frame's end: its load is over
        return outcomes, image.stats_snapshot()

    outcomes, stats = run_with_layer(LayerSource(str(blob)), body, tuning=NO_READAHEAD)
    bad = [index for index, data in enumerate(outcomes) if data is None]
    assert bad == [2, 3]
    for index, data in enumerate(outcomes):
        if data is not None:
            start = CHUNK + index * 128 * 1024
            assert data == IMAGE[start:start + 128 * 1024]
    assert stats["partial_chunks"] == [1] and stats["bad_chunks"] == []
    assert stats["verify_failures"] == 1 and stats["chunk_fetches"] == 1
