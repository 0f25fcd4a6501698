"""Images in a registry as layers to mount: resolve a reference to one manifest pinned by
digest, check that every layer is seekable EROFS, and describe where to read each one.

The manifest digest is the root of trust. A tag is looked up once; from then on everything
is fetched by digest and checked against it (RegistryClient does), so each layer's
annotations (chunk table offset and digest, dm-verity offset and root digest) are exactly
those of the manifest whose digest is reported to the user.

Layer blobs are read with HTTP ranges from the registry with its credentials (RegistryAuth
follows the same token flows as manifest pulls, and never sends them to a redirect target).
With mirrors, the first mirror that has a blob serves all of its ranges instead: the chunk
digests authenticate whatever a mirror sends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lazyfs.fetch.base import ReaderOptions
from lazyfs.fetch.errors import FetchError
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_TABLE_OFFSET,
    SeekableAnnotations,
    parse_annotations,
)
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.oci import (
    Index,
    PlatformNotFoundError,
    parse_manifest,
    parse_manifest_or_index,
)
from lazyfs.format.platform import Platform
from lazyfs.format.prefetch_list import (
    ANNOTATION_PREFETCH,
    LayerPrefetch,
    PrefetchListError,
    parse_prefetch_annotation,
)
from lazyfs.format.reference import ImageReference
from lazyfs.layer.errors import ImageResolveError, LayerOpenError, UntrustedLayerError
from lazyfs.oci.names import host_platform as host_platform
from lazyfs.oci.names import is_image_reference as is_image_reference
from lazyfs.startup.open import AlternateBlob, LayerSource
from lazyfs.startup.registry_head_start import PrimedClient

if TYPE_CHECKING:
    from lazyfs.fetch.registry import RegistryClient
    from lazyfs.fetch.registry_options import RegistryOptions
    from lazyfs.oci.image_memory import ImageMemory
    from lazyfs.startup.registry_head_start import ManifestSource, PrimedRegistry

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 4 * 1024 * 1024
LAYER_NAME_HEX = 12


class UnconvertedLayerError(LayerOpenError):
    """A layer of the image has no seekable EROFS annotations."""


@dataclass(frozen=True)
class ImageLayer:
    """One layer as the manifest lists it; `name` is what the mount calls it, `prefetch`
    the prefetch list the descriptor carries (annotation `dev.lazyfs.prefetch`)."""

    name: str
    digest: str
    size: int
    media_type: str
    annotations: SeekableAnnotations
    prefetch: LayerPrefetch | None = None


@dataclass(frozen=True)
class ImageConfig:
    """What running a command in the image needs from its config."""

    env: tuple[str, ...] = ()
    working_dir: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    # `rootfs.diff_ids`: what each layer's uncompressed content hashes to, by the config's
    # word (the snapshotter checks it: lazyfs.snapshotter.content_check). Empty when absent.
    diff_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference resolved to one manifest. `layers` in manifest order, bottom first
    (a layer listed twice appears twice)."""

    reference: ImageReference
    manifest_digest: str
    platform: str
    layers: tuple[ImageLayer, ...]
    config: ImageConfig = field(default_factory=ImageConfig)
    index_digest: str | None = None

    @property
    def pinned(self) -> str:
        """The reference pinned to the manifest digest, e.g. `host/app:v1@sha256:…`."""
        return str(self.reference.with_digest(self.manifest_digest))

    @property
    def distinct_layers(self) -> list[ImageLayer]:
        """Each layer once, in order of first appearance."""
        return list({layer.digest: layer for layer in self.layers}.values())


