"""An OCI distribution-spec client: pull and push manifests and blobs of one registry.

Pulls try the configured mirrors first, then the registry itself; whatever a source sends is
checked against the digest asked for, so a mirror needs no trust (a tag, though, means whatever
the mirror says it means). Blob GETs follow redirects (to object storage, a CDN) without
credentials: httpx drops `Authorization` on a cross-origin redirect and RegistryAuth attaches
nothing to other hosts. A signed URL that has expired by the time it is used (401/403 from the
redirect target) is a transient fault: the next attempt asks the registry for a fresh one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import trio

from lazyfs import __version__
from lazyfs.fetch.errors import FetchError
from lazyfs.fetch.oci import ACCEPTED_MANIFEST_TYPES, OCIFormatError, detect_media_type
from lazyfs.fetch.reference import (
    is_digest_reference,
    registry_api_host,
    validate_digest,
    validate_registry,
    validate_repository,
)
from lazyfs.fetch.registry_auth import Credentials, RegistryAuth, RegistryAuthError

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_SMALL_BLOB_BYTES = 64 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024
_ERROR_BODY_BYTES = 64 * 1024
_INLINE_HASH_BYTES = 64 * 1024  # smaller bodies are hashed on the event loop
_MAX_BACKOFF_S = 10.0
_RETRY_AFTER_CAP_S = 30.0
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_BLOB_HEADERS = {"Accept-Encoding": "identity"}
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


class _Retry(Exception):
    """One attempt failed in a way the next one may not."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Source:
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
            f"{role} {name!r}: plain HTTP needs insecure=True (lazyfs --insecure), "
            "even for localhost"
        )
    return host, httpx.URL(f"{scheme}://{host}")


def _source(
    name: str, insecure: bool, role: str, credentials: Credentials | None, retries: int
) -> _Source:
    display, base = _base_url(name, insecure, role)
    return _Source(display, base, RegistryAuth(str(base), credentials), retries)


def _algorithm(digest: str) -> str:
    return digest.partition(":")[0]


def _digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


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


async def _read_capped(source: _Source, response: httpx.Response, cap: int, what: str) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > cap:
            raise RegistryError(f"registry {source.name}: {what}: larger than {cap} bytes")
    return bytes(body)


