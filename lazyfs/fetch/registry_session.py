"""The request plumbing that pulls and pushes share: sources, errors, retries, status mapping.

A source is the registry or one of its mirrors: a base URL and how requests to it
authenticate. A RegistrySession owns the one pooled httpx.AsyncClient of a RegistryClient and
sends every request: a deadline per attempt, bounded jittered retries on transient faults
(5xx, 429, connection and read errors, an expired signed redirect URL), and HTTP statuses
turned into the RegistryError subclass a caller can act on.

A session may also have one deadline for all its small requests together (`deadline_s`, from
the first of them, or a time `end_by` sets): resolving an image (index, manifest, config,
and the tokens they need) then ends within it, whatever the retries, and a request it cuts
short fails with RegistryTimeoutError, which names the request and how far it got (no
answer, or headers and then part of a body), and the server it was waiting for.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

from lazyfs import __version__
from lazyfs.fetch.base import backoff_delay_s
from lazyfs.fetch.errors import FetchError
from lazyfs.fetch.registry_auth import (
    CredentialLookup,
    Credentials,
    RegistryAuth,
    RegistryAuthError,
)
from lazyfs.fetch.tls import LazyCAContext, tls_context
from lazyfs.format.oci import digest_of
from lazyfs.format.reference import (
    registry_api_host,
    validate_digest,
    validate_registry,
    validate_repository,
)

CHUNK_BYTES = 1024 * 1024  # streamed blob bodies are read and written in pieces of this size
_ERROR_BODY_BYTES = 64 * 1024
_INLINE_HASH_BYTES = 64 * 1024  # smaller bodies are hashed on the event loop
_MAX_BACKOFF_S = 10.0
_RETRY_AFTER_CAP_S = 30.0
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class RegistryError(FetchError):
    """A registry request failed; the message names registry, object and HTTP status."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(RegistryError):
    """The manifest, tag or blob does not exist (HTTP 404)."""


class UnauthorizedError(RegistryError):
    """Credentials are missing or were refused (HTTP 401/403, or by the token server)."""


class DigestMismatchError(RegistryError):
    """Content received does not hash to the digest it was asked for by."""


class RegistryUnavailableError(RegistryError):
    """Every attempt failed with a transient fault (5xx, 429, connection or read errors)."""


class RegistryTimeoutError(RegistryUnavailableError):
    """The session's deadline passed before a request was answered (`RegistrySession`)."""


