"""HttpRangeReader against scripted servers (httpx.MockTransport): faults, retries, redirects.

Trio runs on a MockClock that jumps over sleeps, so backoff, Retry-After and timeouts cost no
wall time and the elapsed virtual time can be checked exactly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from lazyfs.fetch.base import ReaderOptions, SpeedLimit
from lazyfs.fetch.body import BodyTooLargeError
from lazyfs.fetch.errors import (
    BlobChangedError,
    FetchError,
    RangeNotSupportedError,
    SourceUnreachableError,
)
from lazyfs.fetch.http import HttpRangeReader, get_small

BLOB = bytes(range(256)) * 40  # 10240 bytes
URL = "https://registry.test/v2/app/blobs/sha256:0123"
CDN = "cdn.test"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def parse_range(request: httpx.Request) -> tuple[int, int]:
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers["Range"])
    assert match, request.headers["Range"]
    return int(match.group(1)), int(match.group(2))


def partial(request: httpx.Request, data: bytes = BLOB, etag: str = '"v1"') -> httpx.Response:
    """A correct 206 answer for the request's range."""
    start, end = parse_range(request)
    return httpx.Response(
        206,
        headers={"Content-Range": f"bytes {start}-{end}/{len(data)}", "ETag": etag},
        content=data[start : end + 1],
    )


class Server:
    """A scripted server: records requests; `faults` answer the first requests (after open)."""

    def __init__(self, faults: list[Callable[[httpx.Request], Any]] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.faults = list(faults or [])
        self.opened = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.opened and self.faults:
            answer = self.faults.pop(0)(request)
            if isinstance(answer, Awaitable):
                answer = await answer
            return answer
        self.opened = True
        return partial(request)

    def reader(self, **options: Any) -> HttpRangeReader:
        options.setdefault("backoff_base_s", 0.01)
        return HttpRangeReader(URL, ReaderOptions(**options), transport=httpx.MockTransport(self))


def test_open_returns_size_and_reads_exact_ranges() -> None:
    server = Server()

    async def main() -> None:
        async with server.reader() as reader:
            assert reader.size == len(BLOB)
            assert await reader.read(0, 1) == BLOB[:1]
            assert await reader.read(1000, 5000) == BLOB[1000:6000]
            assert await reader.read(len(BLOB) - 7, 7) == BLOB[-7:]
            assert await reader.read(50, 0) == b""
            assert reader.stats.requests == 4
            assert reader.stats.bytes_fetched == 1 + 1 + 5000 + 7
            assert (reader.stats.retries, reader.stats.failures) == (0, 0)

    run(main)
    assert [r.headers["Range"] for r in server.requests] == [
        "bytes=0-0",
        "bytes=0-0",
        "bytes=1000-5999",
        f"bytes={len(BLOB) - 7}-{len(BLOB) - 1}",
    ]
    assert all(r.headers["Accept-Encoding"] == "identity" for r in server.requests)


def test_read_without_open_opens_first() -> None:
    server = Server()

    async def main() -> None:
        reader = server.reader()
        assert await reader.read(10, 20) == BLOB[10:30]
        assert reader.size == len(BLOB)
        await reader.aclose()

    run(main)


def test_custom_headers_and_auth_sent_to_origin() -> None:
    server = Server()

    async def main() -> None:
        reader = server.reader(
            headers={"Authorization": "Bearer token-1", "User-Agent": "lazyfs-test"},
            auth=httpx.BasicAuth("user", "pass"),
        )
        await reader.read(0, 10)
        await reader.aclose()

    run(main)
    for request in server.requests:
        assert request.headers["User-Agent"] == "lazyfs-test"
        # httpx applies `auth` last, so it overrides an Authorization header of the same name.
        assert request.headers["Authorization"].startswith("Basic ")


def test_whole_blob_answer_refused_without_reading_body() -> None:
    class Body(httpx.AsyncByteStream):
        iterated = closed = False

        async def __aiter__(self) -> AsyncIterator[bytes]:
            Body.iterated = True
            yield BLOB

        async def aclose(self) -> None:
            Body.closed = True

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(len(BLOB))}, stream=Body())

    async def main() -> None:
        reader = HttpRangeReader(URL, transport=httpx.MockTransport(handler))
        with pytest.raises(RangeNotSupportedError, match=r"bytes=0-0.*200"):
            await reader.open()
        await reader.aclose()

    run(main)
    assert not Body.iterated
    assert Body.closed