def _check_digest(source: _Source, what: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise DigestMismatchError(
            f"registry {source.name}: {what}: content has digest {actual}, expected {expected}"
        )


def _write_and_hash(file: IO[bytes], hasher: Any, chunk: bytes) -> None:
    file.write(chunk)
    hasher.update(chunk)


def _commit(file: IO[bytes], tmp: Path, dest: Path) -> None:
    """fsync, close and rename into place, then fsync the directory so the rename lasts."""
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(tmp, dest)
    directory = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    file = await trio.to_thread.run_sync(open, path, "rb")
    try:
        while chunk := await trio.to_thread.run_sync(file.read, _CHUNK_BYTES):
            yield chunk
    finally:
        await trio.to_thread.run_sync(file.close)


class RegistryClient:
    """Async (trio) client of one registry, with one pooled httpx.AsyncClient for all sources.

    `registry` is `host[:port]` (`docker.io` means registry-1.docker.io) or an http(s) URL.
    Plain HTTP needs `insecure=True`, for localhost too. `mirrors` (same forms, anonymous) are
    tried once each before the registry for pulls; the registry gets `retries` retries with
    jittered backoff on 5xx, 429 and connection errors. Each request phase has `timeout`
    seconds, small requests `3 * timeout` in all. Use `async with` or call `aclose()`.
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | tuple[str, str] | None = None,
        insecure: bool = False,
        mirrors: Sequence[str] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        if timeout <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("need timeout > 0, retries >= 0 and backoff_s >= 0")
        if isinstance(credentials, tuple):
            credentials = Credentials(*credentials)
        self._origin = _source(registry, insecure, "registry", credentials, retries)
        self._mirrors = tuple(_source(m, insecure, "mirror", None, 0) for m in mirrors)
        self.name = self._origin.name
        self._timeout = timeout
        self._backoff_s = backoff_s
        self._limiter: trio.CapacityLimiter | None = None
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=True,
            max_redirects=5,
            headers={"User-Agent": f"lazyfs/{__version__}"},
        )

    @property
    def auth(self) -> RegistryAuth:
        """The registry's httpx.Auth, for reading blob ranges with another HTTP client."""
        return self._origin.auth

    def blob_url(self, repository: str, digest: str) -> str:
        """The registry URL of a blob (not a mirror's): read ranges of it with `auth`."""
        validate_repository(repository)
        validate_digest(digest)
        return f"{self._origin.base}/v2/{repository}/blobs/{digest}"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- pull --------------------------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """Return (bytes, media type, digest) of a manifest or index by tag or digest.

        The digest is computed from the bytes; for a digest reference it must equal it, for a
        tag it must equal the registry's Docker-Content-Digest if sent. Raises NotFoundError,
        UnauthorizedError, DigestMismatchError, RegistryError; ValueError for a bad argument.
        """
        validate_repository(repository)
        pinned = is_digest_reference(reference)
        what = f"manifest {repository}{'@' if pinned else ':'}{reference}"

        async def consume(source: _Source, response: httpx.Response) -> tuple[bytes, str, str]:
            body = await _read_capped(source, response, MAX_MANIFEST_BYTES, what)
            digest = await self._hash(body, _algorithm(reference) if pinned else "sha256")
            sent = response.headers.get("Docker-Content-Digest", "")
            expected = reference if pinned else sent if _algorithm(sent) == "sha256" else digest
            _check_digest(source, what, expected, digest)
            content_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
            try:
                return body, detect_media_type(body, content_type or None), digest
            except OCIFormatError as error:
                raise RegistryError(f"registry {source.name}: {what}: {error}") from None

        headers = {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)}
        return await self._pull(f"/v2/{repository}/manifests/{reference}", what, consume, headers)

    async def get_blob(
        self, repository: str, digest: str, *, max_size_bytes: int = MAX_SMALL_BLOB_BYTES
    ) -> bytes:
        """Return a small blob (an image config), checked against its digest.

        Raises RegistryError if it is larger than `max_size_bytes`, DigestMismatchError,
        NotFoundError, UnauthorizedError.
        """
        path, what = self._blob_path(repository, digest)

        async def consume(source: _Source, response: httpx.Response) -> bytes:
            body = await _read_capped(source, response, max_size_bytes, what)
            _check_digest(source, what, digest, await self._hash(body, _algorithm(digest)))
            return body

        return await self._pull(path, what, consume, _BLOB_HEADERS)

    async def download_blob(
        self, repository: str, digest: str, dest: Path, *, size: int | None = None
    ) -> None:
        """Stream a blob to `dest`: written to `dest.tmp`, digest checked, fsynced, renamed.

        `size`, if known (from a descriptor), must match. On failure `dest` is untouched and
        the temporary file removed. Raises RegistryError subclasses, OSError.
        """
        path, what = self._blob_path(repository, digest)
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")

        async def consume(source: _Source, response: httpx.Response) -> None:
            hasher, received = hashlib.new(_algorithm(digest)), 0
            file = await trio.to_thread.run_sync(open, tmp, "wb")
            try:
                async for chunk in response.aiter_bytes(_CHUNK_BYTES):
                    received += len(chunk)
                    if size is not None and received > size:
                        raise RegistryError(
                            f"registry {source.name}: {what}: more than the {size} bytes expected"
                        )
                    await trio.to_thread.run_sync(
                        _write_and_hash, file, hasher, chunk, limiter=self._hash_limiter()
                    )
                if size is not None and received != size:
                    raise RegistryError(
                        f"registry {source.name}: {what}: got {received} bytes, expected {size}"
                    )
                _check_digest(source, what, digest, f"{hasher.name}:{hasher.hexdigest()}")
                await trio.to_thread.run_sync(_commit, file, tmp, dest)
            finally:
                await trio.to_thread.run_sync(file.close)

        try:
            await self._pull(path, what, consume, _BLOB_HEADERS, deadline=False)
        finally:
            await trio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))

    # --- push --------------------------------------------------------------------------------

    async def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether the registry has the blob (HEAD); raises RegistryError on other answers."""
        path, what = self._blob_path(repository, digest)

        async def found(source: _Source, response: httpx.Response) -> bool:
            return response.status_code == 200

        return await self._request(self._origin, "HEAD", path, what, found, ok=(200, 404))

    async def push_blob(
        self,
        repository: str,
        digest: str,
        data_or_path: bytes | os.PathLike[str],
        *,
        mount_from: str | None = None,
    ) -> bool:
        """Upload a blob (POST, then one monolithic PUT) unless the registry has it already.

        Returns whether bytes were uploaded. `mount_from` names a repository of the same
        registry to mount the blob from instead. Bytes in memory are checked against `digest`
        first (ValueError); a file is checked by the registry. Raises RegistryError subclasses.
        """
        self._blob_path(repository, digest)  # validates both
        if isinstance(data_or_path, bytes | bytearray | memoryview):
            data: bytes | None = bytes(data_or_path)
            actual = await self._hash(data, _algorithm(digest))
            if actual != digest:
                raise ValueError(f"blob for {repository}@{digest}: data has digest {actual}")
            size = len(data)
        else:
            path, data = Path(data_or_path), None
            size = (await trio.to_thread.run_sync(path.stat)).st_size
        if await self.blob_exists(repository, digest):
            return False
        what = f"blob upload {repository}@{digest}"
        mount = {"mount": digest, "from": validate_repository(mount_from)} if mount_from else {}
        put_headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}

        async def location(source: _Source, response: httpx.Response) -> httpx.URL | None:
            if response.status_code == 201:
                return None  # mounted
            if "Location" not in response.headers:
                raise RegistryError(f"registry {source.name}: {what}: 202 without Location")
            return response.url.join(response.headers["Location"])

        async def created(source: _Source, response: httpx.Response) -> None:
            return None

        # A failed PUT may have spoiled the upload session: each attempt starts a new one.
        for attempt in range(self._origin.retries + 1):
            upload = await self._request(
                self._origin, "POST", f"/v2/{repository}/blobs/uploads/", what, location,
                ok=(201, 202), params=mount, headers={"Content-Length": "0"},
            )  # fmt: skip
            if upload is None:
                return False
            try:
                await self._request(
                    self._origin, "PUT", upload.copy_merge_params({"digest": digest}), what,
                    created, ok=(201,), retries=0, deadline=False, headers=put_headers,
                    content=data if data is not None else _file_chunks(path),
                )  # fmt: skip
                return True
            except RegistryUnavailableError:
                if attempt == self._origin.retries:
                    raise
                await trio.sleep(self._delay_s(attempt + 1, None))
        raise AssertionError("unreachable")

    async def push_manifest(
        self, repository: str, reference: str, body: bytes, media_type: str
    ) -> str:
        """PUT a manifest or index under a tag or its digest; return its digest.

        Referenced blobs and manifests must already be in the repository. Raises ValueError if
        `reference` is a digest other than the body's, RegistryError subclasses otherwise.
        """
        validate_repository(repository)
        pinned = is_digest_reference(reference)
        digest = await self._hash(body, _algorithm(reference) if pinned else "sha256")
        if pinned and digest != reference:
            raise ValueError(f"manifest for {repository}@{reference}: body has digest {digest}")
        what = f"manifest {repository}{'@' if pinned else ':'}{reference} (push)"

        async def stored(source: _Source, response: httpx.Response) -> None:
            returned = response.headers.get("Docker-Content-Digest", "")
            if _algorithm(returned) == _algorithm(digest) and returned != digest:
                raise DigestMismatchError(
                    f"registry {source.name}: {what}: registry computed {returned}, sent {digest}"
                )

        await self._request(
            self._origin, "PUT", f"/v2/{repository}/manifests/{reference}", what, stored,
            ok=(201,), headers={"Content-Type": media_type}, content=body,
        )  # fmt: skip
        return digest

    # --- plumbing ----------------------------------------------------------------------------

    def _blob_path(self, repository: str, digest: str) -> tuple[str, str]:
        validate_repository(repository)
        validate_digest(digest)
        return f"/v2/{repository}/blobs/{digest}", f"blob {repository}@{digest}"

    async def _pull(
        self,
        path: str,
        what: str,
        consume: Callable[[_Source, httpx.Response], Awaitable[T]],
        headers: Mapping[str, str],
        *,
        deadline: bool = True,
    ) -> T:
        """GET from each mirror once, then from the registry; a mirror's failure is logged."""
        for mirror in self._mirrors:
            try:
                return await self._request(
                    mirror, "GET", path, what, consume, headers=headers, deadline=deadline
                )
            except FetchError as error:
                log.info("mirror %s: %s; trying the next source", mirror.name, error)
        return await self._request(
            self._origin, "GET", path, what, consume, headers=headers, deadline=deadline
        )

    async def _request(
        self,
        source: _Source,
        method: str,
        target: str | httpx.URL,
        what: str,
        consume: Callable[[_Source, httpx.Response], Awaitable[T]],
        *,
        ok: tuple[int, ...] = (200,),
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterator[bytes] | None = None,
        retries: int | None = None,
        deadline: bool = True,
    ) -> T:
        """Send a request and hand an accepted response to `consume`, with bounded retries.

        Raises RegistryUnavailableError after the last transient failure, other RegistryErrors
        for an answer that another attempt would not change.
        """
        url = target if isinstance(target, httpx.URL) else httpx.URL(f"{source.base}{target}")
        attempts = (source.retries if retries is None else retries) + 1
        last, retry_after_s = "", None
        for attempt in range(attempts):
            if attempt:
                await trio.sleep(self._delay_s(attempt, retry_after_s))
            try:
                with trio.fail_after(3 * self._timeout) if deadline else nullcontext():
                    request = self._client.build_request(
                        method, url, params=params, headers=headers, content=content
                    )
                    response = await self._client.send(request, auth=source.auth, stream=True)
                    try:
                        await self._check_status(source, what, response, ok)
                        return await consume(source, response)
                    finally:
                        await response.aclose()
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
                        "(lazyfs --insecure): plain HTTP is never assumed, not even for "
                        "localhost or 127.0.0.1"
                    ) from None
                last, retry_after_s = _describe(error), None
            except httpx.HTTPError as error:  # too many redirects, undecodable body
                raise RegistryError(f"registry {source.name}: {what}: {_describe(error)}") from None
        raise RegistryUnavailableError(
            f"registry {source.name}: {what}: failed after {attempts} attempts; last: {last}"
        )

    async def _check_status(
        self, source: _Source, what: str, response: httpx.Response, ok: tuple[int, ...]
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
                f"the credentials of user {credentials.username!r} were refused"
                if credentials is not None
                else "no credentials given (docker login, or pass credentials)"
            )
            word = "authentication required" if status == 401 else "access denied"
            raise UnauthorizedError(
                f"{prefix}: {word} (HTTP {status}{detail}); {hint}", status=status
            )
        raise RegistryError(f"{prefix}: unexpected HTTP {status}{detail}", status=status)

    def _hash_limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(2)
        return self._limiter

    async def _hash(self, data: bytes, algorithm: str) -> str:
        if len(data) <= _INLINE_HASH_BYTES:
            return _digest_of(data, algorithm)
        return await trio.to_thread.run_sync(
            _digest_of, data, algorithm, limiter=self._hash_limiter()
        )

    def _delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        delay_s = min(_MAX_BACKOFF_S, self._backoff_s * 2 ** (attempt - 1))
        delay_s *= 0.5 + random.random()
        if retry_after_s is not None:
            delay_s = max(delay_s, min(retry_after_s, _RETRY_AFTER_CAP_S))
        return delay_s
