"""An OCI distribution-spec client: pull and push manifests and blobs of one registry.

Pulls try the configured mirrors first, then the registry itself; whatever a source sends is
checked against the digest asked for, so a mirror needs no trust (a tag, though, means whatever
the mirror says it means). Blob GETs follow redirects (to object storage, a CDN) without
credentials: httpx drops `Authorization` on a cross-origin redirect and RegistryAuth attaches
nothing to other hosts. A signed URL that has expired by the time it is used (401/403 from the
redirect target) is a transient fault: the next attempt asks the registry for a fresh one.

This module holds the client and its pulls. The request plumbing both directions share
(sources, errors, retries, status mapping) is in `registry_session`, the pushes are in
`registry_push`; the error types are importable from here too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import trio

from lazyfs.fetch import registry_push
from lazyfs.fetch.body import BodyTooLargeError, read_capped
from lazyfs.fetch.errors import FetchError
from lazyfs.fetch.registry_auth import CredentialLookup, Credentials, RegistryAuth
from lazyfs.fetch.registry_session import (
    CHUNK_BYTES,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    RegistrySession,
    RegistryTimeoutError,
    RegistryUnavailableError,
    Source,
    UnauthorizedError,
    algorithm_of,
    blob_path,
    make_source,
)
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.oci import ACCEPTED_MANIFEST_TYPES, detect_media_type
from lazyfs.format.reference import (
    is_digest_reference,
    validate_digest,
    validate_repository,
)

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_SMALL_BLOB_BYTES = 64 * 1024 * 1024
_BLOB_HEADERS = {"Accept-Encoding": "identity"}
T = TypeVar("T")

__all__ = [
    "MAX_MANIFEST_BYTES",
    "MAX_SMALL_BLOB_BYTES",
    "DigestMismatchError",
    "NotFoundError",
    "RegistryClient",
    "RegistryError",
    "RegistryTimeoutError",
    "RegistryUnavailableError",
    "UnauthorizedError",
]


async def _read_capped(source: Source, response: httpx.Response, cap: int, what: str) -> bytes:
    try:
        return await read_capped(response, cap, what)
    except BodyTooLargeError as error:
        raise RegistryError(f"registry {source.name}: {error}") from None


def _check_digest(source: Source, what: str, expected: str, actual: str) -> None:
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


class RegistryClient:
    """Async (trio) client of one registry, with one pooled httpx.AsyncClient for all sources.

    `registry` is `host[:port]` (`docker.io` means registry-1.docker.io) or an http(s) URL.
    Plain HTTP needs `insecure=True`, for localhost too. `mirrors` (same forms, anonymous) are
    tried once each before the registry for pulls; the registry gets `retries` retries with
    jittered backoff on 5xx, 429 and connection errors. Each request phase has `timeout`
    seconds, small requests `3 * timeout` in all; with `deadline_s`, all the small requests
    (manifests, configs, HEADs, and the tokens they need) together, retries included, end
    within that many seconds of the first (or by the time `end_by` sets), else fail with
    RegistryTimeoutError. With `credential_lookup`, the registry's credentials are looked up
    for every request (`RegistryAuth`). Use `async with` or call `aclose()`.
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
        deadline_s: float | None = None,
        credential_lookup: CredentialLookup | None = None,
    ) -> None:
        if (timeout <= 0 or retries < 0 or backoff_s < 0
                or (deadline_s is not None and deadline_s <= 0)):
            raise ValueError("need timeout > 0, retries >= 0, backoff_s >= 0 and deadline_s > 0")
        if isinstance(credentials, tuple):
            credentials = Credentials(*credentials)
        self._origin = make_source(registry, insecure, "registry", credentials, retries,
                                   credential_lookup)
        self._mirrors = tuple(make_source(m, insecure, "mirror", None, 0) for m in mirrors)
        self.name = self._origin.name
        self._session = RegistrySession(transport=transport, timeout=timeout, backoff_s=backoff_s,
                                        deadline_s=deadline_s)

    @property
    def auth(self) -> RegistryAuth:
        """The registry's httpx.Auth, for reading blob ranges with another HTTP client."""
        return self._origin.auth

    def end_by(self, deadline: float) -> None:
        """End the small requests by `deadline` (trio time), not `deadline_s` after the first:
        a resolution that began before this client counts from its own start."""
        self._session.end_by(deadline)

    @property
    def deadline(self) -> float | None:
        """When the small requests must end (trio time), once that is known."""
        return self._session.deadline

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
        await self._session.aclose()

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

        async def consume(source: Source, response: httpx.Response) -> tuple[bytes, str, str]:
            body = await _read_capped(source, response, MAX_MANIFEST_BYTES, what)
            algorithm = algorithm_of(reference) if pinned else "sha256"
            digest = await self._session.hash(body, algorithm)
            sent = response.headers.get("Docker-Content-Digest", "")
            expected = reference if pinned else sent if algorithm_of(sent) == "sha256" else digest
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
        path, what = blob_path(repository, digest)

        async def consume(source: Source, response: httpx.Response) -> bytes:
            body = await _read_capped(source, response, max_size_bytes, what)
            actual = await self._session.hash(body, algorithm_of(digest))
            _check_digest(source, what, digest, actual)
            return body

        return await self._pull(path, what, consume, _BLOB_HEADERS)

    async def download_blob(
        self, repository: str, digest: str, dest: Path, *, size: int | None = None
    ) -> None:
        """Stream a blob to `dest`: written to `dest.tmp`, digest checked, fsynced, renamed.

        `size`, if known (from a descriptor), must match. On failure `dest` is untouched and
        the temporary file removed. Raises RegistryError subclasses, OSError.
        """
        path, what = blob_path(repository, digest)
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")

        async def consume(source: Source, response: httpx.Response) -> None:
            hasher, received = hashlib.new(algorithm_of(digest)), 0
            file = await trio.to_thread.run_sync(open, tmp, "wb")
            try:
                async for chunk in response.aiter_bytes(CHUNK_BYTES):
                    received += len(chunk)
                    if size is not None and received > size:
                        raise RegistryError(
                            f"registry {source.name}: {what}: more than the {size} bytes expected"
                        )
                    await trio.to_thread.run_sync(
                        _write_and_hash, file, hasher, chunk, limiter=self._session.hash_limiter()
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

    async def _pull(
        self,
        path: str,
        what: str,
        consume: Callable[[Source, httpx.Response], Awaitable[T]],
        headers: Mapping[str, str],
        *,
        deadline: bool = True,
    ) -> T:
        """GET from each mirror once, then from the registry; a mirror's failure is logged."""
        for mirror in self._mirrors:
            try:
                return await self._session.request(
                    mirror, "GET", path, what, consume, headers=headers, deadline=deadline
                )
            except FetchError as error:
                log.info("mirror %s: %s; trying the next source", mirror.name, error)
        return await self._session.request(
            self._origin, "GET", path, what, consume, headers=headers, deadline=deadline
        )

    # --- push (to the registry itself, never a mirror) ---------------------------------------

    async def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether the registry has the blob (HEAD); raises RegistryError on other answers."""
        return await registry_push.blob_exists(self._session, self._origin, repository, digest)

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
        return await registry_push.push_blob(
            self._session, self._origin, repository, digest, data_or_path, mount_from=mount_from
        )

    async def push_manifest(
        self, repository: str, reference: str, body: bytes, media_type: str
    ) -> str:
        """PUT a manifest or index under a tag or its digest; return its digest.

        Referenced blobs and manifests must already be in the repository. Raises ValueError if
        `reference` is a digest other than the body's, RegistryError subclasses otherwise.
        """
        return await registry_push.push_manifest(
            self._session, self._origin, repository, reference, body, media_type
        )
