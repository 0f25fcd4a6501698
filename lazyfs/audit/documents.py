"""An image's documents as a check needs them: the top index or manifest, then for each
platform its manifest and config, every one read through an `ImageSource` (which checks it
against its digest and size).

What cannot be read or parsed below the top (a manifest that fails its digest, a config that
is not JSON) is kept as a problem naming the platform, and the rest is read on; index entries
that are not images (nested indexes, attestations, other artifacts) are set aside, as
`lazyfs convert` leaves them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from converter.errors import ConvertError
from converter.image.sources import ImageSource
from lazyfs.errors import LazyfsError
from lazyfs.format import oci
from lazyfs.format.descriptor import Descriptor
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.platform import Platform

# docker buildx puts provenance next to the images of an index; it describes the image.
REFERENCE_TYPE = "vnd.docker.reference.type"


@dataclass(frozen=True)
class PlatformImage:
    """One image of the top document: its descriptor (the index entry, or the top itself),
    its manifest and its config (None when they could not be read: a problem says why)."""

    name: str  # the platform as os/architecture[/variant], unique within the image
    platform: Platform | None  # from the index entry, else from the config
    entry: Descriptor
    manifest: oci.Manifest | None
    config: dict[str, Any] | None

    @property
    def diff_ids(self) -> list[str] | None:
        """The config's rootfs.diff_ids when they are a list of strings, else None."""
        rootfs = self.config.get("rootfs") if self.config is not None else None
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
            return ids
        return None


@dataclass(frozen=True)
class ImageDocuments:
    """The documents of one image, and what could not be read of them."""

    description: str
    top: Descriptor
    index: oci.Index | None
    images: tuple[PlatformImage, ...]
    set_aside: tuple[Descriptor, ...]  # index entries that are not images
    problems: tuple[str, ...]


def config_platform(config: dict[str, Any]) -> Platform | None:
    os_name, architecture = config.get("os"), config.get("architecture")
    if not isinstance(os_name, str) or not isinstance(architecture, str):
        return None
    variant = config.get("variant")
    return Platform(os_name, architecture, variant if isinstance(variant, str) else None)


async def load_documents(source: ImageSource) -> ImageDocuments:
    """Read the documents of the image `source` holds. Raises what reading the top raises
    (ConvertError, RegistryError: the image cannot be checked at all) and ConvertError for a
    top document that is neither an image manifest nor an index."""
    root = await source.root()
    top = Descriptor(root.media_type, root.digest, len(root.data))
    problems: list[str] = []
    if root.media_type in oci.MANIFEST_TYPES:
        image = await _load_image(source, top, root.data, None, problems)
        return ImageDocuments(source.description, top, None, (image,), (), tuple(problems))
    if root.media_type not in oci.INDEX_TYPES:
        raise ConvertError(f"{source.description}: top document of media type "
                           f"{root.media_type}, neither an image manifest nor an index")
    try:
        index = oci.parse_index(root.data, root.media_type)
    except OCIFormatError as exc:
        raise ConvertError(f"{source.description}: {exc}") from None
    images, set_aside = [], []
    for entry in index.manifests:
        if entry.media_type not in oci.MANIFEST_TYPES or REFERENCE_TYPE in entry.annotations:
            set_aside.append(entry)
            continue
        try:
            data = await source.read_blob(entry, "manifest")
        except LazyfsError as exc:
            name = str(entry.platform) if entry.platform else entry.digest
            problems.append(f"{name}: manifest {entry.digest}: {exc}")
            images.append(PlatformImage(name, entry.platform, entry, None, None))
            continue
        images.append(await _load_image(source, entry, data, entry.platform, problems))
    return ImageDocuments(source.description, top, index, tuple(_unique(images)),
                          tuple(set_aside), tuple(problems))


async def _load_image(source: ImageSource, entry: Descriptor, data: bytes,
                      platform: Platform | None, problems: list[str]) -> PlatformImage:
    name = str(platform) if platform else "image"
    try:
        manifest = oci.parse_manifest(data, entry.media_type)
    except OCIFormatError as exc:
        problems.append(f"{name}: manifest {entry.digest}: {exc}")
        return PlatformImage(name, platform, entry, None, None)
    try:
        raw = await source.read_blob(manifest.config, "image config")
        config = json.loads(raw)
    except LazyfsError as exc:
        problems.append(f"{name}: config {manifest.config.digest}: {exc}")
        config = None
    except (UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{name}: config {manifest.config.digest}: not valid JSON: {exc}")
        config = None
    if config is not None and not isinstance(config, dict):
        problems.append(f"{name}: config {manifest.config.digest}: not a JSON object")
        config = None
    if platform is None and config is not None:
        platform = config_platform(config)
        name = str(platform) if platform else name
    return PlatformImage(name, platform, entry, manifest, config)


def _unique(images: list[PlatformImage]) -> list[PlatformImage]:
    """Names made unique: a second image of one platform is `linux/amd64#2`."""
    seen: dict[str, int] = {}
    out = []
    for image in images:
        count = seen[image.name] = seen.get(image.name, 0) + 1
        if count > 1:
            image = PlatformImage(f"{image.name}#{count}", image.platform, image.entry,
                                  image.manifest, image.config)
        out.append(image)
    return out


__all__ = ["REFERENCE_TYPE", "ImageDocuments", "PlatformImage", "config_platform",
           "load_documents"]
