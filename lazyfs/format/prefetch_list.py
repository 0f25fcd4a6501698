"""Prefetch lists: which chunks of each layer a start-up read, in the order it first read them.

A list is a hint: it only decides which chunks are fetched early, and every chunk fetched is
verified as any other. Each layer's entry names the layer by its `chunk_digest` (the digest of
its chunk table, which fixes the chunk size and every frame), so an entry recorded for one
layer is never applied to another: a layer converted anew, even from the same files, has
another chunk table and so another digest.

A list file (`lazyfs run --record FILE`, `lazyfs mount --record FILE`):

    {"mediaType": "application/vnd.lazyfs.prefetch.v1+json",
     "layers": [{"chunk_digest": "sha512:…", "chunk_count": 61, "chunks": "0,12-15,3",
                 "name": "3b1f…"}]}

`chunks` lists chunk indices in order, runs of consecutive ones written `first-last`. An image
carries one layer's entry, the same JSON object, in the layer descriptor's annotation
`dev.lazyfs.prefetch` (`lazyfs convert --prefetch FILE`).

A recorded list also says, per layer, which blocks of the raw image reads touched, in the
order they first did, at EROFS block granularity: `"blocks": "0-3,1000,5"`, with
`"block_size": 4096` and `"image_size"` (the raw image's bytes). A converter maps them back to
file blocks and lays those out first (`lazyfs convert --startup-order FILE`). Annotations
carry no blocks: a mount needs only the chunks.

With the blocks goes, when the layer had one, its layout fingerprint: `"layout": "…"`, the
value of the layer descriptor's `dev.lazyfs.layout` annotation, which lazyfs's writer sets to
a hash of where it placed each file block. A converter that maps the blocks back by replaying
that placement checks it, so a list recorded on another layout (another lazyfs, other writer
options, a layer already in start-up order) is refused rather than mapped to the wrong files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lazyfs.format.errors import FormatError

PREFETCH_MEDIA_TYPE = "application/vnd.lazyfs.prefetch.v1+json"
ANNOTATION_PREFETCH = "dev.lazyfs.prefetch"
ANNOTATION_LAYOUT = "dev.lazyfs.layout"
MAX_LAYOUT_CHARS = 128
MAX_LIST_BYTES = 4 * 1024 * 1024
# Registries cap manifests at a few MiB; one layer's list stays far below that.
MAX_ANNOTATION_BYTES = 256 * 1024
BLOCK_SIZE = 4096  # what recorders note reads at: the EROFS block
MAX_RECORDED_BLOCKS = 1 << 18  # 1 GiB of reads: a start-up reads far less


class PrefetchListError(FormatError):
    """A prefetch list or annotation is malformed, or does not fit the layer it names."""


@dataclass(frozen=True)
class LayerPrefetch:
    """One layer's chunks in first-read order (each index once, all below `chunk_count`);
    and, when recorded, the `block_size` blocks of its `image_size`-byte raw image the reads
    touched, in the same order (empty otherwise), with the image's `layout` fingerprint ("":
    none known)."""

    chunk_digest: str
    chunk_count: int
    chunks: tuple[int, ...]
    name: str = ""
    blocks: tuple[int, ...] = ()
    block_size: int = 0
    image_size: int = 0
    layout: str = ""

    @property
    def block_count(self) -> int:
        """The image's blocks (0 without a block record)."""
        return -(-self.image_size // self.block_size) if self.block_size else 0


@dataclass(frozen=True)
class PrefetchList:
    """Entries for any number of layers, each layer (by chunk digest) at most once."""

    layers: tuple[LayerPrefetch, ...]

    def for_digest(self, chunk_digest: str | None) -> LayerPrefetch | None:
        for layer in self.layers:
            if chunk_digest is not None and layer.chunk_digest == chunk_digest:
                return layer
        return None


def format_runs(chunks: Iterable[int]) -> str:
    """`0,1,2,7,5,6` -> `0-2,7,5-6`: the order kept, ascending runs folded."""
    parts: list[str] = []
    first = last = None
    for index in chunks:
        if last is not None and index == last + 1:
            last = index
            continue
        if first is not None:
            parts.append(str(first) if first == last else f"{first}-{last}")
        first = last = index
    if first is not None:
        parts.append(str(first) if first == last else f"{first}-{last}")
    return ",".join(parts)


def parse_runs(text: str, chunk_count: int, where: str, what: str = "chunk",
               limit: int | None = None) -> tuple[int, ...]:
    """The chunk (or `what`) indices of `first-last,…` text, in order. Raises
    PrefetchListError for a malformed run, an index out of range, a descending run, an index
    listed twice, or more than `limit` indices."""
    chunks: list[int] = []
    seen: set[int] = set()
    for part in text.split(",") if text else []:
        first_text, dash, last_text = part.partition("-")
        if not first_text.isdigit() or (dash and not last_text.isdigit()):
            raise PrefetchListError(f"{where}: {what}s: {part!r} is not N or N-M")
        first = int(first_text)
        last = int(last_text) if dash else first
        if last < first or last >= chunk_count:
            raise PrefetchListError(
                f"{where}: {what}s: run {part!r} is not within 0-{chunk_count - 1} in order"
            )
        if limit is not None and len(chunks) + last - first + 1 > limit:
            raise PrefetchListError(f"{where}: {what}s: more than {limit} listed")
        for index in range(first, last + 1):
            if index in seen:
                raise PrefetchListError(f"{where}: {what}s: {what} {index} listed twice")
            seen.add(index)
            chunks.append(index)
    return tuple(chunks)


def _layer_from(obj: Any, where: str) -> LayerPrefetch:
    if not isinstance(obj, dict):
        raise PrefetchListError(f"{where}: expected a JSON object")
    digest, count, runs = obj.get("chunk_digest"), obj.get("chunk_count"), obj.get("chunks")
    name = obj.get("name", "")
    if not isinstance(digest, str) or not digest.startswith("sha512:"):
        raise PrefetchListError(f"{where}: chunk_digest: expected 'sha512:HEX', found {digest!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise PrefetchListError(f"{where}: chunk_count: expected a positive integer, "
                                f"found {count!r}")
    if not isinstance(runs, str):
        raise PrefetchListError(f"{where}: chunks: expected a string of runs, found {runs!r}")
    if not isinstance(name, str):
        raise PrefetchListError(f"{where}: name: expected a string, found {name!r}")
    layer = LayerPrefetch(digest, count, parse_runs(runs, count, where), name)
    if "blocks" not in obj:
        return layer
    block_runs, block_size, image_size = (obj.get("blocks"), obj.get("block_size"),
                                          obj.get("image_size"))
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 512 \
            or block_size & (block_size - 1):
        raise PrefetchListError(f"{where}: block_size: expected a power of two of 512 or "
                                f"more, found {block_size!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise PrefetchListError(f"{where}: image_size: expected a positive integer, found "
                                f"{image_size!r}")
    if not isinstance(block_runs, str):
        raise PrefetchListError(f"{where}: blocks: expected a string of runs, found "
                                f"{block_runs!r}")
    blocks = parse_runs(block_runs, -(-image_size // block_size), where, "block",
                        MAX_RECORDED_BLOCKS)
    layout = obj.get("layout", "")
    if not isinstance(layout, str) or len(layout) > MAX_LAYOUT_CHARS \
            or not layout.isascii() or not layout.isprintable():
        raise PrefetchListError(f"{where}: layout: expected a string of at most "
                                f"{MAX_LAYOUT_CHARS} printable characters, found {layout!r}")
    return LayerPrefetch(digest, count, layer.chunks, name, blocks, block_size, image_size,
                         layout)


def _layer_object(layer: LayerPrefetch, *, with_blocks: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"chunk_digest": layer.chunk_digest, "chunk_count": layer.chunk_count,
                           "chunks": format_runs(layer.chunks)}
    if layer.name:
        out["name"] = layer.name
    if with_blocks and layer.block_size:
        out.update(blocks=format_runs(layer.blocks), block_size=layer.block_size,
                   image_size=layer.image_size)
        if layer.layout:
            out["layout"] = layer.layout
    return out


def parse_prefetch_list(data: bytes, where: str) -> PrefetchList:
    """A list file's contents. Raises PrefetchListError naming `where` and what is wrong."""
    if len(data) > MAX_LIST_BYTES:
        raise PrefetchListError(f"{where}: {len(data)} bytes; a prefetch list is at most "
                                f"{MAX_LIST_BYTES} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PrefetchListError(f"{where}: not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("mediaType") != PREFETCH_MEDIA_TYPE:
        raise PrefetchListError(f"{where}: not a prefetch list (expected mediaType "
                                f"{PREFETCH_MEDIA_TYPE!r})")
    entries = obj.get("layers")
    if not isinstance(entries, list):
        raise PrefetchListError(f"{where}: layers: expected a list")
    layers = tuple(_layer_from(entry, f"{where}: layer {number}")
                   for number, entry in enumerate(entries, 1))
    digests = [layer.chunk_digest for layer in layers]
    if len(set(digests)) != len(digests):
        raise PrefetchListError(f"{where}: a layer is listed twice")
    return PrefetchList(layers)


def serialize_prefetch_list(prefetch: PrefetchList) -> bytes:
    obj = {"mediaType": PREFETCH_MEDIA_TYPE,
           "layers": [_layer_object(layer) for layer in prefetch.layers]}
    return (json.dumps(obj, indent=1) + "\n").encode()


def parse_prefetch_annotation(value: str, where: str) -> LayerPrefetch:
    """One layer's entry from its descriptor annotation. Raises PrefetchListError."""
    if len(value) > MAX_ANNOTATION_BYTES:
        raise PrefetchListError(f"{where}: {ANNOTATION_PREFETCH}: {len(value)} bytes, at most "
                                f"{MAX_ANNOTATION_BYTES}")
    try:
        obj = json.loads(value)
    except ValueError as exc:
        raise PrefetchListError(f"{where}: {ANNOTATION_PREFETCH}: not JSON: {exc}") from None
    return _layer_from(obj, f"{where}: {ANNOTATION_PREFETCH}")


def serialize_prefetch_annotation(layer: LayerPrefetch) -> str:
    """The annotation value for `layer` (compact JSON, its chunks alone). Raises
    PrefetchListError when it would exceed MAX_ANNOTATION_BYTES."""
    value = json.dumps(_layer_object(layer, with_blocks=False), separators=(",", ":"))
    if len(value) > MAX_ANNOTATION_BYTES:
        raise PrefetchListError(f"the prefetch list of layer {layer.name or layer.chunk_digest} "
                                f"is {len(value)} bytes; an annotation takes at most "
                                f"{MAX_ANNOTATION_BYTES}")
    return value
