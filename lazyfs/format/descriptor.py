"""The OCI content descriptor, and the four annotations of a seekable EROFS layer (SPEC §5).

One `Descriptor` type serves every use: layers, configs, manifests in an index (with their
platform). For a layer it is the root of trust: it comes from a manifest fetched by digest, or
from the user. It locates the chunk table and verity tree and carries the digests that
authenticate them (`Descriptor.seekable`). Beside a blob file it is stored by convention as
`X.descriptor.json` for `X.blob`, else as `BLOB.descriptor.json` (`descriptor_path_for`); the
writer and every reader share that rule.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from lazyfs.format.errors import OCIFormatError
from lazyfs.format.platform import Platform
from lazyfs.format.prefetch_list import ANNOTATION_LAYOUT
from lazyfs.format.reference import InvalidReferenceError, validate_digest

MEDIA_TYPE_EROFS_ZSTD = "application/vnd.erofs.layer.v1+zstd"
MEDIA_TYPE_EROFS = "application/vnd.erofs.layer.v1"

ANNOTATION_CHUNK_TABLE_OFFSET = "dev.containerd.erofs.zstd.chunk_table_offset"
ANNOTATION_CHUNK_DIGEST = "dev.containerd.erofs.zstd.chunk_digest"
ANNOTATION_VERITY_OFFSET = "dev.containerd.erofs.dmverity.offset"
ANNOTATION_ROOT_DIGEST = "dev.containerd.erofs.dmverity.root_digest"
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"

DESCRIPTOR_SUFFIX = ".descriptor.json"
BLOB_SUFFIX = ".blob"

# Used with fullmatch: "^...$" would also accept a trailing newline.
_SHA512_DIGEST = re.compile(r"sha512:[0-9a-f]{128}")
_ROOT_DIGEST = re.compile(r"(sha256|sha512|sha1):[0-9a-f]+")


class DescriptorError(OCIFormatError):
    """A descriptor or its annotations are missing or malformed."""


@dataclass(frozen=True)
class SeekableAnnotations:
    """Where a reader finds the metadata, and the digests that authenticate it."""

    chunk_table_offset: int
    chunk_digest: str | None = None
    verity_offset: int | None = None
    root_digest: str | None = None
    # lazyfs's own: the writer's layout fingerprint, which recorded start-up orders copy.
    layout: str | None = None

    @property
    def metadata_offsets(self) -> tuple[int, ...]:
        offsets = [self.chunk_table_offset]
        if self.verity_offset is not None:
            offsets.append(self.verity_offset)
        return tuple(sorted(offsets))

    @property
    def data_end(self) -> int:
        """End of the data frames: the smallest metadata offset (either order of SPEC §1)."""
        return self.metadata_offsets[0]

    @property
    def is_trusted(self) -> bool:
        """True when every metadata structure present is pinned by a digest."""
        if self.chunk_digest is None:
            return False
        return self.verity_offset is None or self.root_digest is not None

    def to_annotations(self) -> dict[str, str]:
        out = {ANNOTATION_CHUNK_TABLE_OFFSET: str(self.chunk_table_offset)}
        if self.chunk_digest is not None:
            out[ANNOTATION_CHUNK_DIGEST] = self.chunk_digest
        if self.verity_offset is not None:
            out[ANNOTATION_VERITY_OFFSET] = str(self.verity_offset)
        if self.root_digest is not None:
            out[ANNOTATION_ROOT_DIGEST] = self.root_digest
        return out


_MAX_OFFSET_DIGITS = 20  # 2**64 - 1 has 20 decimal digits


def _offset(annotations: Mapping[str, str], key: str, source: str) -> int | None:
    value = annotations.get(key)
    if value is None:
        return None
    # isdigit() alone also accepts non-ASCII digits such as "²", which int() refuses.
    if (not isinstance(value, str) or not value.isascii() or not value.isdigit()
            or len(value) > _MAX_OFFSET_DIGITS or int(value) >= 1 << 64):
        raise DescriptorError(f"{source}: annotation {key}: expected a decimal offset below "
                              f"2^64, found {value!r}")
    return int(value)


def _string(annotations: Mapping[str, str], key: str, source: str) -> str | None:
    value = annotations.get(key)
    if value is not None and not isinstance(value, str):
        raise DescriptorError(f"{source}: annotation {key}: expected a string, found {value!r}")
    return value


def parse_annotations(annotations: Mapping[str, str], source: str = "descriptor") -> (
    SeekableAnnotations
):
    """Read the seekable EROFS annotations. Raises DescriptorError naming the bad one."""
    chunk_table_offset = _offset(annotations, ANNOTATION_CHUNK_TABLE_OFFSET, source)
    if chunk_table_offset is None:
        raise DescriptorError(
            f"{source}: no {ANNOTATION_CHUNK_TABLE_OFFSET} annotation: not a seekable EROFS "
            "layer (convert it with `lazyfs convert`)"
        )
    verity_offset = _offset(annotations, ANNOTATION_VERITY_OFFSET, source)
    chunk_digest = _string(annotations, ANNOTATION_CHUNK_DIGEST, source)
    if chunk_digest is not None:
        chunk_digest = chunk_digest.lower()
        if not _SHA512_DIGEST.fullmatch(chunk_digest):
            raise DescriptorError(f"{source}: annotation {ANNOTATION_CHUNK_DIGEST}: expected "
                                  f"sha512:<128 hex digits>, found {chunk_digest!r}")
    root_digest = _string(annotations, ANNOTATION_ROOT_DIGEST, source)
    if root_digest is not None:
        root_digest = root_digest.lower()
        if not _ROOT_DIGEST.fullmatch(root_digest):
            raise DescriptorError(f"{source}: annotation {ANNOTATION_ROOT_DIGEST}: expected "
                                  f"<algorithm>:<hex>, found {root_digest!r}")
        if verity_offset is None:
            raise DescriptorError(f"{source}: {ANNOTATION_ROOT_DIGEST} is set but "
                                  f"{ANNOTATION_VERITY_OFFSET} is missing")
    if verity_offset is not None and verity_offset == chunk_table_offset:
        raise DescriptorError(f"{source}: chunk table and dm-verity frames both at offset "
                              f"{verity_offset}")
    return SeekableAnnotations(chunk_table_offset, chunk_digest, verity_offset, root_digest,
                               _string(annotations, ANNOTATION_LAYOUT, source))


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: content by media type, digest and size. The fields after
    `size` are keyword-only, so no call depends on their order."""

    media_type: str
    digest: str
    size: int
    _: KW_ONLY
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None
    artifact_type: str | None = None

    def seekable(self, source: str = "descriptor") -> SeekableAnnotations:
        """The seekable EROFS annotations of a layer. Raises DescriptorError."""
        return parse_annotations(self.annotations, source)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object, fields in the order the OCI image spec lists them, annotations
        sorted, optional fields left out when empty."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            out["platform"] = self.platform.to_json_dict()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out


