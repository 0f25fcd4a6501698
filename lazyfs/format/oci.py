"""OCI and Docker v2 manifest and index models: parsing and serialization, no I/O.

Serialization is canonical for lazyfs: compact JSON (`separators=(",", ":")`), UTF-8, fields
in the order the OCI image spec lists them, optional fields omitted when empty, annotation
keys sorted. Two equal models therefore always serialize to the same bytes, hence the same
digest. A digest always refers to bytes as fetched or pushed: never re-serialize a fetched
manifest to compute its digest (fields unknown to these models are dropped on parse).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lazyfs.errors import LazyfsError
from lazyfs.format.descriptor import (
    MEDIA_TYPE_EROFS,
    MEDIA_TYPE_EROFS_ZSTD,
    Descriptor,
    descriptor_from_dict,
)
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.platform import Platform

# Manifests and indexes.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# Preference order for the Accept header of manifest requests.
ACCEPTED_MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)

# Image configuration.
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Layers.
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
EROFS_LAYER = MEDIA_TYPE_EROFS
EROFS_LAYER_ZSTD = MEDIA_TYPE_EROFS_ZSTD
TAR_LAYER_TYPES = frozenset(
    {OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN_GZIP}
)
EROFS_LAYER_TYPES = frozenset({EROFS_LAYER, EROFS_LAYER_ZSTD})

class PlatformNotFoundError(LazyfsError, LookupError):
    """An index has no manifest for the requested platform."""


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker v2 schema 2): one config and ordered layers."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    media_type: str = OCI_MANIFEST
    annotations: Mapping[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None


@dataclass(frozen=True)
class Index:
    """An image index (OCI) or manifest list (Docker): manifests per platform."""

    manifests: tuple[Descriptor, ...]
    media_type: str = OCI_INDEX
    annotations: Mapping[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None

    def select(self, platform: Platform) -> Descriptor:
        """Return the first manifest for `platform`; raise PlatformNotFoundError listing those
        available."""
        for descriptor in self.manifests:
            if descriptor.platform is not None and platform.matches(descriptor.platform):
                return descriptor
        available = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
        raise PlatformNotFoundError(
            f"no manifest for platform {platform.normalized()} (available: {available})"
        )


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest (`sha256:<hex>`) of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes, algorithm: str) -> str:
    """The OCI digest (`ALGORITHM:<hex>`) of `data`, for a hashlib algorithm name."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


