"""What a converted image's documents must say: alone, and against its source's. Pure.

Alone (`check_image`): every config is an image config whose `rootfs.diff_ids` has one entry
per layer, every layer is seekable EROFS, and an index entry's platform is its config's.

Against the source (`compare_images`), following what a conversion may change (containerd's
converter, core/images/converter, and `lazyfs convert` alike) and nothing else:

- the same platforms, told by os, architecture and variant; the image's index entry keeps the
  source's `os.version` and `os.features` (a feature the source lacks is a difference, one it
  has and the image dropped too) and annotations; so does each config;
- media types stay, or become their OCI counterparts (a Docker manifest list an OCI index, a
  Docker manifest an OCI manifest, a Docker config an OCI config);
- index and manifest annotations stay; each layer's stay, beside the ones a seekable layer
  adds (`dev.containerd.erofs.*`, `dev.lazyfs.prefetch`, `containerd.io/uncompressed`);
- the config stays, except `rootfs.diff_ids` (each layer's own, checked against the layer)
  and the legacy `config.Image` and `container_config.Image` ids that converters drop;
- as many layers, in order (their content is compared file by file elsewhere).

Every problem is one line that starts with what it is about: `index`, or a platform.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lazyfs.audit.documents import ImageDocuments, PlatformImage, config_platform
from lazyfs.format import oci
from lazyfs.format.descriptor import LABEL_UNCOMPRESSED
from lazyfs.format.platform import Platform
from lazyfs.format.prefetch_list import ANNOTATION_LAYOUT, ANNOTATION_PREFETCH

SEEKABLE_ANNOTATION_PREFIX = "dev.containerd.erofs."
OCI_COUNTERPARTS = {
    oci.DOCKER_MANIFEST_LIST: oci.OCI_INDEX,
    oci.DOCKER_MANIFEST: oci.OCI_MANIFEST,
    oci.DOCKER_CONFIG: oci.OCI_CONFIG,
}
_DROPPED_IDS = ("config", "container_config")  # their "Image" key
_SHOWN_CHARACTERS = 100


@dataclass(frozen=True)
class PlatformPair:
    """An image of the converted image and the source image it stands for."""

    name: str
    image: PlatformImage
    source: PlatformImage


def short_digest(digest: str) -> str:
    return digest[:19]


def layer_label(number: int, total: int, digest: str) -> str:
    return f"layer {number}/{total} ({short_digest(digest)})"


# --- the image alone ------------------------------------------------------------------------


def check_image(documents: ImageDocuments) -> list[str]:
    """Problems of the image's documents on their own (those reading them met included)."""
    problems = list(documents.problems)
    for image in documents.images:
        manifest, name = image.manifest, image.name
        if manifest is None:
            continue
        if manifest.config.media_type not in oci.CONFIG_TYPES:
            problems.append(f"{name}: config media type {manifest.config.media_type}, not an "
                            "image config")
        total = len(manifest.layers)
        for number, layer in enumerate(manifest.layers, 1):
            if layer.media_type != oci.EROFS_LAYER_ZSTD:
                problems.append(f"{name}: {layer_label(number, total, layer.digest)}: media "
                                f"type {layer.media_type}, not seekable EROFS")
        if image.config is None:
            continue
        diff_ids = image.diff_ids
        if diff_ids is None:
            problems.append(f"{name}: config: no rootfs.diff_ids list")
        elif len(diff_ids) != total:
            problems.append(f"{name}: config: {len(diff_ids)} diff_ids for {total} layers")
        found = config_platform(image.config)
        listed = image.entry.platform
        if listed is not None and found is not None and _key(listed) != _key(found):
            problems.append(f"{name}: the index says {listed}, the config {found}")
    return problems


# --- against the source -----------------------------------------------------------------------


def _key(platform: Platform | None) -> tuple[str, str, str | None] | None:
    if platform is None:
        return None
    normal = platform.normalized()
    return normal.os, normal.architecture, normal.variant


def _kind(documents: ImageDocuments) -> str:
    return "an index" if documents.index is not None else "a manifest"


def _media_type(what: str, found: str, source: str) -> list[str]:
    if found in (source, OCI_COUNTERPARTS.get(source)):
        return []
    return [f"{what}: media type {found}, the source's is {source}"]


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= _SHOWN_CHARACTERS else text[:_SHOWN_CHARACTERS - 3] + "..."


def json_differences(source: Any, found: Any, path: str) -> list[str]:
    """`path: ...` lines for each difference between two JSON values, objects key by key."""
    if not isinstance(source, dict) or not isinstance(found, dict):
        return [] if source == found else [f"{path}: {_shown(found)}, the source has "
                                           f"{_shown(source)}"]
    out = []
    for key in sorted(source.keys() | found.keys()):
        where = f"{path}.{key}" if path else str(key)
        if key not in found:
            out.append(f"{where}: missing (the source has {_shown(source[key])})")
        elif key not in source:
            out.append(f"{where}: {_shown(found[key])}, not in the source")
        else:
            out += json_differences(source[key], found[key], where)
    return out