class _Retry(Exception):
    """One attempt failed in a way the next one may not."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class _Progress:
    """How far the request in flight has got: the last HTTP request it sent (its own, a
    token's, a redirect's) and the answer to it, if its headers came."""

    request: httpx.Request | None = None
    response: httpx.Response | None = None

    def describe(self, source: Source) -> str:
        """What the server was asked, and what came: `no answer to GET /v2/…`, or `GET /v2/…
        answered HTTP 200, then its body stalled after 10 of 1234 bytes`."""
        request = self.request
        if request is None:
            return "no request went out"
        url = request.url
        where = url.raw_path.decode("ascii", "replace").partition("?")[0]
        if (url.scheme, url.host, url.port) != (source.base.scheme, source.base.host,
                                                source.base.port):
            where += f" on {url.scheme}://{url.netloc.decode('ascii', 'replace')}"
        response = self.response
        if response is None or response.request is not request:
            return f"no answer to {request.method} {where}"
        promised = response.headers.get("Content-Length")
        received = f"{response.num_bytes_downloaded}" + (f" of {promised}" if promised else "")
        return (f"{request.method} {where} answered HTTP {response.status_code}, then its body "
                f"stalled after {received} bytes")


# The progress of the request the current task is making (for the client's event hooks).
_PROGRESS: ContextVar[_Progress | None] = ContextVar("registry_progress", default=None)


async def _note_request(request: httpx.Request) -> None:
    progress = _PROGRESS.get()
    if progress is not None:
        progress.request, progress.response = request, None


async def _note_response(response: httpx.Response) -> None:
    progress = _PROGRESS.get()
    if progress is not None:
        progress.response = response


@dataclass(frozen=True)
class Source:
    """The registry or one of its mirrors: where requests go and how they authenticate."""

    name: str
    base: httpx.URL
    auth: RegistryAuth
    retries: int


def _base_url(name: str, insecure: bool, role: str) -> tuple[str, httpx.URL]:
    """(display name, base URL) of `host[:port]` or `http(s)://host[:port]`."""
    scheme, sep, host = name.partition("://")
    if not sep:
        scheme, host = ("http" if insecure else "https"), name
    host = registry_api_host(host.rstrip("/"))
    if scheme not in ("http", "https") or "/" in host:
        raise ValueError(f"{role} {name!r}: expected host[:port] or http(s)://host[:port]")
    validate_registry(host)
    if scheme == "http" and not insecure:
        raise ValueError(
            f"{role} {name!r}: plain HTTP needs insecure=True (lazyfs --insecure-registry), "
            "even for localhost"
        )
    return host, httpx.URL(f"{scheme}://{host}")


def make_source(
    name: str, insecure: bool, role: str, credentials: Credentials | None, retries: int,
    lookup: CredentialLookup | None = None,
) -> Source:
    """The Source for `name` (`host[:port]` or an http(s) URL); ValueError if unusable."""
    display, base = _base_url(name, insecure, role)
    return Source(display, base, RegistryAuth(str(base), credentials, lookup=lookup), retries)


def blob_path(repository: str, digest: str) -> tuple[str, str]:
    """(API path, description for messages) of a blob; ValueError for a bad argument."""
    validate_repository(repository)
    validate_digest(digest)
    return f"/v2/{repository}/blobs/{digest}", f"blob {repository}@{digest}"


def algorithm_of(digest: str) -> str:
    """The algorithm part of `algorithm:hex`."""
    return digest.partition(":")[0]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


async def _error_detail(response: httpx.Response) -> str:
    """`; CODE: message` from a distribution-spec error body (read up to a cap), else ''."""
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > _ERROR_BODY_BYTES:
                return ""
        first = httpx.Response(200, content=bytes(body)).json()["errors"][0]
        return f"; {first['code']}: {first['message']}"
    except (httpx.HTTPError, ValueError, LookupError, TypeError):
        return ""


class RegistrySession:
    """One pooled httpx.AsyncClient and the retry policy for every request to any source.

    Each request phase has `timeout` seconds, a whole small request `3 * timeout`; retries
    wait `backoff_s` doubled per attempt (capped, jittered, at least a short Retry-After).
    With `deadline_s`, all the small requests (those with a deadline per attempt) end within
    that many seconds of the first, or by the time `end_by` sets: a transfer of a whole blob
    has no such bound.
    """

    def __init__(
        self, *, transport: httpx.AsyncBaseTransport | None, timeout: float, backoff_s: float,
        deadline_s: float | None = None,
    ) -> None:
        self._timeout = timeout
        self._backoff_s = backoff_s
        self.deadline_s = deadline_s
        self._deadline: float | None = None  # trio time; set at the first request
        self._limiter: trio.CapacityLimiter | None = None
        self._transport = transport
        self._verify = tls_context(True)  # one CA load per process, not one per session
        # Made at the first request: building one imports httpx's transport (httpcore, ~10 ms),
        # and a start that finds the image in the disk cache sends none.
        self._http: httpx.AsyncClient | None = None

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # Registries mostly speak https: the CA certificates load while the first request
            # connects, not before (tens of ms of CPU a start from the disk cache never needs).
            if isinstance(self._verify, LazyCAContext):
                self._verify.start_loading()
            self._http = httpx.AsyncClient(
                transport=self._transport,
                verify=self._verify,
                timeout=httpx.Timeout(self._timeout),
                follow_redirects=True,
                max_redirects=5,
                headers={"User-Agent": f"lazyfs/{__version__}"},
                event_hooks={"request": [_note_request], "response": [_note_response]},
            )
        return self._http

    def end_by(self, deadline: float) -> None:
        """End the small requests by `deadline` (trio time) instead: a resolution that began
        before this session (a head start asked first) counts from its own start."""
        self._deadline = deadline

    @property
    def deadline(self) -> float | None:
        """When the small requests must end (trio time), if that is known yet."""
        return self._deadline

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def request(
        self,
        source: Source,
        method: str,
        target: str | httpx.URL,
        what: str,
        consume: Callable[[Source, httpx.Response], Awaitable[T]],
        *,
        ok: tuple[int, ...] = (200,),
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterator[bytes] | None = None,
        retries: int | None = None,
        deadline: bool = True,
    ) -> T:
        """Send a request and hand an accepted response to `consume`, with bounded retries.

        Raises RegistryUnavailableError after the last transient failure, RegistryTimeoutError
        when the session's deadline passes first (`deadline_s`), other RegistryErrors for an
        answer that another attempt would not change.
        """
        url = target if isinstance(target, httpx.URL) else httpx.URL(f"{source.base}{target}")
        attempts = (source.retries if retries is None else retries) + 1
        last, retry_after_s = "", None
        if deadline and self._deadline is None and self.deadline_s is not None:
            self._deadline = trio.current_time() + self.deadline_s
        overall = self._deadline if deadline and self._deadline is not None else math.inf
        for attempt in range(attempts):
            if attempt:
                delay_s = self.delay_s(attempt, retry_after_s)
                if trio.current_time() + delay_s >= overall:
                    raise self._timed_out(source, what, f"{last}; no time left to try again")
                await trio.sleep(delay_s)
            progress = _Progress()
            token = _PROGRESS.set(progress)
            try:
                with trio.move_on_at(overall) as cut:
                    with trio.fail_after(3 * self._timeout) if deadline else nullcontext():
                        request = self._client.build_request(
                            method, url, params=params, headers=headers, content=content
                        )
                        response = await self._client.send(request, auth=source.auth,
                                                           stream=True)
                        try:
                            await self._check_status(source, what, response, ok)
                            return await consume(source, response)
                        finally:
                            await response.aclose()
                if cut.cancelled_caught:
                    raise self._timed_out(source, what, progress.describe(source))
            except _Retry as error:
                last, retry_after_s = error.reason, error.retry_after_s
            except RegistryAuthError as error:
                if not error.transient:
                    raise UnauthorizedError(
                        f"registry {source.name}: {what}: {error.reason}", status=error.status
                    ) from None
                last, retry_after_s = error.reason, None
            except trio.TooSlowError:
                last, retry_after_s = f"no answer within {3 * self._timeout:.0f} s", None
            except httpx.TransportError as error:
                if _is_tls_error(error) and url.scheme == "https":
                    raise RegistryError(
                        f"registry {source.name}: {what}: TLS handshake with {url.host} failed "
                        f"({_describe(error)}); if it serves plain HTTP, pass insecure=True "
                        "(lazyfs --insecure-registry): plain HTTP is never assumed, not even for "
                        "localhost or 127.0.0.1"
                    ) from None
                last, retry_after_s = _describe(error), None
            except httpx.HTTPError as error:  # too many redirects, undecodable body
                raise RegistryError(f"registry {source.name}: {what}: {_describe(error)}") from None
            finally:
                _PROGRESS.reset(token)
        raise RegistryUnavailableError(
            f"registry {source.name}: {what}: failed after {attempts} attempts; last: {last}"
        )

    def _timed_out(self, source: Source, what: str, detail: str) -> RegistryTimeoutError:
        budget = f", {self.deadline_s:g} s" if self.deadline_s is not None else ""
        return RegistryTimeoutError(
            f"registry {source.name}: {what}: {detail} (gave up at the read timeout{budget})")

    async def _check_status(
        self, source: Source, what: str, response: httpx.Response, ok: tuple[int, ...]
    ) -> None:
        status = response.status_code
        if status in ok:
            return
        detail = await _error_detail(response)
        if status in _TRANSIENT_STATUSES:
            raise _Retry(f"HTTP {status}{detail}", _retry_after_s(response))
        if not source.auth.is_origin(response.url) and status in (401, 403):
            # An expired or revoked signed URL: the registry will hand out a fresh one.
            raise _Retry(f"HTTP {status} from redirect target {response.url.host}")
        prefix = f"registry {source.name}: {what}"
        if status == 404:
            raise NotFoundError(f"{prefix} not found (HTTP 404)", status=status)
        if status in (401, 403):
            credentials = source.auth.credentials
            hint = (
                f"the credentials of {credentials.who} were refused"
                if credentials is not None
                else "no credentials given (docker login, or pass credentials)"
            )
            word = "authentication required" if status == 401 else "access denied"
            raise UnauthorizedError(
                f"{prefix}: {word} (HTTP {status}{detail}); {hint}", status=status
            )
        raise RegistryError(f"{prefix}: unexpected HTTP {status}{detail}", status=status)

    def hash_limiter(self) -> trio.CapacityLimiter:
        """The limiter of the threads that hash (and write) blob bodies."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(2)
        return self._limiter

    async def hash(self, data: bytes, algorithm: str) -> str:
        """The `algorithm:hex` digest of `data`, in a thread unless it is small."""
        if len(data) <= _INLINE_HASH_BYTES:
            return digest_of(data, algorithm)
        return await trio.to_thread.run_sync(
            digest_of, data, algorithm, limiter=self.hash_limiter()
        )

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        """How long to wait before retry number `attempt` (1 for the first retry)."""
        return backoff_delay_s(attempt, self._backoff_s, retry_after_s, max_s=_MAX_BACKOFF_S,
                               retry_after_cap_s=_RETRY_AFTER_CAP_S)