# --- parsing ------------------------------------------------------------------------------


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as error:
        raise OCIFormatError(f"{what}: not valid JSON: {error}") from None
    if not isinstance(obj, dict):
        raise OCIFormatError(f"{what}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _get(obj: Mapping[str, Any], key: str, kind: type, where: str, *, required: bool) -> Any:
    if key not in obj:
        if required:
            raise OCIFormatError(f"{where}: missing field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OCIFormatError(
            f"{where}.{key}: expected {kind.__name__}, found {type(value).__name__}"
        )
    return value


def _annotations(obj: Mapping[str, Any], where: str) -> dict[str, str]:
    value = _get(obj, "annotations", dict, where, required=False) or {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise OCIFormatError(f"{where}.annotations[{key!r}]: expected str")
    return dict(value)


def _load_document(
    data: bytes, what: str, expected: frozenset[str], content_type: str | None, default: str
) -> tuple[dict[str, Any], str]:
    """The decoded JSON of a manifest or index and its media type: the JSON `mediaType`, else
    `content_type` if it is one of `expected`, else `default`. Raises OCIFormatError."""
    obj = _load(data, what)
    hint = content_type if content_type in expected else default
    return obj, _check_header(obj, what, expected, hint)


def _check_header(obj: Mapping[str, Any], what: str, expected: frozenset[str], hint: str) -> str:
    version = _get(obj, "schemaVersion", int, what, required=True)
    if version != 2:
        raise OCIFormatError(f"{what}.schemaVersion: expected 2, found {version}")
    media_type = _get(obj, "mediaType", str, what, required=False) or hint
    if media_type not in expected:
        raise OCIFormatError(
            f"{what}.mediaType: expected one of {sorted(expected)}, found {media_type!r}"
        )
    return media_type


def _descriptors(items: list[Any], where: str) -> tuple[Descriptor, ...]:
    return tuple(descriptor_from_dict(item, f"{where}[{i}]") for i, item in enumerate(items))


def _subject(obj: Mapping[str, Any], what: str) -> Descriptor | None:
    subject = obj.get("subject")
    return None if subject is None else descriptor_from_dict(subject, f"{what}.subject")


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest:
    """Parse an OCI image manifest or Docker v2 schema 2 manifest.

    `media_type` (e.g. the HTTP Content-Type) is used when the JSON has no `mediaType`.
    Raises OCIFormatError naming the bad field.
    """
    obj, kind = _load_document(data, "manifest", MANIFEST_TYPES, media_type, OCI_MANIFEST)
    layers = _get(obj, "layers", list, "manifest", required=True)
    return Manifest(
        media_type=kind,
        config=descriptor_from_dict(
            _get(obj, "config", dict, "manifest", required=True), "manifest.config"
        ),
        layers=_descriptors(layers, "manifest.layers"),
        annotations=_annotations(obj, "manifest"),
        subject=_subject(obj, "manifest"),
        artifact_type=_get(obj, "artifactType", str, "manifest", required=False),
    )


def parse_index(data: bytes, media_type: str | None = None) -> Index:
    """Parse an OCI image index or Docker manifest list; raise OCIFormatError if invalid."""
    obj, kind = _load_document(data, "index", INDEX_TYPES, media_type, OCI_INDEX)
    items = _get(obj, "manifests", list, "index", required=True)
    return Index(
        media_type=kind,
        manifests=_descriptors(items, "index.manifests"),
        annotations=_annotations(obj, "index"),
        subject=_subject(obj, "index"),
        artifact_type=_get(obj, "artifactType", str, "index", required=False),
    )


def detect_media_type(data: bytes, content_type: str | None = None) -> str:
    """Return the media type of a manifest or index: the JSON `mediaType`, else a known
    `content_type`, else guessed from the fields present. Raises OCIFormatError."""
    obj = _load(data, "manifest")
    declared = obj.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if content_type in MANIFEST_TYPES | INDEX_TYPES:
        return content_type
    if obj.get("schemaVersion") == 1:
        return DOCKER_MANIFEST_V1
    if "manifests" in obj:
        return OCI_INDEX
    if "config" in obj and "layers" in obj:
        return OCI_MANIFEST
    raise OCIFormatError("manifest: cannot tell its media type (no mediaType, config or manifests)")


def parse_manifest_or_index(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse either kind, as told by `detect_media_type`. Schema 1 is rejected."""
    kind = detect_media_type(data, media_type)
    if kind in INDEX_TYPES:
        return parse_index(data, kind)
    if kind in MANIFEST_TYPES:
        return parse_manifest(data, kind)
    raise OCIFormatError(f"manifest: unsupported media type {kind!r}")


# --- serialization ------------------------------------------------------------------------


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _tail(obj: dict[str, Any], item: Manifest | Index) -> dict[str, Any]:
    if item.subject is not None:
        obj["subject"] = item.subject.to_json_dict()
    if item.annotations:
        obj["annotations"] = dict(sorted(item.annotations.items()))
    return obj


def serialize_manifest(manifest: Manifest) -> bytes:
    """Serialize canonically (see the module docstring)."""
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": manifest.media_type}
    if manifest.artifact_type:
        obj["artifactType"] = manifest.artifact_type
    obj["config"] = manifest.config.to_json_dict()
    obj["layers"] = [layer.to_json_dict() for layer in manifest.layers]
    return _dump(_tail(obj, manifest))


def serialize_index(index: Index) -> bytes:
    """Serialize canonically (see the module docstring)."""
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": index.media_type}
    if index.artifact_type:
        obj["artifactType"] = index.artifact_type
    obj["manifests"] = [item.to_json_dict() for item in index.manifests]
    return _dump(_tail(obj, index))