def test_wrong_content_range_fails() -> None:
    def shifted(request: httpx.Request) -> httpx.Response:
        start, end = parse_range(request)
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {start + 1}-{end + 1}/{len(BLOB)}"},
            content=BLOB[start + 1 : end + 2],
        )

    server = Server([shifted])

    async def main() -> None:
        async with server.reader() as reader:
            with pytest.raises(FetchError, match=r"bytes=100-199.*bytes 101-200") as info:
                await reader.read(100, 100)
            assert not isinstance(info.value, BlobChangedError)
            assert reader.stats.failures == 1

    run(main)


def short(request: httpx.Request) -> httpx.Response:
    start, end = parse_range(request)
    return httpx.Response(
        206,
        headers={"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"},
        content=BLOB[start:end],  # one byte missing
    )


def test_short_body_retried_then_ok() -> None:
    server = Server([short, short])

    async def main() -> None:
        async with server.reader() as reader:
            assert await reader.read(200, 300) == BLOB[200:500]
            assert (reader.stats.retries, reader.stats.failures) == (2, 0)

    run(main)


def test_short_body_fails_after_max_retries(caplog: pytest.LogCaptureFixture) -> None:
    server = Server([short] * 10)

    async def main() -> None:
        async with server.reader(max_retries=3) as reader:
            with pytest.raises(FetchError, match=r"short body: 299 of 300") as info:
                await reader.read(200, 300)
            assert URL in str(info.value) and "bytes=200-499" in str(info.value)
            assert "4 attempts" in str(info.value)
            assert (reader.stats.retries, reader.stats.failures) == (3, 1)

    with caplog.at_level(logging.DEBUG, logger="lazyfs.fetch"):
        run(main)
    assert len(server.requests) == 1 + 4
    # Retries are debug lines; the failure is raised, not logged: its caller reports it.
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert sum("bytes=200-499" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_server_errors_and_throttling_retried(status: int) -> None:
    server = Server([lambda request: httpx.Response(status, text="busy")] * 2)

    async def main() -> None:
        async with server.reader() as reader:
            assert await reader.read(0, 100) == BLOB[:100]
            assert reader.stats.retries == 2

    run(main)


def test_retry_after_honoured_and_capped() -> None:
    def throttled(seconds: str) -> Callable[[httpx.Request], httpx.Response]:
        return lambda request: httpx.Response(429, headers={"Retry-After": seconds})

    server = Server([throttled("3"), throttled("86400")])

    async def main() -> None:
        async with server.reader(backoff_base_s=0.001) as reader:
            started = trio.current_time()
            await reader.read(0, 10)
            waited = trio.current_time() - started
            assert 3 + 10 <= waited < 3 + 10 + 1  # 3 s as asked, then the 10 s cap

    run(main)


def test_client_error_fails_at_once(caplog: pytest.LogCaptureFixture) -> None:
    server = Server([lambda request: httpx.Response(404, text="no such blob")] * 5)

    async def main() -> None:
        async with server.reader() as reader:
            with pytest.raises(FetchError, match=r"bytes=0-99: HTTP 404 Not Found") as info:
                await reader.read(0, 100)
            assert URL in str(info.value)
            assert (reader.stats.retries, reader.stats.failures) == (0, 1)

    with caplog.at_level(logging.WARNING):
        run(main)
    assert len(server.requests) == 2
    assert not caplog.records  # raised, not logged: its caller reports it


def test_connection_error_retried() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset by peer", request=request)

    server = Server([refuse, reset])

    async def main() -> None:
        async with server.reader() as reader:
            assert await reader.read(5, 5) == BLOB[5:10]
            assert reader.stats.retries == 2

    run(main)


def test_connection_errors_exhaust_retries() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset by peer", request=request)

    # Connected once: the source is there, so every attempt is made.
    server = Server([reset] + [refuse] * 10)

    async def main() -> None:
        async with server.reader(max_retries=2) as reader:
            with pytest.raises(FetchError, match=r"3 attempts; last: ConnectError: conn"):
                await reader.read(5, 5)

    run(main)


def test_stalled_server_times_out_and_is_retried() -> None:
    async def stall(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = Server([stall])

    async def main() -> None:
        async with server.reader(connect_timeout_s=1, read_timeout_s=2) as reader:
            started = trio.current_time()
            assert await reader.read(0, 100) == BLOB[:100]
            assert reader.stats.retries == 1
            assert trio.current_time() - started < 10

    run(main)


def test_stalled_server_fails_after_retries() -> None:
    async def stall(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = Server([stall] * 10)

    async def main() -> None:
        async with server.reader(connect_timeout_s=1, read_timeout_s=2, max_retries=1) as reader:
            with pytest.raises(FetchError, match=r"no complete answer within"):
                await reader.read(0, 100)

    run(main)


def test_etag_change_with_the_same_size_is_not_an_error() -> None:
    # Origins behind a load balancer, or a file touched: the frame digests are the check.
    server = Server([lambda request: partial(request, etag='"v2"'),
                     lambda request: partial(request, etag='W/"v3"')])

    async def main() -> None:
        async with server.reader() as reader:
            assert await reader.read(0, 10) == BLOB[:10]
            assert await reader.read(10, 10) == BLOB[10:20]
            assert reader.stats.retries == 0 and reader.stats.failures == 0

    run(main)


def trickle(request: httpx.Request, rate_bytes_per_s: int, stop_after: int | None = None,
            ) -> httpx.Response:
    """A correct 206 answer whose body arrives at `rate_bytes_per_s` (in virtual time), and
    stops for ever after `stop_after` bytes."""
    start, end = parse_range(request)
    data = BLOB[start:end + 1]

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            step = max(1, rate_bytes_per_s // 10)
            for position in range(0, len(data), step):
                if stop_after is not None and position >= stop_after:
                    await trio.sleep_forever()
                await trio.sleep(0.1)
                yield data[position:position + step]

    return httpx.Response(206, headers={"Content-Range": f"bytes {start}-{end}/{len(BLOB)}",
                                        "Content-Length": str(len(data))}, stream=Body())


def test_trickling_body_abandoned_by_the_low_speed_limit_and_retried() -> None:
    server = Server([lambda request: trickle(request, 100)])

    async def main() -> None:
        async with server.reader(low_speed=SpeedLimit(1000, 2)) as reader:
            started = trio.current_time()
            assert await reader.read(0, 8000) == BLOB[:8000]
            assert reader.stats.retries == 1
            # Given up after one window of 2 s, not after the attempt deadline.
            assert trio.current_time() - started < 3

    run(main)


def test_stall_mid_body_abandoned_by_the_low_speed_limit() -> None:
    server = Server([lambda request: trickle(request, 10_000, stop_after=2000)] * 3)

    async def main() -> None:
        async with server.reader(low_speed=SpeedLimit(1000, 2), max_retries=2) as reader:
            started = trio.current_time()
            with pytest.raises(FetchError, match=r"slower than 1000 bytes/s for 2 s "
                                                 r"\(2000 of 8000 bytes\)"):
                await reader.read(0, 8000)
            assert trio.current_time() - started < 3 * 2.5 + 1

    run(main)


def test_a_fast_body_is_not_limited() -> None:
    server = Server([lambda request: trickle(request, 20_000)])

    async def main() -> None:
        async with server.reader(low_speed=SpeedLimit(1000, 1)) as reader:
            assert await reader.read(0, 8000) == BLOB[:8000]
            assert reader.stats.retries == 0

    run(main)


def test_no_headers_within_the_low_speed_time_is_retried() -> None:
    async def stall(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = Server([stall] * 2)

    async def main() -> None:
        async with server.reader(low_speed=SpeedLimit(time_s=1.5), max_retries=1) as reader:
            started = trio.current_time()
            with pytest.raises(FetchError, match=r"last: no answer within 1.5 s"):
                await reader.read(0, 100)
            assert trio.current_time() - started < 4

    run(main)


def test_no_connection_at_all_is_source_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def fail(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    async def main() -> None:
        async with Server([refuse] * 3).reader(max_retries=4) as reader:
            with pytest.raises(SourceUnreachableError,
                               match=r"no connection in 2 attempts; last: ConnectError"):
                await reader.read(5, 5)
            assert reader.stats.retries == 1  # not the whole backoff
        async with Server([refuse] * 3).reader(max_retries=0) as reader:
            with pytest.raises(SourceUnreachableError, match=r"1 attempts; last: ConnectError"):
                await reader.read(5, 5)
        # One attempt that got an answer: the source is there, this range failed.
        async with Server([refuse, fail, refuse]).reader(max_retries=2) as reader:
            with pytest.raises(FetchError) as info:
                await reader.read(5, 5)
            assert not isinstance(info.value, SourceUnreachableError)

    run(main)


def test_size_change_detected() -> None:
    server = Server([lambda request: partial(request, data=BLOB + b"more")])

    async def main() -> None:
        async with server.reader() as reader:
            with pytest.raises(BlobChangedError, match=r"now 10244 bytes, was 10240"):
                await reader.read(0, 10)

    run(main)


def test_expected_size_checked_at_open() -> None:
    async def main() -> None:
        async with Server().reader(expected_size=999) as reader:
            await reader.read(0, 1)

    with pytest.raises(BlobChangedError, match=r"10240 bytes, expected 999"):
        run(main)


def test_read_past_end_refused_without_request() -> None:
    server = Server()

    async def main() -> None:
        async with server.reader() as reader:
            with pytest.raises(FetchError, match=r"bytes=10000-10299.*past the end.*10240"):
                await reader.read(10000, 300)
            with pytest.raises(ValueError):
                await reader.read(-1, 3)

    run(main)
    assert len(server.requests) == 1


def test_empty_blob() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(416, headers={"Content-Range": "bytes */0"})

    async def main() -> None:
        async with HttpRangeReader(URL, transport=httpx.MockTransport(handler)) as reader:
            assert reader.size == 0
            assert await reader.read(0, 0) == b""

    run(main)


def test_encoded_body_refused() -> None:
    def gzipped(request: httpx.Request) -> httpx.Response:
        response = partial(request)
        response.headers["Content-Encoding"] = "gzip"
        return response

    server = Server([gzipped])

    async def main() -> None:
        async with server.reader() as reader:
            with pytest.raises(FetchError, match="gzip-encoded"):
                await reader.read(0, 10)

    run(main)


class Registry:
    """An origin that redirects blob reads to signed CDN URLs, which expire on demand."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.signature = 1
        self.revoked = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == CDN:
            if self.revoked or request.url.params.get("sig") != str(self.signature):
                return httpx.Response(403, text="Request has expired")
            return partial(request)
        if request.headers.get("Authorization") != "Bearer secret":
            return httpx.Response(401)
        location = f"https://{CDN}/blobs/0123?sig={self.signature}"
        return httpx.Response(307, headers={"Location": location})

    def to(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host]


def test_redirect_followed_remembered_and_credentials_not_leaked() -> None:
    registry = Registry()
    stolen: list[httpx.Request] = []

    class Token(httpx.Auth):
        def auth_flow(self, request: httpx.Request) -> Any:
            if request.url.host != "registry.test":
                stolen.append(request)
            request.headers["X-Registry-Token"] = "t0ken"
            yield request

    async def main() -> None:
        reader = HttpRangeReader(
            URL,
            ReaderOptions(headers={"Authorization": "Bearer secret"}, auth=Token()),
            transport=httpx.MockTransport(registry),
        )
        async with reader:
            for offset in (0, 4096, 8192):
                assert await reader.read(offset, 100) == BLOB[offset : offset + 100]

    run(main)
    assert len(registry.to("registry.test")) == 1  # only the probe went to the origin
    assert len(registry.to(CDN)) == 4
    origin = registry.to("registry.test")[0]
    assert origin.headers["X-Registry-Token"] == "t0ken"
    for request in registry.to(CDN):
        assert "Authorization" not in request.headers
        assert "X-Registry-Token" not in request.headers
    assert not stolen


def test_expired_redirect_reresolved_through_origin(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()

    async def main() -> None:
        reader = HttpRangeReader(
            URL, ReaderOptions(headers={"Authorization": "Bearer secret"}),
            transport=httpx.MockTransport(registry),
        )
        async with reader:
            assert await reader.read(0, 10) == BLOB[:10]
            registry.signature = 2  # the first signed URL expires
            assert await reader.read(10, 10) == BLOB[10:20]
            assert await reader.read(20, 10) == BLOB[20:30]
            assert (reader.stats.retries, reader.stats.failures) == (0, 0)

    with caplog.at_level(logging.WARNING):
        run(main)
    assert not caplog.records
    cdn = [r.url.params["sig"] for r in registry.to(CDN)]
    assert cdn == ["1", "1", "1", "2", "2"]
    assert len(registry.to("registry.test")) == 2
    assert all("Authorization" not in r.headers for r in registry.to(CDN))


def test_fresh_redirect_refused_fails_at_once() -> None:
    registry = Registry()

    async def main() -> None:
        reader = HttpRangeReader(
            URL, ReaderOptions(headers={"Authorization": "Bearer secret"}),
            transport=httpx.MockTransport(registry),
        )
        async with reader:
            registry.revoked = True
            with pytest.raises(FetchError, match=r"bytes=0-9: HTTP 403 Forbidden from cdn.test"):
                await reader.read(0, 10)
            assert reader.stats.retries == 0

    run(main)
    # probe via origin; then the remembered URL, the origin once more, its fresh URL: no loop
    assert [r.url.host for r in registry.requests[2:]] == [CDN, "registry.test", CDN]


def test_origin_refusal_without_credentials_fails_at_once() -> None:
    registry = Registry()

    async def main() -> None:
        reader = HttpRangeReader(URL, transport=httpx.MockTransport(registry))
        with pytest.raises(FetchError, match="HTTP 401"):
            await reader.open()
        await reader.aclose()

    run(main)
    assert len(registry.requests) == 1


def test_redirect_loop_bounded() -> None:
    async def loop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "/elsewhere"})

    async def main() -> None:
        reader = HttpRangeReader(URL, transport=httpx.MockTransport(loop))
        with pytest.raises(FetchError, match="redirects"):
            await reader.open()
        await reader.aclose()

    run(main)


def test_concurrency_bounded_by_max_connections() -> None:
    active = peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await trio.sleep(0.05)
        active -= 1
        return partial(request)

    async def main() -> None:
        reader = HttpRangeReader(URL, ReaderOptions(max_connections=3),
                                 transport=httpx.MockTransport(slow))
        async with reader, trio.open_nursery() as nursery:
            results: dict[int, bytes] = {}

            async def fetch(offset: int) -> None:
                results[offset] = await reader.read(offset, 64)

            for offset in range(0, 1280, 64):
                nursery.start_soon(fetch, offset)
        assert all(data == BLOB[o : o + 64] for o, data in results.items())
        assert len(results) == 20

    run(main)
    assert peak == 3


def test_credentials_in_url_kept_out_of_messages() -> None:
    reader = HttpRangeReader("https://user:pw@registry.test/blob")
    assert reader.source == "https://registry.test/blob"


def test_rejects_non_http_url() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpRangeReader("ftp://example.test/blob")


# -- get_small: a small whole resource (a descriptor), with the same deadline and retries ------

DESCRIPTOR_URL = "https://registry.test/layers/layer.descriptor.json"


def small_get(answers: list[httpx.Response], **options: Any) -> tuple[bytes | None, list[Any]]:
    """get_small against scripted answers (the last repeats); (result, requests sent)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1]

    async def main() -> bytes | None:
        return await get_small(DESCRIPTOR_URL, 64, ReaderOptions(backoff_base_s=0.01, **options),
                               transport=httpx.MockTransport(handler))

    return run(main), seen


def test_get_small_retries_transient_faults_like_range_reads() -> None:
    body, seen = small_get([httpx.Response(503), httpx.Response(429),
                            httpx.Response(200, content=b"{}")])
    assert body == b"{}" and len(seen) == 3


def test_get_small_gives_up_after_max_retries() -> None:
    with pytest.raises(FetchError, match=r"3 attempts; last: HTTP 502") as info:
        small_get([httpx.Response(502)], max_retries=2)
    assert DESCRIPTOR_URL in str(info.value)


def test_get_small_absent_is_none_other_errors_fail_at_once() -> None:
    assert small_get([httpx.Response(404)])[0] is None
    with pytest.raises(FetchError, match="HTTP 403"):
        small_get([httpx.Response(403)])


def test_get_small_reads_at_most_the_cap() -> None:
    with pytest.raises(BodyTooLargeError, match="larger than 64 bytes"):
        small_get([httpx.Response(200, content=b"x" * 65)])
    assert small_get([httpx.Response(200, content=b"x" * 64)])[0] == b"x" * 64


def test_get_small_sends_headers_to_the_origin_only() -> None:
    moved = httpx.Response(302, headers={"Location": "https://cdn.test/d.json"})
    body, seen = small_get([moved, httpx.Response(200, content=b"{}")],
                           headers={"Authorization": "Bearer secret"})
    assert body == b"{}"
    assert [r.url.host for r in seen] == ["registry.test", CDN]
    assert seen[0].headers["Authorization"] == "Bearer secret"
    assert "Authorization" not in seen[1].headers


def test_get_small_refuses_other_schemes() -> None:
    with pytest.raises(FetchError, match="not an http"):
        run(lambda: get_small("ftp://example.test/d.json", 64))


# --- no probe: promised sizes, clipped reads, streamed reads -----------------------------------


def test_a_promised_size_needs_no_probe_and_is_checked_by_the_first_answer() -> None:
    server = Server()

    async def main() -> None:
        reader = server.reader(expected_size=len(BLOB))
        assert await reader.open() == len(BLOB) and reader.stats.requests == 0
        assert await reader.read(10, 5) == BLOB[10:15]
        reader.expect_size(len(BLOB))
        with pytest.raises(BlobChangedError, match="by its descriptor"):
            reader.expect_size(len(BLOB) + 1)
        await reader.aclose()

    run(main)
    assert [r.headers["Range"] for r in server.requests] == ["bytes=10-14"]


def clipping(request: httpx.Request) -> httpx.Response:
    """A 206 for the request's range cut at the end of the blob, as nginx answers."""
    start, end = parse_range(request)
    end = min(end, len(BLOB) - 1)
    return httpx.Response(206, headers={"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"},
                          content=BLOB[start:end + 1])


def test_a_clipped_read_learns_the_size_from_its_answer() -> None:
    server = Server([clipping, clipping])
    server.opened = True  # no probe expected: the faults answer from the first request

    async def main() -> None:
        reader = server.reader()
        assert await reader.read_clipped(len(BLOB) - 100, 4096) == BLOB[-100:]
        assert reader.size == len(BLOB) and reader.stats.requests == 1
        assert await reader.read_clipped(len(BLOB) - 10, 4096) == BLOB[-10:]  # known now
        await reader.aclose()

    run(main)
    assert [r.headers["Range"] for r in server.requests] == [
        f"bytes={len(BLOB) - 100}-{len(BLOB) + 3995}", f"bytes={len(BLOB) - 10}-{len(BLOB) - 1}"]


def test_a_clipped_answer_must_end_at_the_end_of_the_blob() -> None:
    def cut_short(request: httpx.Request) -> httpx.Response:
        start, _ = parse_range(request)
        return httpx.Response(206, headers={"Content-Range": f"bytes {start}-{start + 9}/"
                                            f"{len(BLOB)}"}, content=BLOB[start:start + 10])

    async def main() -> None:
        reader = HttpRangeReader(URL, ReaderOptions(max_retries=0),
                                 transport=httpx.MockTransport(cut_short))
        with pytest.raises(FetchError, match="for a different range"):
            await reader.read_clipped(100, 4096)
        await reader.aclose()

    run(main)


def test_a_streamed_read_resumes_after_a_broken_body() -> None:
    server = Server([short, short])
    pieces: list[bytes] = []

    async def sink(piece: bytes) -> None:
        pieces.append(piece)

    async def main() -> None:
        async with server.reader() as reader:
            await reader.read_stream(1000, 3000, sink)
            assert reader.stats.retries == 2

    run(main)
    assert b"".join(pieces) == BLOB[1000:4000]
    # After the probe: the range, then twice from the first byte the sink did not get.
    assert [r.headers["Range"] for r in server.requests[1:]] == [
        "bytes=1000-3999", "bytes=3999-3999", "bytes=3999-3999"]
