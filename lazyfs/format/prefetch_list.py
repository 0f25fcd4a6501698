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
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lazyfs.format.errors import FormatError

PREFETCH_MEDIA_TYPE = "application/vnd.lazyfs.prefetch.v1+json"
ANNOTATION_PREFETCH = "dev.lazyfs.prefetch"
MAX_LIST_BYTES = 4 * 1024 * 1024
# Registries cap manifests at a few MiB; one layer's list stays far below that.
MAX_ANNOTATION_BYTES = 256 * 1024


class PrefetchListError(FormatError):
    """A prefetch list or annotation is malformed, or does not fit the layer it names."""


@dataclass(frozen=True)
class LayerPrefetch:
    """One layer's chunks in first-read order (each index once, all below `chunk_count`)."""

    chunk_digest: str
    chunk_count: int
    chunks: tuple[int, ...]
    name: str = ""


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


def parse_runs(text: str, chunk_count: int, where: str) -> tuple[int, ...]:
    """The chunk indices of `first-last,…` text, in order. Raises PrefetchListError for a
    malformed run, an index out of range, a descending run or an index listed twice."""
    chunks: list[int] = []
    seen: set[int] = set()
    for part in text.split(",") if text else []:
        first_text, dash, last_text = part.partition("-")
        if not first_text.isdigit() or (dash and not last_text.isdigit()):
            raise PrefetchListError(f"{where}: chunks: {part!r} is not N or N-M")
        first = int(first_text)
        last = int(last_text) if dash else first
        if last < first or last >= chunk_count:
            raise PrefetchListError(
                f"{where}: chunks: run {part!r} is not within 0-{chunk_count - 1} in order"
            )
        for index in range(first, last + 1):
            if index in seen:
                raise PrefetchListError(f"{where}: chunks: chunk {index} listed twice")
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
    return LayerPrefetch(digest, count, parse_runs(runs, count, where), name)


def _layer_object(layer: LayerPrefetch) -> dict[str, Any]:
    out: dict[str, Any] = {"chunk_digest": layer.chunk_digest, "chunk_count": layer.chunk_count,
                           "chunks": format_runs(layer.chunks)}
    if layer.name:
        out["name"] = layer.name
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
    """The annotation value for `layer` (compact JSON). Raises PrefetchListError when it
    would exceed MAX_ANNOTATION_BYTES."""
    value = json.dumps(_layer_object(layer), separators=(",", ":"))
    if len(value) > MAX_ANNOTATION_BYTES:
        raise PrefetchListError(f"the prefetch list of layer {layer.name or layer.chunk_digest} "
                                f"is {len(value)} bytes; an annotation takes at most "
                                f"{MAX_ANNOTATION_BYTES}")
    return value
