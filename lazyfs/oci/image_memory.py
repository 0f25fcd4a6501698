"""What the disk cache remembers of images, so that an image mounted before mounts again while
its registry cannot be reached.

A layer's metadata and chunks are in the disk cache already, keyed by the digests that
authenticate them; what an image adds is the way to them: the manifest (or index) a tag last
pointed to, and the manifests and configs it names. Those are kept by digest and checked
against it when read back, so a damaged or planted entry is refused, never used. The pointer
from a tag to a digest is the one thing nothing authenticates: it is as trustworthy as the
cache directory, so a directory that another user could change is refused before anything is
read from it (`lazyfs.cache.trust`). Under the pull policy "always" it is used only when
the registry cannot be reached (after the client's own retries), with a warning that names the
digest; under "missing" it is used without asking the registry, as a container runtime runs
an image pulled before (`docker run` does by default), and the registry is asked only for a
tag it does not remember; under "never" the registry is not asked at all.

A resolution reads the entries straight from their files and keeps what it would write
(`PendingEntries`), for the daemon to write once the mount is up: opening the cache's index,
writing and fsyncing entries, then closing the index as its last connection (a WAL checkpoint
with an fsync) took 10-15 ms of a start's critical path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from lazyfs.cache.disk_index import DiskCacheError
from lazyfs.cache.disk_store import entry_path, read_entry
from lazyfs.cache.keys import image_data_key, tag_key
from lazyfs.cache.trust import find_unsafe, untrusted_message
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.oci import detect_media_type, digest_of
from lazyfs.layer.errors import ImageResolveError
from lazyfs.startup.registry_head_start import MAX_DOCUMENT_BYTES

if TYPE_CHECKING:
    from lazyfs.startup.registry_head_start import ManifestSource

log = logging.getLogger(__name__)

DIGEST_PREFIXES = ("sha256:", "sha512:")


class Entries(Protocol):
    """The part of `lazyfs.cache.disk.DiskCache` an ImageMemory uses."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def contains(self, key: str) -> bool: ...


class PendingEntries:
    """The disk cache in `directory` read without its index, entries straight from their
    files, and written later: `writes` lists what to write, in order ((key, bytes), or
    (key, None) to drop the entry), for a process that has the cache open (the daemon). Reads
    see those writes. A file that cannot be read counts as absent (the daemon, which opens
    the cache, reports what is wrong with it). Raises DiskCacheError for a directory that
    another user could change (`lazyfs.cache.trust.find_unsafe`)."""

    def __init__(self, directory: str) -> None:
        unsafe = find_unsafe(directory)
        if unsafe is not None:
            raise DiskCacheError(untrusted_message(directory, unsafe))
        self._directory = Path(directory)
        self.writes: list[tuple[str, bytes | None]] = []
        self._latest: dict[str, bytes | None] = {}

    async def get(self, key: str) -> bytes | None:
        if key in self._latest:
            return self._latest[key]
        try:
            return await trio.to_thread.run_sync(read_entry, self._directory, key)
        except OSError as exc:
            log.debug("disk cache: cannot read %s: %s", key, exc)
            return None

    async def put(self, key: str, data: bytes) -> None:
        self._write(key, data)

    async def delete(self, key: str) -> None:
        self._write(key, None)

    async def contains(self, key: str) -> bool:
        if key in self._latest:
            return self._latest[key] is not None
        try:
            return await trio.to_thread.run_sync(entry_path(self._directory, key).exists)
        except OSError as exc:
            log.debug("disk cache: cannot look up %s: %s", key, exc)
            return False

    def _write(self, key: str, data: bytes | None) -> None:
        self.writes.append((key, data))
        self._latest[key] = data


