"""The push half of the registry client: blob existence checks, blob uploads, manifest PUTs.

Pushes go to the registry itself, never to a mirror. A blob is uploaded with a POST that
opens an upload session (or mounts the blob from another repository) and one monolithic PUT;
a PUT that fails may have spoiled its session, so each retry opens a new one. RegistryClient
delegates its push methods here, handing over its session and its registry's source.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from lazyfs.fetch.registry_session import (
    CHUNK_BYTES,
    DigestMismatchError,
    RegistryError,
    RegistrySession,
    RegistryUnavailableError,
    Source,
    algorithm_of,
    blob_path,
)
from lazyfs.format.reference import is_digest_reference, validate_repository


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    file = await trio.to_thread.run_sync(open, path, "rb")
    try:
        while chunk := await trio.to_thread.run_sync(file.read, CHUNK_BYTES):
            yield chunk
    finally:
        await trio.to_thread.run_sync(file.close)


async def blob_exists(
    session: RegistrySession, origin: Source, repository: str, digest: str
) -> bool:
    """Whether `origin` has the blob (HEAD); raises RegistryError on other answers."""
    path, what = blob_path(repository, digest)

    async def found(source: Source, response: httpx.Response) -> bool:
        return response.status_code == 200

    return await session.request(origin, "HEAD", path, what, found, ok=(200, 404))


async def push_blob(
    session: RegistrySession,
    origin: Source,
    repository: str,
    digest: str,
    data_or_path: bytes | os.PathLike[str],
    *,
    mount_from: str | None = None,
) -> bool:
    """Upload a blob to `origin` unless it has it already; return whether bytes were uploaded.

    Raises ValueError for bytes that do not hash to `digest`, RegistryError subclasses.
    """
    blob_path(repository, digest)  # validates both
    data: bytes | None
    if isinstance(data_or_path, bytes | bytearray | memoryview):
        data = bytes(data_or_path)
        actual = await session.hash(data, algorithm_of(digest))
        if actual != digest:
            raise ValueError(f"blob for {repository}@{digest}: data has digest {actual}")
        size = len(data)
    else:
        path, data = Path(data_or_path), None
        size = (await trio.to_thread.run_sync(path.stat)).st_size
    if await blob_exists(session, origin, repository, digest):
        return False
    what = f"blob upload {repository}@{digest}"
    mount = {"mount": digest, "from": validate_repository(mount_from)} if mount_from else {}
    put_headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}

    async def location(source: Source, response: httpx.Response) -> httpx.URL | None:
        if response.status_code == 201:
            return None  # mounted
        if "Location" not in response.headers:
            raise RegistryError(f"registry {source.name}: {what}: 202 without Location")
        return response.url.join(response.headers["Location"])

    async def created(source: Source, response: httpx.Response) -> None:
        return None

    # A failed PUT may have spoiled the upload session: each attempt starts a new one.
    for attempt in range(origin.retries + 1):
        upload = await session.request(
            origin, "POST", f"/v2/{repository}/blobs/uploads/", what, location,
            ok=(201, 202), params=mount, headers={"Content-Length": "0"},
        )  # fmt: skip
        if upload is None:
            return False
        try:
            await session.request(
                origin, "PUT", upload.copy_merge_params({"digest": digest}), what,
                created, ok=(201,), retries=0, deadline=False, headers=put_headers,
                content=data if data is not None else _file_chunks(path),
            )  # fmt: skip
            return True
        except RegistryUnavailableError:
            if attempt == origin.retries:
                raise
            await trio.sleep(session.delay_s(attempt + 1, None))
    raise AssertionError("unreachable")


async def push_manifest(
    session: RegistrySession,
    origin: Source,
    repository: str,
    reference: str,
    body: bytes,
    media_type: str,
) -> str:
    """PUT a manifest or index to `origin` under a tag or its digest; return its digest.

    Raises ValueError if `reference` is a digest other than the body's, RegistryError
    subclasses otherwise.
    """
    validate_repository(repository)
    pinned = is_digest_reference(reference)
    digest = await session.hash(body, algorithm_of(reference) if pinned else "sha256")
    if pinned and digest != reference:
        raise ValueError(f"manifest for {repository}@{reference}: body has digest {digest}")
    what = f"manifest {repository}{'@' if pinned else ':'}{reference} (push)"

    async def stored(source: Source, response: httpx.Response) -> None:
        returned = response.headers.get("Docker-Content-Digest", "")
        if algorithm_of(returned) == algorithm_of(digest) and returned != digest:
            raise DigestMismatchError(
                f"registry {source.name}: {what}: registry computed {returned}, sent {digest}"
            )

    await session.request(
        origin, "PUT", f"/v2/{repository}/manifests/{reference}", what, stored,
        ok=(201,), headers={"Content-Type": media_type}, content=body,
    )  # fmt: skip
    return digest
