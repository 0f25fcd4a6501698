"""One deadline for all the small requests of a registry client (`deadline_s`): a registry that
stalls (no answer, headers and then no body, a token server that never answers) or keeps
failing makes the client give up at the deadline, not after every attempt's own timeout, with
a message naming the request and how far it got. Trio runs on a MockClock that jumps over
waits, so the times asserted are the client's own."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from lazyfs.fetch.registry import RegistryClient, RegistryTimeoutError, RegistryUnavailableError

ORIGIN = "registry.test"
DEADLINE_S = 2.0
CONFIG = b'{"config": {}}'


def run_mock(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


class StalledBody(httpx.AsyncByteStream):
    """A body that sends `first` and then nothing, ever."""

    def __init__(self, first: bytes = b"") -> None:
        self.first = first

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        await trio.sleep_forever()


def transport(answer: Callable[[httpx.Request], Awaitable[httpx.Response]]
              ) -> tuple[httpx.MockTransport, list[str]]:
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}{request.url.path}")
        return await answer(request)

    return httpx.MockTransport(handler), seen


async def fail_within_deadline(answer: Callable[[httpx.Request], Awaitable[httpx.Response]],
                               fetch: str = "manifest", backoff_s: float = 0.5,
                               ) -> tuple[str, float, list[str]]:
    """(the error, the seconds the fetch took, what was asked) of a client with retries and
    a per-request timeout far longer than its deadline."""
    mock, seen = transport(answer)
    async with RegistryClient(ORIGIN, transport=mock, timeout=30, retries=3,
                              backoff_s=backoff_s, deadline_s=DEADLINE_S) as client:
        began = trio.current_time()
        with pytest.raises(RegistryTimeoutError) as info:
            if fetch == "manifest":
                await client.get_manifest("app", "v1")
            else:
                await client.get_blob("app", "sha256:" + hashlib.sha256(CONFIG).hexdigest())
        return str(info.value), trio.current_time() - began, seen


def test_no_answer_fails_at_the_deadline_naming_the_request() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    async def main() -> None:
        message, took, seen = await fail_within_deadline(answer)
        assert took == pytest.approx(DEADLINE_S)
        assert message == ("registry registry.test: manifest app:v1: no answer to GET "
                           "/v2/app/manifests/v1 (gave up at the read timeout, 2 s)")
        assert seen == ["registry.test/v2/app/manifests/v1"]

    run_mock(main)


def test_headers_then_no_body_fails_at_the_deadline_saying_how_far_it_got() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(len(CONFIG))},
                              stream=StalledBody(CONFIG[:4]))

    async def main() -> None:
        message, took, _ = await fail_within_deadline(answer, fetch="config")
        assert took == pytest.approx(DEADLINE_S)
        assert message.endswith(
            ": GET /v2/app/blobs/sha256:" + hashlib.sha256(CONFIG).hexdigest()
            + f" answered HTTP 200, then its body stalled after 4 of {len(CONFIG)} bytes "
            "(gave up at the read timeout, 2 s)"), message

    run_mock(main)


def test_a_token_server_that_never_answers_is_named() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            await trio.sleep_forever()
        return httpx.Response(401, headers={
            "WWW-Authenticate": 'Bearer realm="https://auth.test/token",service="registry.test"'})

    async def main() -> None:
        message, took, seen = await fail_within_deadline(answer)
        assert took == pytest.approx(DEADLINE_S)
        assert message.endswith("manifest app:v1: no answer to GET /token on https://auth.test "
                                "(gave up at the read timeout, 2 s)"), message
        assert seen == ["registry.test/v2/app/manifests/v1", "auth.test/token"]

    run_mock(main)


def test_retries_stop_when_the_deadline_leaves_no_time_for_another() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1.6)  # and then at least 0.5 s of backoff: past the deadline
        return httpx.Response(503)

    async def main() -> None:
        message, took, seen = await fail_within_deadline(answer, backoff_s=1.0)
        assert took == pytest.approx(1.6)  # no waiting for a retry that cannot finish
        assert message == ("registry registry.test: manifest app:v1: HTTP 503; no time left to "
                           "try again (gave up at the read timeout, 2 s)")
        assert len(seen) == 1

    run_mock(main)


def test_the_deadline_is_a_kind_of_unavailable_registry_and_spans_requests() -> None:
    # Callers that fall back when a registry is unreachable (remembered manifests) fall back
    # on a stalled one too; the deadline counts from the first request, not per request.
    assert issubclass(RegistryTimeoutError, RegistryUnavailableError)

    async def answer(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1.5)
        return httpx.Response(404)

    async def main() -> None:
        mock, _ = transport(answer)
        async with RegistryClient(ORIGIN, transport=mock, deadline_s=DEADLINE_S) as client:
            began = trio.current_time()
            assert await client.blob_exists("app", "sha256:" + "0" * 64) is False
            with pytest.raises(RegistryTimeoutError, match="no answer to HEAD /v2/app/blobs/"):
                await client.blob_exists("app", "sha256:" + "0" * 64)
            assert trio.current_time() - began == pytest.approx(DEADLINE_S)

    run_mock(main)


def test_without_a_deadline_each_attempt_has_its_own_timeout() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    async def main() -> None:
        mock, seen = transport(answer)
        async with RegistryClient(ORIGIN, transport=mock, timeout=1, retries=1,
                                  backoff_s=0) as client:
            with pytest.raises(RegistryUnavailableError) as info:
                await client.get_manifest("app", "v1")
        assert not isinstance(info.value, RegistryTimeoutError)
        assert len(seen) == 2

    run_mock(main)