async def resolve_image(
    client: RegistryClient,
    reference: ImageReference,
    platform: Platform,
    *,
    insecure: bool = False,
    memory: ImageMemory | None = None,
    primed: PrimedRegistry | None = None,
) -> ResolvedImage:
    """Fetch the manifest `reference` names (through an index: the one for `platform`) and
    its config, and check every layer. Layers without trusted digests are refused unless
    `insecure`.

    Raises UnconvertedLayerError naming the first layer that is not seekable EROFS,
    UntrustedLayerError, ImageResolveError, DescriptorError for malformed annotations, and
    RegistryError subclasses (NotFoundError, UnauthorizedError, ...). With `memory`, what
    is fetched is remembered, and remembered answers stand in while the registry is down;
    `primed` holds the answers of a head start (`lazyfs.startup.registry_head_start`).
    """
    repository = reference.repository
    source: ManifestSource = client if primed is None else PrimedClient(client, primed)
    if memory is not None:
        source = memory.wrapping(source)
    data, media_type, digest = await source.get_manifest(repository, reference.reference)
    try:
        top = parse_manifest_or_index(data, media_type)
        index_digest = None
        if isinstance(top, Index):
            try:
                entry = top.select(platform)
            except PlatformNotFoundError as exc:
                raise ImageResolveError(f"{reference}: {exc}") from None
            index_digest = digest
            data, media_type, digest = await source.get_manifest(repository, entry.digest)
            manifest = parse_manifest(data, media_type)
        else:
            manifest = top
    except OCIFormatError as exc:
        raise ImageResolveError(f"{reference}@{digest}: {exc}") from None
    if not manifest.layers:
        raise ImageResolveError(f"{reference}@{digest}: the image has no layers")
    if manifest.config.size > MAX_CONFIG_BYTES:
        raise ImageResolveError(
            f"{reference}@{digest}: config of {manifest.config.size} bytes is too large"
        )
    config_bytes = await source.get_blob(
        repository, manifest.config.digest, max_size_bytes=max(1, manifest.config.size)
    )
    config, config_platform = _parse_config(config_bytes, f"{reference} config")
    names = _layer_names([layer.digest for layer in manifest.layers])
    layers = []
    for number, descriptor in enumerate(manifest.layers, start=1):
        where = f"{reference}: layer {number} of {len(manifest.layers)} ({descriptor.digest})"
        if ANNOTATION_CHUNK_TABLE_OFFSET not in descriptor.annotations:
            raise UnconvertedLayerError(
                f"{where} is not a seekable EROFS layer ({descriptor.media_type}); convert it "
                f"first with `lazyfs convert {reference} --push …`"
            )
        annotations = parse_annotations(dict(descriptor.annotations), where)
        if not annotations.is_trusted and not insecure:
            raise UntrustedLayerError(
                f"{where}: refusing to mount: its annotations have no digest to authenticate "
                "it (give --insecure to mount unverified data)"
            )
        layers.append(
            ImageLayer(
                names[descriptor.digest],
                descriptor.digest,
                descriptor.size,
                descriptor.media_type,
                annotations,
                _carried_prefetch(descriptor.annotations, where),
            )
        )
    shown = config_platform or (str(platform.normalized()) if index_digest else "unknown")
    return ResolvedImage(reference, digest, shown, tuple(layers), config, index_digest)


def _carried_prefetch(annotations: Mapping[str, str], where: str) -> LayerPrefetch | None:
    """The layer's prefetch list annotation; a malformed one is only a lost hint: warned
    about and ignored, the layer mounts as usual."""
    value = annotations.get(ANNOTATION_PREFETCH)
    if value is None:
        return None
    try:
        return parse_prefetch_annotation(value, where)
    except PrefetchListError as exc:
        log.warning("%s; no prefetch for this layer", exc)
        return None


