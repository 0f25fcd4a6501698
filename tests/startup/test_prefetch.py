"""Background loads of one layer: a recorded list replayed without reads, reads that go first,
the fill at its rate cap, the cache limit, and the recorder that writes lists."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pytest
import trio

from lazyfs.format.prefetch_list import (
    LayerPrefetch,
    PrefetchList,
    PrefetchListError,
    parse_prefetch_list,
)
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource
from lazyfs.startup.prefetch import (
    AccessRecorder,
    BackgroundLoader,
    PrefetchOptions,
    plan_lists,
)
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support import nginx
from tests.support.nginx import NginxServer
from tools.linkemu import run_link_emulator

nginx_server = nginx.nginx_server

CHUNK = 64 * 1024
IMAGE = make_image_bytes(12 * CHUNK + 999)
NO_READAHEAD = ImageTuning(readahead_chunks=0)


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    return write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]


def entry_for(image: RemoteImage, chunks: tuple[int, ...]) -> LayerPrefetch:
    digest = image.metadata.annotations.chunk_digest
    assert digest is not None
    return LayerPrefetch(digest, image.metadata.table.chunk_count, chunks, image.name)


def loader_for(image: RemoteImage, chunks: tuple[int, ...], **options: object) -> BackgroundLoader:
    prefetch = PrefetchOptions(prefetch_list=PrefetchList((entry_for(image, chunks),)),
                               list_source="list.json", **options)  # type: ignore[arg-type]
    return BackgroundLoader([image], plan_lists([image], [None], prefetch), prefetch)


def test_recorded_list_replays_without_reads(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        await loader_for(image, (5, 6, 7, 2)).run()
        fetched = image.reader.stats.requests
        data = await image.read(5 * CHUNK, 3 * CHUNK) + await image.read(2 * CHUNK, CHUNK)
        return image.background.snapshot(), fetched, image.reader.stats.requests, data

    stats, after_prefetch, after_reads, data = run_with_layer(
        LayerSource(str(blob)), body, tuning=NO_READAHEAD)
    assert data == IMAGE[5 * CHUNK:8 * CHUNK] + IMAGE[2 * CHUNK:3 * CHUNK]
    assert after_reads == after_prefetch  # every read was a cache hit
    # 5-7 adjacent: one request; 2 another.
    assert stats["prefetch_requests"] == 2
    assert stats["prefetched_chunks"] == 4
    assert stats["listed_chunks"] == 4
    assert stats["state"] == "done"
    assert stats["prefetch_bytes"] > 0


def test_requests_are_capped_and_cached_chunks_skipped(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        await image.read(3 * CHUNK, 10)
        await loader_for(image, tuple(range(6)), request_bytes=1).run()
        return image.background.snapshot()

    stats = run_with_layer(LayerSource(str(blob)), body, tuning=NO_READAHEAD)
    assert stats["skipped_chunks"] == 1
    assert stats["prefetch_requests"] == 5  # one chunk a request at a 1-byte cap
    assert stats["prefetched_chunks"] == 5


@pytest.mark.parametrize(("during_reads", "allowed"), [(0, 0), (2, 2)])
def test_background_loads_wait_while_a_demand_fetch_is_pending(
    blob: Path, during_reads: int, allowed: int
) -> None:
    """While a read's fetch is pending, at most `requests_during_reads` background requests
    are in flight (one chunk a request here); the rest start once it is done."""
    async def body(image: RemoteImage) -> object:
        before = image.reader.stats.requests
        image.demand.begin()  # as a read that claimed a chunk does
        done = trio.Event()
        slow_read = image.reader.read

        async def slow(offset: int, size: int) -> bytes:
            await trio.sleep(0.05)  # still in flight when the others would start
            return await slow_read(offset, size)

        image.reader.read = slow  # type: ignore[method-assign]

        async def prefetch() -> None:
            await loader_for(image, (0, 2, 4, 6), request_bytes=1,
                             requests_during_reads=during_reads).run()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetch)
            await trio.sleep(0.3)
            held = image.reader.stats.requests - before
            image.demand.end()
            with trio.fail_after(10):
                await done.wait()
        return held, image.background.prefetched_chunks

    requests_while_held, prefetched = run_with_layer(LayerSource(str(blob)), body,
                                                     tuning=NO_READAHEAD)
    assert requests_while_held == allowed
    assert prefetched == 4


def test_fill_fetches_every_chunk_at_its_rate_cap(blob: Path) -> None:
    rate = 400 * 1024

    async def body(image: RemoteImage) -> object:
        prefetch = PrefetchOptions(fill=True, fill_rate_bytes=rate, request_bytes=1)
        started = trio.current_time()
        await BackgroundLoader([image], [()], prefetch).run()
        return trio.current_time() - started, image.background.snapshot(), image

    elapsed, stats, image = run_with_layer(LayerSource(str(blob)), body)
    count = image.metadata.table.chunk_count
    assert stats["filled_chunks"] == count
    assert stats["fill_requests"] == count
    assert stats["state"] == "done"
    # Paced: each request waits until the previous one's bytes are "paid" at the rate.
    last = image.metadata.frame_range(count - 1)
    assert elapsed >= (stats["fill_bytes"] - (last[1] - last[0])) / rate * 0.95


def test_background_loads_stop_when_the_cache_is_full(blob: Path) -> None:
    async def body(image: RemoteImage) -> object:
        await BackgroundLoader([image], [()], PrefetchOptions(
            fill=True, fill_rate_bytes=1 << 40, request_bytes=CHUNK)).run()
        return image.background.snapshot(), image.cache.evictions

    # Room for four chunks, and for the dm-verity hash blocks the cache keeps with them.
    stats, evictions = run_with_layer(LayerSource(str(blob)), body,
                                      cache_bytes=4 * CHUNK + 32 * 1024)
    assert stats["state"] == "stopped: cache full"
    assert stats["filled_chunks"] == 4
    assert evictions == 0


def test_list_for_other_layers_is_refused(blob: Path, tmp_path: Path) -> None:
    other = write_blob(tmp_path, make_image_bytes(3 * CHUNK, seed=7), "other", chunk_size=CHUNK)

    async def body(image: RemoteImage) -> object:
        foreign = LayerPrefetch("sha512:" + other[1].annotations.chunk_digest[7:], 3, (0,),
                                "other")
        options = PrefetchOptions(prefetch_list=PrefetchList((foreign,)), list_source="x.json")
        with pytest.raises(PrefetchListError, match=r"x\.json: recorded for other layers"):
            plan_lists([image], [None], options)
        wrong_count = PrefetchOptions(prefetch_list=PrefetchList((
            LayerPrefetch(entry_for(image, ()).chunk_digest, 99, (0,)),)), list_source="y")
        with pytest.raises(PrefetchListError, match="the list has 99 chunks, the layer 13"):
            plan_lists([image], [None], wrong_count)
        return True

    assert run_with_layer(LayerSource(str(blob)), body)


def test_carried_list_of_another_chunk_table_is_ignored_with_a_warning(
    blob: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(image: RemoteImage) -> object:
        stale = LayerPrefetch("sha512:" + "00" * 64, 13, (0, 1))
        good = entry_for(image, (4, 5))
        options = PrefetchOptions()
        return (plan_lists([image], [stale], options), plan_lists([image], [good], options),
                plan_lists([image], [good], PrefetchOptions(use_image_lists=False)))

    with caplog.at_level(logging.WARNING):
        stale_plan, good_plan, disabled = run_with_layer(LayerSource(str(blob)), body)
    assert stale_plan == [()]
    assert good_plan == [(4, 5)]
    assert disabled == [()]
    assert "was recorded for the chunk table sha512:0000" in caplog.text
    assert "ignored" in caplog.text


def test_recorder_writes_first_reads_in_order(blob: Path, tmp_path: Path) -> None:
    recorder = AccessRecorder()

    async def body(image: RemoteImage) -> object:
        image.on_read = recorder.hook(image)
        for offset, size in ((3 * CHUNK + 5, 10), (CHUNK, CHUNK + 1), (3 * CHUNK, 1), (0, 1)):
            await image.read(offset, size)
        return entry_for(image, ()).chunk_digest

    digest = run_with_layer(LayerSource(str(blob)), body)
    recorder.write(str(tmp_path / "list.json"))
    recorded = parse_prefetch_list((tmp_path / "list.json").read_bytes(), "list.json")
    layer = recorded.for_digest(digest)
    assert layer is not None
    assert layer.chunks == (3, 1, 2, 0)
    assert layer.name == "layer.blob"
    # And the 4 KiB blocks of the raw image, in the order reads first touched them.
    per_chunk = CHUNK // 4096
    assert layer.block_size == 4096 and layer.image_size == len(IMAGE)
    assert layer.blocks == (3 * per_chunk, *range(per_chunk, 2 * per_chunk + 1), 0)
    assert list(tmp_path.glob("*.partial-*")) == []


@pytest.mark.network
def test_a_read_overtakes_a_long_prefetch(tmp_path: Path, nginx_server: object) -> None:
    # Incompressible chunks behind a slow link: the prefetch of all of them takes seconds.
    image_bytes = random.Random(3).randbytes(32 * CHUNK)
    write_blob(tmp_path, image_bytes, chunk_size=CHUNK)
    server: NginxServer = nginx_server(tmp_path)  # type: ignore[operator]

    async def main() -> tuple[float, dict[str, object], bytes]:
        async with trio.open_nursery() as nursery:
            # 2 Mbit/s per connection: a 64 KiB chunk takes about 0.3 s.
            port = await nursery.start(run_link_emulator, "127.0.0.1", 0, "127.0.0.1",
                                       server.port, 10, 2)
            source = LayerSource(f"http://127.0.0.1:{port}/layer.blob")

            async def body(image: RemoteImage) -> tuple[float, dict[str, object], bytes]:
                loader = loader_for(image, tuple(range(32)), request_bytes=CHUNK)
                async with trio.open_nursery() as background:
                    background.start_soon(loader.run)
                    await trio.sleep(0.5)
                    started = time.monotonic()
                    data = await image.read(31 * CHUNK, 100)
                    latency = time.monotonic() - started
                    snapshot = image.background.snapshot()
                    background.cancel_scope.cancel()
                return latency, snapshot, data

            result = await trio.to_thread.run_sync(
                lambda: run_with_layer(source, body, tuning=NO_READAHEAD))
            nursery.cancel_scope.cancel()
            return result  # type: ignore[no-any-return]

    latency, stats, data = trio.run(main)
    assert data == image_bytes[31 * CHUNK:31 * CHUNK + 100]
    assert stats["state"] == "prefetching"
    assert stats["prefetched_chunks"] < 16  # type: ignore[operator]
    assert latency < 2.0


def test_no_reading_ahead_while_a_list_is_replayed_and_again_after(blob: Path) -> None:
    """The list says what comes next: readahead and chunks following a miss would only
    compete with it for the link, until it is done."""
    async def body(image: RemoteImage) -> object:
        loader = loader_for(image, (10, 11))
        for offset in range(0, 3 * CHUNK, 16384):  # sequential: readahead, else
            await image.read(offset, 16384)
        during = image.stats.readahead_chunks, image.replaying_list
        await loader.run()
        for offset in range(4 * CHUNK, 7 * CHUNK, 16384):
            await image.read(offset, 16384)
        return during, image.stats.readahead_chunks, image.replaying_list

    during, after, replaying = run_with_layer(LayerSource(str(blob)), body,
                                              tuning=ImageTuning(readahead_chunks=2))
    assert during == (0, True)
    assert after > 0 and not replaying


def test_reads_that_follow_the_list_read_nothing_ahead_once_it_is_loaded(blob: Path) -> None:
    """What the list leaves out after the chunks it names was not read when it was recorded:
    reads among its chunks read nothing ahead (from the disk in a warm start, that took CPU
    the container needed), reads elsewhere do."""
    async def body(image: RemoteImage) -> object:
        await loader_for(image, (0, 1, 2, 3)).run()
        for offset in range(0, 4 * CHUNK, 16384):  # sequential, among the listed chunks
            await image.read(offset, 16384)
        following = image.stats.readahead_chunks
        for offset in range(6 * CHUNK, 9 * CHUNK, 16384):
            await image.read(offset, 16384)
        return following, image.stats.readahead_chunks

    following, elsewhere = run_with_layer(LayerSource(str(blob)), body,
                                          tuning=ImageTuning(readahead_chunks=2))
    assert following == 0
    assert elsewhere > 0


def test_recorder_copies_the_layers_layout_fingerprint(
    blob: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lazyfs.startup.prefetch as prefetch_module

    recorder = AccessRecorder()
    monkeypatch.setattr(prefetch_module, "layout_of", lambda image: "ab" * 16)

    async def body(image: RemoteImage) -> object:
        image.on_read = recorder.hook(image)
        await image.read(CHUNK, 10)
        return None

    run_with_layer(LayerSource(str(blob)), body)
    recorder.write(str(tmp_path / "list.json"))
    (layer,) = parse_prefetch_list((tmp_path / "list.json").read_bytes(), "list.json").layers
    assert layer.layout == "ab" * 16 and layer.blocks == (CHUNK // 4096,)


def test_layout_of_reads_the_parsed_annotation() -> None:
    from types import SimpleNamespace

    from lazyfs.startup.prefetch import layout_of

    def image(**annotations: object) -> RemoteImage:
        return SimpleNamespace(  # type: ignore[return-value]
            metadata=SimpleNamespace(annotations=SimpleNamespace(**annotations)))

    assert layout_of(image(layout="cd" * 16)) == "cd" * 16
    assert layout_of(image(layout=None)) == ""  # a layer without one
