"""What names a layer's data in the caches: only digests that authenticate it, so that a layer
shared by several images, or a frame shared by several layers, is kept once, and nothing is
ever found under the name of other bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.layout import BlobMetadata


def content_key(metadata: BlobMetadata, source: str) -> Hashable:
    """What names this layer's decoded chunks in the memory cache: a digest that
    authenticates them, else the blob itself (nothing shared)."""
    annotations = metadata.annotations
    if annotations.chunk_digest is None:
        return ("unauthenticated", source)
    if metadata.table.hash_algorithm == HASH_NONE:
        # The table then lists no frame hashes: equal tables (equal frame sizes) say nothing
        # of the bytes; only the verity root names them.
        if annotations.root_digest is None:
            return ("unauthenticated", source)
        return (annotations.chunk_digest, annotations.root_digest)
    return annotations.chunk_digest


def _hex(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(part) for part in parts).encode()).hexdigest()


def layer_key(annotations: SeekableAnnotations) -> str | None:
    """The disk cache's name for a layer's metadata: every annotation that locates or
    authenticates it. None when no digest authenticates the chunk table (such a layer is
    not kept on disk: nothing could check it when read back)."""
    if annotations.chunk_digest is None:
        return None
    return "meta-" + _hex(annotations.chunk_table_offset, annotations.chunk_digest,
                          annotations.verity_offset, annotations.root_digest)


def frame_key(metadata: BlobMetadata, chunk_index: int) -> str | None:
    """The disk cache's name for one compressed frame: its SHA-512 from the authenticated
    chunk table (shared by every layer that has the frame); for a table without frame hashes,
    the layer's digests and the chunk index. None for a layer whose frames could not be
    checked alone when read back: no digest, or no frame hashes and dm-verity blocks that
    straddle chunks (such a block is checked across two chunks, see `verify.check_blocks`)."""
    annotations = metadata.annotations
    if annotations.chunk_digest is None:
        return None
    if metadata.table.hash_algorithm != HASH_NONE:
        return "frame-" + metadata.table.frame_digests[chunk_index].hex()
    geometry = metadata.verity
    if annotations.root_digest is None or metadata.root is None or geometry is None:
        return None
    if metadata.table.chunk_size % geometry.superblock.data_block_size:
        return None
    return "frame-" + _hex(annotations.chunk_digest, annotations.root_digest, chunk_index)


def tree_key(layer: str, chunk_index: int) -> str:
    """The disk cache's name for the hash blocks that cover one chunk of a layer whose tree
    is too large to keep whole with its metadata."""
    return "tree-" + _hex(layer, chunk_index)


def descriptor_key(location: str) -> str:
    """The disk cache's name for the descriptor last fetched from `location` (a URL)."""
    return "desc-" + _hex(location)


_CONTENT_ALGORITHMS = {"sha256": 64, "sha512": 128}


def tag_key(registry: str, repository: str, tag: str) -> str:
    """The disk cache's name for what `registry/repository:tag` pointed to last."""
    return "imgtag-" + hashlib.sha256(f"{registry}/{repository}:{tag}".encode()).hexdigest()


def image_data_key(digest: str) -> str | None:
    """The disk cache's name for the manifest or config of `digest` (None: an algorithm the
    cache does not keep)."""
    algorithm, _, hex_digest = digest.partition(":")
    if _CONTENT_ALGORITHMS.get(algorithm) != len(hex_digest):
        return None
    return f"imgdata-{hex_digest}"  # the length tells sha256 from sha512