def _is_digest(value: object) -> bool:
    try:
        return isinstance(value, str) and validate_digest(value) == value
    except InvalidReferenceError:
        return False


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _platform_from_dict(obj: object, source: str) -> Platform:
    if not isinstance(obj, dict):
        raise DescriptorError(f"{source}: platform: expected a JSON object, "
                              f"found {type(obj).__name__}")
    fields = {key: obj.get(key) for key in ("os", "architecture", "variant", "os.version")}
    for key, value in fields.items():
        required = key in ("os", "architecture")
        if (value is None and required) or not isinstance(value, str | None):
            raise DescriptorError(f"{source}: platform.{key}: expected a string, "
                                  f"found {value!r:.200}")
    features = obj.get("os.features")
    if features is not None and not _is_strings(features):
        raise DescriptorError(f"{source}: platform.os.features: expected a list of strings, "
                              f"found {features!r:.200}")
    return Platform(str(fields["os"]), str(fields["architecture"]), fields["variant"],
                    fields["os.version"], tuple(features or ()))


def descriptor_from_dict(obj: object, source: str = "descriptor") -> Descriptor:
    """Build a Descriptor from decoded JSON. Raises DescriptorError naming the field."""
    if not isinstance(obj, dict):
        raise DescriptorError(f"{source}: expected a JSON object, found {type(obj).__name__}")
    media_type = obj.get("mediaType")
    digest = obj.get("digest")
    size = obj.get("size")
    annotations = obj.get("annotations")
    if annotations is None:
        annotations = {}
    urls = obj.get("urls")
    if urls is None:
        urls = []
    platform = obj.get("platform")
    artifact_type = obj.get("artifactType")
    if not isinstance(media_type, str):
        raise DescriptorError(f"{source}: mediaType: expected a string, found {media_type!r}")
    if not _is_digest(digest):
        raise DescriptorError(f"{source}: digest: expected sha256:<64 hex digits> or "
                              f"sha512:<128 hex digits>, found {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DescriptorError(f"{source}: size: expected a non-negative integer, found {size!r}")
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise DescriptorError(f"{source}: annotations: expected an object of strings, "
                              f"found {annotations!r:.200}")
    if not _is_strings(urls):
        raise DescriptorError(f"{source}: urls: expected a list of strings, found {urls!r:.200}")
    if not isinstance(artifact_type, str | None):
        raise DescriptorError(f"{source}: artifactType: expected a string, "
                              f"found {artifact_type!r:.200}")
    return Descriptor(
        media_type, str(digest), size, annotations=dict(annotations), urls=tuple(urls),
        platform=None if platform is None else _platform_from_dict(platform, source),
        artifact_type=artifact_type,
    )


def parse_descriptor(text: bytes | str, source: str = "descriptor") -> Descriptor:
    """Parse descriptor JSON. Raises DescriptorError (bad JSON included)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers past Python's digit limit;
        # RecursionError deeply nested arrays.
        raise DescriptorError(f"{source}: not valid JSON: {exc}") from None
    return descriptor_from_dict(obj, source)


def serialize_descriptor(descriptor: Descriptor) -> str:
    """The text of a `.descriptor.json` file: indented JSON and a final newline."""
    return json.dumps(descriptor.to_json_dict(), indent=2) + "\n"


def descriptor_path_candidates(blob: str) -> list[str]:
    """Where the descriptor of the blob at `blob` (a path or URL) is looked for, in order.

    For `X.blob`: `X.descriptor.json` (where `lazyfs convert` writes it), then
    `X.blob.descriptor.json`; for any other name only `NAME.descriptor.json`. A name that is
    just `.blob` has no `X` (as pathlib sees it: no suffix), so it is an other name. Pure
    string work on the last `/`-separated part: a URL's query is the caller's to remove.
    """
    beside = blob + DESCRIPTOR_SUFFIX
    name = blob.rpartition("/")[2]
    if name.endswith(BLOB_SUFFIX) and len(name) > len(BLOB_SUFFIX):
        return [blob[: -len(BLOB_SUFFIX)] + DESCRIPTOR_SUFFIX, beside]
    return [beside]


def descriptor_locations(blob: str, descriptor: str | None) -> list[str]:
    """Where the descriptor of `blob` (a path or URL) is looked for, in order: `descriptor`
    when the user gave one, else beside the blob (a URL's query dropped)."""
    if descriptor:
        return [descriptor]
    return descriptor_path_candidates(blob.partition("?")[0])


def is_local(location: str) -> bool:
    """Whether a blob or descriptor `location` names a local file (a path or file:// URL)
    rather than a URL to fetch."""
    return "://" not in location or location.startswith("file://")


def descriptor_path_for(blob: str) -> str:
    """The descriptor's path beside the blob at `blob`: `X.blob` -> `X.descriptor.json`, any
    other name -> `NAME.descriptor.json` (the first of `descriptor_path_candidates`)."""
    return descriptor_path_candidates(blob)[0]