def _parse_config(data: bytes, where: str) -> tuple[ImageConfig, str | None]:
    """The run settings and `os/architecture[/variant]` of an image config."""
    try:
        obj: Any = json.loads(data)
    except ValueError as exc:
        raise ImageResolveError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ImageResolveError(f"{where}: expected a JSON object")
    settings = obj.get("config") or {}
    if not isinstance(settings, dict):
        raise ImageResolveError(f"{where}: 'config' must be an object")

    def strings(key: str) -> tuple[str, ...]:
        value = settings.get(key) or []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ImageResolveError(f"{where}: config.{key} must be a list of strings")
        return tuple(value)

    working_dir = settings.get("WorkingDir") or ""
    if not isinstance(working_dir, str):
        raise ImageResolveError(f"{where}: config.WorkingDir must be a string")
    rootfs = obj.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(item, str) for item in diff_ids):
        diff_ids = []
    config = ImageConfig(strings("Env"), working_dir, strings("Entrypoint"), strings("Cmd"),
                         tuple(diff_ids))
    os_name, architecture = obj.get("os"), obj.get("architecture")
    platform = None
    if isinstance(os_name, str) and isinstance(architecture, str):
        variant = obj.get("variant")
        platform = f"{os_name}/{architecture}" + (f"/{variant}" if variant else "")
    return config, platform


def _layer_names(digests: list[str]) -> dict[str, str]:
    """Short unique names for layer digests: the first hex digits, more where they clash."""
    distinct = list(dict.fromkeys(digests))
    for length in (LAYER_NAME_HEX, 64, 128):
        names = {digest: digest.partition(":")[2][:length] for digest in distinct}
        if len(set(names.values())) == len(names):
            return names
    return {digest: digest.replace(":", "-") for digest in distinct}


async def layer_sources(
    reference: ImageReference,
    layers: list[ImageLayer],
    client: RegistryClient,
    options: RegistryOptions,
) -> list[LayerSource]:
    """One LayerSource per layer of `layers` (of the image `reference` names), read from the
    first mirror that has the blob, else from the registry (`client`'s, with its
    credentials); behind a mirror, the registry is the alternate source."""
    repository = reference.repository
    sources = []
    for layer in layers:
        registry_blob = client.blob_url(repository, layer.digest)
        registry_options = ReaderOptions(auth=client.auth, read_timeout_s=options.timeout_s,
                                         expected_size=layer.size)
        blob, auth = await _blob_location(reference, layer.digest, options, client.deadline)
        alternates: tuple[AlternateBlob, ...] = ()
        if blob is None:
            blob, auth = registry_blob, client.auth
        else:
            alternates = (AlternateBlob(registry_blob, registry_options),)
        values = layer.annotations
        sources.append(
            LayerSource(
                blob=blob,
                chunk_table_offset=values.chunk_table_offset,
                chunk_digest=values.chunk_digest,
                verity_offset=values.verity_offset,
                root_digest=values.root_digest,
                # resolve_image has already refused an unauthenticated layer unless the user
                # asked for --insecure; such a layer reaching here is one they accepted.
                insecure=not values.is_trusted,
                name=layer.name,
                reader_options=replace(registry_options, auth=auth),
                alternates=alternates,
                prefetch=layer.prefetch,
            )
        )
    return sources


async def _blob_location(
    reference: ImageReference, digest: str, options: RegistryOptions, deadline: float | None
) -> tuple[str | None, Any]:
    """(blob URL, auth) on the first mirror that has the blob; (None, None) if none does.
    Asking the mirrors ends by `deadline` (trio time, the resolution's), when given."""
    from lazyfs.fetch.registry import RegistryClient  # httpx: only when mounting images

    for mirror in options.mirrors:
        try:
            async with RegistryClient(
                options.url_of(mirror), insecure=options.allows_plain_http,
                timeout=options.timeout_s, retries=0,
                deadline_s=options.deadline_s,
            ) as client:
                if deadline is not None:
                    client.end_by(deadline)
                if await client.blob_exists(reference.repository, digest):
                    log.info("%s: reading %s from mirror %s", reference, digest, mirror)
                    return client.blob_url(reference.repository, digest), client.auth
        except FetchError as exc:
            log.info("mirror %s: %s; trying the next source", mirror, exc)
    return None, None
