"""The layout fingerprint: a short hash of where lazyfs's writer put each block of file data.

A start-up order recorded on a layer names blocks of its raw image. Converting a directory or
a tar layer maps them back to files by replaying the writer's placement (`place_blocks`); that
is right only when the recorded layer was placed the same way. The image's size says little
(a new layout, or another writer option, usually keeps it), so the writer hashes the
placement itself, each stored file block's (image block, inode number, file block) in the
order it is stored, with the options that shape it and the image's size. The converter puts
the hash in the layer descriptor (`dev.lazyfs.layout`), a recording copies it, and the replay
computes its own and compares.
"""

from __future__ import annotations

import hashlib
import sys
from array import array

from converter.erofs.inode_tree import Node

# Names the hash's input; changed when that input does, never for a change of placement.
_VERSION = b"lazyfs erofs placement 1\0"
_FLUSH_ENTRIES = 3 * 65536


class LayoutFingerprint:
    """Hashes a placement as the writer (or its replay) reports it, block by block."""

    def __init__(self, *, chunk_indexes: bool) -> None:
        self._hash = hashlib.sha256(_VERSION + bytes([chunk_indexes]))
        self._pending = array("Q")

    def stored(self, block: int, node: Node, number: int) -> None:
        """Image block `block` holds block `number` of `node`'s data."""
        self._pending.extend((block, node.nid if node.nid is not None else 0, number))
        if len(self._pending) >= _FLUSH_ENTRIES:
            self._flush()

    def _flush(self) -> None:
        if sys.byteorder != "little":
            self._pending.byteswap()
        self._hash.update(self._pending.tobytes())
        del self._pending[:]

    def finish(self, image_size: int) -> str:
        """The fingerprint of the placement so far in an image of `image_size` bytes: 32 hex
        digits (128 bits of SHA-256)."""
        self._flush()
        final = self._hash.copy()
        final.update(image_size.to_bytes(8, "little"))
        return final.hexdigest()[:32]


__all__ = ["LayoutFingerprint"]
