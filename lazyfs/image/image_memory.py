"""What the disk cache remembers of images, so that an image mounted before mounts again while
its registry cannot be reached.

A layer's metadata and chunks are in the disk cache already, keyed by the digests that
authenticate them; what an image adds is the way to them: the manifest (or index) a tag last
pointed to, and the manifests and configs it names. Those are kept by digest and checked
against it when read back, so a damaged or planted entry is refused, never used. The pointer
from a tag to a digest is the one thing nothing authenticates (it is as trustworthy as the
cache directory, which only root writes): under the pull policy "always" it is used only when
the registry cannot be reached (after the client's own retries), with a warning that names the
digest; under "missing" it is used without asking the registry, as a container runtime runs
an image pulled before (`docker run` does by default), and the registry is asked only for a
tag it does not remember; under "never" the registry is not asked at all.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from lazyfs.cache.disk import DiskCache
from lazyfs.fetch.registry_head_start import MAX_DOCUMENT_BYTES
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.oci import detect_media_type, digest_of
from lazyfs.image.errors import ImageResolveError
from lazyfs.image.keys import image_data_key, tag_key

if TYPE_CHECKING:
    from lazyfs.fetch.registry_head_start import ManifestSource

log = logging.getLogger(__name__)

DIGEST_PREFIXES = ("sha256:", "sha512:")

class ImageMemory:
    """The manifests and configs of the images resolved through one registry `client`,
    remembered in `disk` and answered from it when the registry is unreachable."""

    def __init__(self, client: ManifestSource, registry: str, disk: DiskCache,
                 pull: str = "always") -> None:
        self._client = client
        self._registry = registry
        self._disk = disk
        self._pull = pull  # one of lazyfs.cache.disk.PULL_POLICIES

    def wrapping(self, client: ManifestSource) -> ImageMemory:
        """The same memory in front of another client (one answering from a head start)."""
        return ImageMemory(client, self._registry, self._disk, self._pull)

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
                raise ImageResolveError(
                    f"{self._registry}/{repository}{at}{reference}: the disk cache does not "
                    "remember this image, and --pull never does not ask the registry")
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
            raise ImageResolveError(f"{self._registry}/{repository}@{digest}: the disk cache "
                                    "does not hold this config, and --pull never does not ask "
                                    "the registry")
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
        pointer = await self._disk.get(tag_key(self._registry, repository, reference))
        if pointer is None:
            return None
        try:
            fields = json.loads(pointer)
            digest, media_type = str(fields["digest"]), str(fields["media_type"])
        except (ValueError, KeyError, TypeError):
            log.warning("disk cache: a damaged entry for %s:%s; ignored", repository, reference)
            return None
        data = await self._kept(digest)
        return None if data is None else (data, media_type, digest)

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
        return data

    async def _keep(self, digest: str, data: bytes) -> None:
        key = image_data_key(digest)
        if key is not None and not await self._disk.contains(key):
            await self._disk.put(key, data)
