"""Faults stay small and short, at the image layer: a real HTTP server on 127.0.0.1 that
injects faults (tests/support/fault_server.py) behind a RemoteImage. Integrity failures and
failed fetches are per chunk and pass; a source nobody can reach fails fast and is logged
once; a read is bounded in time; unmount ends fetches at once; a second source is used."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from lazyfs.fetch.base import ReaderOptions, SpeedLimit
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.health import LayerHealth
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import AlternateBlob, LayerSource
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support.fault_server import Fault, FaultServer

CHUNK = 64 * 1024
IMAGE = make_image_bytes(12 * CHUNK + 999, seed=31)
FAST = ReaderOptions(max_retries=2, backoff_base_s=0.01, low_speed=SpeedLimit(4096, 0.5))
TUNING = ImageTuning(readahead_chunks=0, read_timeout_s=2.0, bad_retry_after_s=0.3,
                     retry_after_s=0.2)


# -- the policy alone ----------------------------------------------------------------------


def test_bad_chunks_expire_and_back_off_while_they_keep_failing() -> None:
    health = LayerHealth("l", ImageTuning(bad_retry_after_s=10))
    assert health.chunk_bad(3, "digest", now=0) is True
    assert health.chunk_bad(3, "digest", now=5) is False  # still bad: not news
    assert health.refusal(3, ["s"], now=9.9) is not None
    assert health.refusal(4, ["s"], now=1) is None  # only that chunk
    assert health.refusal(3, ["s"], now=10) is None  # expired: a read tries again
    assert health.chunk_bad(3, "digest", now=10) is True
    assert health.refusal(3, ["s"], now=29) is not None  # twice as long the second time
    assert health.refusal(3, ["s"], now=30) is None
    health.loaded([3], "s")
    assert health.bad_chunks(now=30) == []
    for count in range(10):  # capped at ten times the first hold
        health.chunk_bad(7, "digest", now=1000.0 * count)
    assert health.refusal(7, ["s"], now=9000 + 100.1) is None


def test_failed_fetches_hold_off_their_chunks_only() -> None:
    health = LayerHealth("l", ImageTuning(retry_after_s=1, retry_max_s=4))
    health.fetch_failed([5, 6], "503", now=0)
    assert health.failing_chunks(now=0.5) == [5, 6]
    assert health.refusal(7, ["s"], now=0.5) is None
    assert health.refusal(5, ["s"], now=1.0) is None
    for now in (1, 3, 7):
        health.fetch_failed([5], "503", now=now)
    assert health.refusal(5, ["s"], now=7 + 3.9) is not None  # doubled, capped at 4 s
    assert health.refusal(5, ["s"], now=7 + 4) is None


def test_a_source_down_is_logged_once_and_fails_all_its_chunks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = LayerHealth("l", ImageTuning(retry_after_s=1))
    with caplog.at_level(logging.INFO, logger="lazyfs.layer.health"):
        for now in (0, 1, 3, 7):
            health.source_unreachable("http://a/", "refused", now=now)
        assert health.refusal(1, ["http://a/"], now=7.5) == "source unreachable (refused)"
        # Another source that answers keeps the layer readable.
        assert health.refusal(1, ["http://a/", "http://b/"], now=7.5) is None
        health.answered("http://a/")
        health.answered("http://a/")
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "unreachable" in caplog.records[0].getMessage()
    assert "answers again" in caplog.records[1].getMessage()


# -- over a faulty server --------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Path:
    directory = tmp_path / "served"
    directory.mkdir()
    write_blob(directory, IMAGE, chunk_size=CHUNK)
    return directory


@pytest.fixture
def server(served: Path) -> Iterator[FaultServer]:
    with FaultServer(served) as running:
        yield running


def source(server: FaultServer, *alternates: FaultServer) -> LayerSource:
    return LayerSource(
        server.url + "layer.blob", descriptor=str(server.root / "layer.descriptor.json"),
        reader_options=FAST,
        alternates=tuple(AlternateBlob(other.url + "layer.blob", FAST) for other in alternates),
    )


def frame_offset(image: RemoteImage, index: int) -> int:
    start, end = image.metadata.frame_range(index)
    return (start + end) // 2


pytestmark = pytest.mark.network


def test_one_corrupted_response_is_refetched_and_forgotten(server: FaultServer) -> None:
    async def body(image: RemoteImage) -> object:
        server.add(Fault("corrupt", at=frame_offset(image, 5), times=1))
        return await image.read(5 * CHUNK, CHUNK), image.stats_snapshot()

    data, stats = run_with_layer(source(server), body, tuning=TUNING)
    assert data == IMAGE[5 * CHUNK:6 * CHUNK]
    assert stats["refetches"] == 1 and stats["verify_failures"] == 0
    assert stats["bad_chunks"] == []


def test_a_chunk_corrupted_every_time_is_bad_for_a_while_then_tried_again(
    server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(image: RemoteImage) -> object:
        server.add(Fault("corrupt", at=frame_offset(image, 5)))
        with pytest.raises(ImageReadError, match=r"chunk 5: verification failed: .*SHA-512"):
            await image.read(5 * CHUNK, 10)
        fetches = len(server.range_requests("corrupt"))
        with pytest.raises(ImageReadError, match="chunk 5: failed verification"):
            await image.read(5 * CHUNK, 10)  # remembered: no fetch
        assert len(server.range_requests("corrupt")) == fetches
        others = await image.read(6 * CHUNK, CHUNK)  # every other chunk reads
        bad = image.stats_snapshot()["bad_chunks"]
        server.clear()  # the origin is fixed, or the proxy's bad copy expired
        await trio.sleep(0.35)
        return fetches, others, bad, await image.read(5 * CHUNK, CHUNK), image.stats_snapshot()

    with caplog.at_level(logging.ERROR):
        fetches, others, bad, data, stats = run_with_layer(source(server), body, tuning=TUNING)
    assert fetches == 1 + TUNING.refetches
    assert others == IMAGE[6 * CHUNK:7 * CHUNK]
    assert bad == [5] and stats["bad_chunks"] == []
    assert data == IMAGE[5 * CHUNK:6 * CHUNK]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_refetches_come_from_the_other_source(served: Path, server: FaultServer) -> None:
    with FaultServer(served) as registry:
        async def body(image: RemoteImage) -> object:
            server.add(Fault("corrupt", at=frame_offset(image, 2)))  # the mirror, for good
            return await image.read(2 * CHUNK, CHUNK), image.stats_snapshot()

        data, stats = run_with_layer(source(server, registry), body, tuning=TUNING)
        assert data == IMAGE[2 * CHUNK:3 * CHUNK]
        assert stats["refetches"] == 1 and stats["bad_chunks"] == []
        assert len(registry.range_requests()) >= 1


def test_a_failed_fetch_is_tried_on_the_other_source(served: Path, server: FaultServer) -> None:
    with FaultServer(served) as registry:
        async def body(image: RemoteImage) -> object:
            server.add(Fault("status", at=frame_offset(image, 3)))
            return await image.read(3 * CHUNK, CHUNK), image.stats_snapshot()

        data, stats = run_with_layer(source(server, registry), body, tuning=TUNING)
        assert data == IMAGE[3 * CHUNK:4 * CHUNK]
        assert stats["fetch_failures"] == 0 and stats["failing_chunks"] == []


def test_a_permanently_failing_range_blocks_no_other(server: FaultServer) -> None:
    async def body(image: RemoteImage) -> object:
        server.add(Fault("status", at=frame_offset(image, 4)))
        with pytest.raises(ImageReadError, match="HTTP 503"):
            await image.read(4 * CHUNK, 10)
        others = [await image.read(index * CHUNK, CHUNK) for index in range(12) if index != 4]
        return others, image.stats_snapshot()

    tuning = ImageTuning(readahead_chunks=0, read_timeout_s=2.0, retry_after_s=30)
    others, stats = run_with_layer(source(server), body, tuning=tuning)
    assert b"".join(others) == IMAGE[:4 * CHUNK] + IMAGE[5 * CHUNK:12 * CHUNK]
    assert stats["fetch_failures"] == 1 and stats["failing_chunks"] == [4]


def test_etag_and_last_modified_changing_at_every_answer(server: FaultServer) -> None:
    server.etag_per_response = True

    async def body(image: RemoteImage) -> object:
        return bytes(await image.read(0, len(IMAGE))), image.stats_snapshot()

    data, stats = run_with_layer(source(server), body, tuning=TUNING)
    assert data == IMAGE and stats["fetch_failures"] == 0


def test_a_source_nobody_can_reach_fails_fast_logged_once_and_comes_back(
    served: Path, server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(image: RemoteImage) -> object:
        server.stop()  # opened while it ran; now nothing listens on its port
        with pytest.raises(ImageReadError, match="ConnectError"):
            await image.read(CHUNK, 10)
        started = time.monotonic()
        for index in range(2, 10):
            with pytest.raises(ImageReadError, match="source unreachable"):
                await image.read(index * CHUNK, 10)
        fast = time.monotonic() - started
        with FaultServer(served, port=server.port):
            await trio.sleep(0.25)  # past the hold-off
            return fast, await image.read(3 * CHUNK, CHUNK)

    with caplog.at_level(logging.INFO):
        fast, data = run_with_layer(source(server), body, tuning=TUNING)
    assert fast < 0.1 and data == IMAGE[3 * CHUNK:4 * CHUNK]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0], warnings
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_read_is_bounded_by_the_read_timeout(server: FaultServer) -> None:
    async def body(image: RemoteImage) -> object:
        server.add(Fault("stall"))
        started = time.monotonic()
        with pytest.raises(ImageReadError):
            await image.read(7 * CHUNK, 10)
        return time.monotonic() - started

    tuning = ImageTuning(readahead_chunks=0, read_timeout_s=1.0)
    slow_source = LayerSource(server.url + "layer.blob", reader_options=ReaderOptions(
        low_speed=SpeedLimit(1, 60)))  # the reader alone would wait a minute
    elapsed = run_with_layer(slow_source, body, tuning=tuning)
    assert 1.0 <= elapsed < 3.0


def test_trickling_server_is_abandoned_by_the_low_speed_limit(server: FaultServer) -> None:
    async def body(image: RemoteImage) -> object:
        server.add(Fault("trickle", at=frame_offset(image, 8), times=1, rate_bytes_per_s=2000))
        started = time.monotonic()
        data = await image.read(8 * CHUNK, CHUNK)
        return data, time.monotonic() - started

    data, elapsed = run_with_layer(source(server), body, tuning=TUNING)
    assert data == IMAGE[8 * CHUNK:9 * CHUNK] and elapsed < 1.5


def test_cancel_fetches_ends_a_stalled_read_at_once(server: FaultServer) -> None:
    async def body(image: RemoteImage) -> object:
        server.add(Fault("stall"))
        outcome: list[float] = []

        async def reader() -> None:
            with pytest.raises(ImageReadError):
                await image.read(9 * CHUNK, 10)
            outcome.append(time.monotonic())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.3)
            cancelled = time.monotonic()
            image.cancel_fetches()
        with pytest.raises(ImageReadError, match="going down"):
            await image.read(10 * CHUNK, 10)
        return outcome[0] - cancelled

    assert run_with_layer(source(server), body, tuning=ImageTuning(read_timeout_s=30)) < 0.2


def test_statistics_are_read_from_other_threads_outside_trio(server: FaultServer) -> None:
    """The snapshotter's metrics server reads them from its own thread."""
    async def body(image: RemoteImage) -> object:
        server.add(Fault("status", at=frame_offset(image, 4)))
        with pytest.raises(ImageReadError):
            await image.read(4 * CHUNK, 10)
        return image

    image = run_with_layer(source(server), body, tuning=replace(TUNING, retry_after_s=30))
    stats = image.stats_snapshot()
    assert stats["failing_chunks"] == [4] and stats["bad_chunks"] == []