class ImageMemory:
    """The manifests and configs of the images resolved through one registry `client`,
    remembered in `disk` and answered from it when the registry is unreachable (or when
    `pull` says so). `used` lists the keys of the entries answers came from."""

    def __init__(self, client: ManifestSource, registry: str, disk: Entries,
                 pull: str = "always", used: list[str] | None = None) -> None:
        self._client = client
        self._registry = registry
        self._disk = disk
        self._pull = pull  # one of lazyfs.cache.disk.PULL_POLICIES
        self.used = [] if used is None else used

    def wrapping(self, client: ManifestSource) -> ImageMemory:
        """The same memory in front of another client (one answering from a head start)."""
        return ImageMemory(client, self._registry, self._disk, self._pull, self.used)

    @staticmethod
    def _not_remembered(what: str) -> ImageResolveError:
        """The error for `what` the disk cache lacks under the pull policy "never"."""
        return ImageResolveError(f"{what}: the disk cache does not remember this image, "
                                 "and --pull never does not ask the registry")

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """`RegistryClient.get_manifest`, remembered: a manifest asked for by digest comes from
        the disk cache when it holds it (content-addressed, checked against the digest);
        one asked for by tag comes from the registry, and from the disk cache when the
        registry is unreachable or the pull policy says so. Raises ImageResolveError for a
        tag not remembered under the policy "never"."""
        from lazyfs.fetch.registry_session import RegistryUnavailableError

        if reference.startswith(DIGEST_PREFIXES) or self._pull != "always":
            kept = await self._kept_manifest(repository, reference)
            if kept is not None:
                if not reference.startswith(DIGEST_PREFIXES):
                    log.info("%s:%s: %s, as the disk cache remembers it (pull policy %s)",
                             repository, reference, kept[2], self._pull)
                return kept
            if self._pull == "never":
                at = "@" if reference.startswith(DIGEST_PREFIXES) else ":"
                raise self._not_remembered(f"{self._registry}/{repository}{at}{reference}")
        try:
            data, media_type, digest = await self._client.get_manifest(repository, reference)
        except RegistryUnavailableError as exc:
            kept = await self._kept_manifest(repository, reference)
            if kept is None:
                raise
            log.warning("%s; using %s@%s, remembered from an earlier mount", exc, repository,
                        kept[2])
            return kept
        await self._keep(digest, data)
        if not reference.startswith(DIGEST_PREFIXES):
            pointer = json.dumps({"digest": digest, "media_type": media_type}).encode()
            key = tag_key(self._registry, repository, reference)
            if await self._disk.get(key) != pointer:
                await self._disk.delete(key)
                await self._disk.put(key, pointer)
        return data, media_type, digest

    async def get_blob(self, repository: str, digest: str, *,
                       max_size_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
        """`RegistryClient.get_blob` (an image config), remembered: from the disk cache when
        it holds the blob (checked against its digest), else from the registry."""
        kept = await self._kept(digest)
        if kept is not None and len(kept) <= max_size_bytes:
            return kept
        if self._pull == "never":
            raise self._not_remembered(f"{self._registry}/{repository}@{digest}")
        data = await self._client.get_blob(repository, digest, max_size_bytes=max_size_bytes)
        await self._keep(digest, data)
        return data

    async def _kept_manifest(self, repository: str,
                             reference: str) -> tuple[bytes, str, str] | None:
        if reference.startswith(DIGEST_PREFIXES):
            data = await self._kept(reference)
            if data is None:
                return None
            try:
                return data, detect_media_type(data, None), reference
            except OCIFormatError:
                return None
        pointer_key = tag_key(self._registry, repository, reference)
        pointer = await self._disk.get(pointer_key)
        if pointer is None:
            return None
        try:
            fields = json.loads(pointer)
            digest, media_type = str(fields["digest"]), str(fields["media_type"])
        except (ValueError, KeyError, TypeError):
            log.warning("disk cache: a damaged entry for %s:%s; ignored", repository, reference)
            return None
        data = await self._kept(digest)
        if data is None:
            return None
        self.used.append(pointer_key)
        return data, media_type, digest

    async def _kept(self, digest: str) -> bytes | None:
        """The remembered bytes of `digest`, if they still match it (else dropped)."""
        key = image_data_key(digest)
        if key is None:
            return None
        data = await self._disk.get(key)
        if data is None:
            return None
        if digest_of(data, digest.partition(":")[0]) != digest:
            log.warning("disk cache: the copy of %s does not match its digest; dropped", digest)
            await self._disk.delete(key)
            return None
        self.used.append(key)
        return data

    async def _keep(self, digest: str, data: bytes) -> None:
        key = image_data_key(digest)
        if key is not None and not await self._disk.contains(key):
            await self._disk.put(key, data)