def _annotations(what: str, source: Mapping[str, str], found: Mapping[str, str]) -> list[str]:
    return [f"{what} annotation {line}" for line in json_differences(dict(source), dict(found),
                                                                      "")]


def _features(what: str, source: list[str] | tuple[str, ...] | None,
              found: list[str] | tuple[str, ...] | None) -> list[str]:
    extra = [f for f in found or () if f not in (source or ())]
    lost = [f for f in source or () if f not in (found or ())]
    out = []
    if extra:
        out.append(f"{what} os.features {', '.join(extra)}: not in the source")
    if lost:
        out.append(f"{what} os.features {', '.join(lost)}: in the source, not in the image")
    return out


def _layer_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in annotations.items()
            if not k.startswith(SEEKABLE_ANNOTATION_PREFIX)
            and k not in (ANNOTATION_PREFETCH, ANNOTATION_LAYOUT, LABEL_UNCOMPRESSED)}


def _comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    out.pop("os.features", None)
    rootfs = out.get("rootfs")
    if isinstance(rootfs, dict):
        out["rootfs"] = {k: v for k, v in rootfs.items() if k != "diff_ids"}
    for key in _DROPPED_IDS:
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "Image"}
    return out


def pair_images(image: ImageDocuments, source: ImageDocuments) -> tuple[list[PlatformPair],
                                                                        list[str]]:
    """The images of both paired by platform, and a problem for each left without a pair."""
    if len(image.images) == 1 == len(source.images) and image.index is None is source.index:
        only, theirs = image.images[0], source.images[0]
        return [PlatformPair(only.name, only, theirs)], []
    pairs, problems = [], []
    unmatched = list(image.images)
    for theirs in source.images:
        match = next((mine for mine in unmatched if _key(mine.platform) is not None
                      and _key(mine.platform) == _key(theirs.platform)), None)
        if match is None:
            problems.append(f"{theirs.name}: in the source, missing from the image")
            continue
        unmatched.remove(match)
        pairs.append(PlatformPair(theirs.name, match, theirs))
    problems += [f"{mine.name}: in the image, not in the source" for mine in unmatched]
    return pairs, problems


def compare_images(image: ImageDocuments, source: ImageDocuments) -> tuple[list[PlatformPair],
                                                                           list[str]]:
    """The platform pairs, and every difference of the documents that a conversion must not
    make (see the module docstring)."""
    problems: list[str] = []
    if (image.index is None) != (source.index is None):
        problems.append(f"index: the image is {_kind(image)}, the source {_kind(source)}")
    else:
        problems += _media_type("index" if image.index else "manifest", image.top.media_type,
                                source.top.media_type)
    if image.index is not None and source.index is not None:
        problems += _annotations("index", source.index.annotations, image.index.annotations)
    pairs, missing = pair_images(image, source)
    problems += missing
    indexed = image.index is not None and source.index is not None
    for pair in pairs:
        problems += [f"{pair.name}: {p}" for p in compare_pair(pair, indexed)]
    return pairs, problems


def compare_pair(pair: PlatformPair, indexed: bool) -> list[str]:
    """The differences of one image from its source's (lines without the platform)."""
    mine, theirs = pair.image, pair.source
    out: list[str] = []
    if indexed:
        out += _annotations("index entry", theirs.entry.annotations, mine.entry.annotations)
        want, got = theirs.entry.platform, mine.entry.platform
        if want is not None and got is not None:
            out += _features("platform", want.os_features, got.os_features)
            if want.os_version != got.os_version:
                out.append(f"platform os.version {got.os_version}, the source's is "
                           f"{want.os_version}")
    if mine.manifest is None or theirs.manifest is None:
        return out
    out += _media_type("manifest", mine.entry.media_type, theirs.entry.media_type)
    out += _annotations("manifest", theirs.manifest.annotations, mine.manifest.annotations)
    out += _media_type("config", mine.manifest.config.media_type,
                       theirs.manifest.config.media_type)
    if mine.config is not None and theirs.config is not None:
        out += _features("config", theirs.config.get("os.features"),
                         mine.config.get("os.features"))
        out += [f"config: {line}" for line in json_differences(
            _comparable_config(theirs.config), _comparable_config(mine.config), "")]
    layers, source_layers = mine.manifest.layers, theirs.manifest.layers
    if len(layers) != len(source_layers):
        out.append(f"{len(layers)} layers, the source has {len(source_layers)}")
        return out
    for number, (layer, source_layer) in enumerate(zip(layers, source_layers, strict=True), 1):
        out += _annotations(layer_label(number, len(layers), layer.digest),
                            _layer_annotations(source_layer.annotations),
                            _layer_annotations(layer.annotations))
    return out


__all__ = [
    "OCI_COUNTERPARTS",
    "PlatformPair",
    "check_image",
    "compare_images",
    "compare_pair",
    "json_differences",
    "layer_label",
    "pair_images",
    "short_digest",
]
