"""Which images of a source are converted: each manifest and config read and checked first.

A lone manifest is one image; from an index, the image manifests for the platform asked for
(all of them without one), leaving out nested indexes, attestations and other artifacts. Each
image's config must list as many diff IDs as the manifest has layers, and every layer must be
a tar (plain, gzip, zstd; OCI or Docker media type) or an EROFS layer, so that a conversion
fails before any layer is fetched rather than halfway through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from converter.errors import ConvertError
from converter.image.sources import DOCKER_LAYER_TAR, ImageSource
from lazyfs.format import oci
from lazyfs.format.descriptor import Descriptor
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.platform import Platform

TAR_TYPES = oci.TAR_LAYER_TYPES | {DOCKER_LAYER_TAR}
# docker buildx puts provenance next to the images of an index; it describes the source image.
_REFERENCE_TYPE = "vnd.docker.reference.type"


@dataclass
class SourceImage:
    """One image to convert: its manifest, its parsed config and its entry in the index."""

    entry: Descriptor | None  # its descriptor in the source index, None for a lone manifest
    manifest: oci.Manifest
    config: dict[str, Any]


def _config_platform(config: dict[str, Any]) -> Platform:
    return Platform(str(config.get("os", "")), str(config.get("architecture", "")),
                    config.get("variant") or None)


async def _load_image(source: ImageSource, entry: Descriptor | None, data: bytes,
                      media_type: str) -> SourceImage:
    what = f"{source.description}: manifest {entry.digest if entry else ''}".rstrip()
    try:
        manifest = oci.parse_manifest(data, media_type)
    except OCIFormatError as e:
        raise ConvertError(f"{what}: {e}") from None
    raw = await source.read_blob(manifest.config, "image config")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{what}: config is not valid JSON: {e}") from None
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise ConvertError(f"{what}: the config's rootfs.diff_ids do not match the "
                           f"{len(manifest.layers)} layers of the manifest")
    for number, layer in enumerate(manifest.layers, 1):
        if layer.media_type not in TAR_TYPES | {oci.EROFS_LAYER, oci.EROFS_LAYER_ZSTD}:
            raise ConvertError(f"{what}: layer {number} ({layer.digest}) has media type "
                               f"{layer.media_type}, which is neither a tar nor an EROFS layer")
    return SourceImage(entry, manifest, config)


async def select_images(
    source: ImageSource, data: bytes, media_type: str, platform: Platform | None
) -> tuple[list[SourceImage], oci.Index | None]:
    """The images to convert, and the source index when there is one (the source's top
    manifest or index is `data` of `media_type`). Raises ConvertError."""
    if media_type in oci.MANIFEST_TYPES:
        image = await _load_image(source, None, data, media_type)
        found = _config_platform(image.config)
        if platform is not None and not platform.matches(found):
            raise ConvertError(f"{source.description}: the image is for {found}, not {platform}")
        return [image], None
    if media_type not in oci.INDEX_TYPES:
        raise ConvertError(f"{source.description}: unsupported media type {media_type}")
    try:
        index = oci.parse_index(data, media_type)
    except OCIFormatError as e:
        raise ConvertError(f"{source.description}: {e}") from None
    images, seen = [], []
    for entry in index.manifests:
        if entry.media_type not in oci.MANIFEST_TYPES or _REFERENCE_TYPE in entry.annotations:
            continue  # nested indexes, attestations and other artifacts are left out
        if platform is not None and entry.platform is not None:
            seen.append(str(entry.platform))
            if not platform.matches(entry.platform):
                continue
        body = await source.read_blob(entry, "manifest")
        image = await _load_image(source, entry, body, entry.media_type)
        if platform is not None and entry.platform is None:
            seen.append(str(_config_platform(image.config)))
            if not platform.matches(_config_platform(image.config)):
                continue
        images.append(image)
    if not images:
        wanted = f"for platform {platform} " if platform else ""
        raise ConvertError(f"{source.description}: no image {wanted}in the index "
                           f"(available: {', '.join(seen) or 'none'})")
    return images, index


def distinct_layers(images: list[SourceImage]) -> list[Descriptor]:
    """Each layer of the images once (by digest), in the order first used."""
    layers: dict[str, Descriptor] = {}
    for image in images:
        for layer in image.manifest.layers:
            layers.setdefault(layer.digest, layer)
    return list(layers.values())
