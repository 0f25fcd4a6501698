"""Which block of the image holds a given 4 KiB of data: how the EROFS writer stores identical
blocks once, in memory that does not grow with the number of files.

Keys are 64 bits of the block's SHA-256 (SHA-256 is the fastest 128-bit-or-more digest here);
a writer reads the block back before it shares it, so a collision only costs that read.
The table is open addressing over two arrays (12 bytes a slot, at most half full, so about
24 bytes a block), and stops taking new blocks beyond `max_entries` (by default 4 Mi blocks,
16 GiB of distinct data, under 200 MiB): identical blocks beyond that are stored again, the
image stays correct, and memory stays bounded whatever the layer's size.
"""

from __future__ import annotations

import hashlib
from array import array

DEFAULT_MAX_ENTRIES = 4 << 20
_INITIAL_SLOTS = 1 << 14


def block_key(block: bytes) -> int:
    """The 64-bit key of a block's content."""
    return int.from_bytes(hashlib.sha256(block).digest()[:8], "little")


class BlockIndex:
    """key -> block address; the first address stored for a key stays."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.entries = 0
        self._mask = _INITIAL_SLOTS - 1
        self._keys = array("Q", bytes(8 * _INITIAL_SLOTS))
        self._addresses = array("I", bytes(4 * _INITIAL_SLOTS))  # address + 1; 0: empty

    def find(self, key: int) -> int | None:
        """The address stored for `key`, or None."""
        keys, addresses, mask = self._keys, self._addresses, self._mask
        slot = key & mask
        while True:
            stored = addresses[slot]
            if not stored:
                return None
            if keys[slot] == key:
                return stored - 1
            slot = (slot + 1) & mask

    def add(self, key: int, address: int) -> None:
        """Remember `address` for `key`, unless the key is known or the table is full."""
        if self.entries >= self.max_entries:
            return
        if 2 * (self.entries + 1) > self._mask + 1:
            self._grow()
        keys, addresses, mask = self._keys, self._addresses, self._mask
        slot = key & mask
        while addresses[slot]:
            if keys[slot] == key:
                return
            slot = (slot + 1) & mask
        keys[slot] = key
        addresses[slot] = address + 1
        self.entries += 1

    def _grow(self) -> None:
        old_keys, old_addresses = self._keys, self._addresses
        slots = 2 * (self._mask + 1)
        self._mask = slots - 1
        self._keys = array("Q", bytes(8 * slots))
        self._addresses = array("I", bytes(4 * slots))
        self.entries = 0
        for key, stored in zip(old_keys, old_addresses, strict=True):
            if stored:
                self.add(key, stored - 1)


__all__ = ["DEFAULT_MAX_ENTRIES", "BlockIndex", "block_key"]
