"""The dm-verity hash tree: geometry, a streaming builder and per-block verification.

Matches `veritysetup format` (cryptsetup's verity_hash.c): level 0 hashes every data block,
each next level hashes the hash blocks below it, levels are stored top first after the
superblock, and a single data block has no levels at all (its digest is the root).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyfs.format.errors import IntegrityError, LayoutError
from lazyfs.format.verity_superblock import (
    HASH_TYPE_CHROMEOS,
    SUPERBLOCK_SIZE,
    VeritySuperblock,
    serialize_verity_superblock,
    validate_parameters,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Set


@dataclass(frozen=True)
class TreeLevel:
    """One level of the tree; level 0 hashes data blocks. Offsets are within the payload."""

    level: int
    block_count: int
    payload_offset: int


@dataclass(frozen=True)
class HashSlot:
    """Where the digest of one block (data or hash) is stored: a hash block and a byte offset."""

    level: int
    block_index: int
    payload_offset: int
    slot_offset: int


@dataclass(frozen=True)
class VerityGeometry:
    """Everything derived from a superblock: digests per block, levels and their offsets."""

    superblock: VeritySuperblock
    digest_size: int
    slot_size: int
    hashes_per_block: int
    tree_offset: int
    levels: tuple[TreeLevel, ...]

    @property
    def tree_size(self) -> int:
        return sum(level.block_count for level in self.levels) * self.superblock.hash_block_size

    @property
    def payload_size(self) -> int:
        """Bytes of the payload as we write it (containerd: a lone superblock without levels)."""
        if not self.levels:
            return SUPERBLOCK_SIZE
        return self.tree_offset + self.tree_size

    @property
    def padded_data_size(self) -> int:
        return self.superblock.data_blocks * self.superblock.data_block_size

    def slot_for(self, level: int, index: int) -> HashSlot:
        """Where the digest of block `index` of level `level - 1` (data blocks for 0) is kept."""
        tree_level = self.levels[level]
        block_index, position = divmod(index, self.hashes_per_block)
        block_size = self.superblock.hash_block_size
        return HashSlot(level, block_index, tree_level.payload_offset + block_index * block_size,
                        position * self.slot_size)

    def path(self, data_block: int) -> list[HashSlot]:
        """Hash slots from the leaf up to the top level that authenticate `data_block`."""
        if not 0 <= data_block < self.superblock.data_blocks:
            last = self.superblock.data_blocks - 1
            raise IndexError(f"data block {data_block} outside 0..{last}")
        slots = []
        index = data_block
        for level in range(len(self.levels)):
            slot = self.slot_for(level, index)
            slots.append(slot)
            index = slot.block_index
        return slots


def _bits_down(value: int) -> int:
    return value.bit_length() - 1


def verity_geometry(superblock: VeritySuperblock) -> VerityGeometry:
    """Derive the tree geometry of `superblock`. Raises FieldError for unusable parameters."""
    validate_parameters(superblock)
    digest_size = superblock.digest_size
    # veritysetup (verity_hash.c) and the kernel (verity_hash_at_level): a normal tree pads each
    # digest to a power-of-two slot; a Chrome OS tree packs the digests back to back. This only
    # shows with digests that are not a power of two (sha1).
    if superblock.hash_type == HASH_TYPE_CHROMEOS:
        slot_size = digest_size
    else:
        slot_size = 1 << (digest_size - 1).bit_length()
    per_block_bits = _bits_down(superblock.hash_block_size // slot_size)
    block_size = superblock.hash_block_size
    tree_offset = -(-SUPERBLOCK_SIZE // block_size) * block_size
    data_blocks = superblock.data_blocks
    level_count = 0
    if data_blocks:
        while per_block_bits * level_count < 64 and (data_blocks - 1) >> (
            per_block_bits * level_count
        ):
            level_count += 1
    counts = []
    for level in range(level_count):
        shift = per_block_bits * (level + 1)
        counts.append((data_blocks + (1 << shift) - 1) >> shift)
    # Stored top level first: the last level's blocks come right after the superblock.
    offsets = {}
    position = tree_offset
    for level in reversed(range(level_count)):
        offsets[level] = position
        position += counts[level] * block_size
    levels = tuple(TreeLevel(level, counts[level], offsets[level]) for level in range(level_count))
    return VerityGeometry(superblock, digest_size, slot_size, 1 << per_block_bits, tree_offset,
                          levels)


# hashlib lets go of the GIL for an update of this many bytes or more (its documented
# threshold) and must take it back afterwards.
HASHLIB_GIL_RELEASE_BYTES = 2048


class BlockHasher:
    """Computes salted block digests as veritysetup does (salt first, or last for Chrome OS).

    With `keep_gil`, a block goes to hashlib in updates below HASHLIB_GIL_RELEASE_BYTES, so
    that hashing it never hands the GIL over: a worker thread that checks a batch of 4 KiB
    blocks while the event loop runs Python would otherwise wait for the GIL once a block (up
    to the interpreter's switch interval, 5 ms, each time). Without it, threads that hash
    large amounts side by side (a converter) run in parallel."""

    def __init__(self, superblock: VeritySuperblock, *, keep_gil: bool = False) -> None:
        self._salt = superblock.salt
        self._name = superblock.hash_name
        self._salt_first = superblock.hash_type != HASH_TYPE_CHROMEOS
        self._prefix = hashlib.new(self._name)
        if self._salt_first:
            self._prefix.update(self._salt)
        self._piece = HASHLIB_GIL_RELEASE_BYTES - 1 if keep_gil else 0

    def digest(self, block: bytes | memoryview) -> bytes:
        hasher = self._prefix.copy()
        piece = self._piece
        if piece and len(block) > piece:
            view = memoryview(block)
            for start in range(0, len(view), piece):
                hasher.update(view[start:start + piece])
        else:
            hasher.update(block)
        if not self._salt_first:
            hasher.update(self._salt)
        return hasher.digest()


def data_block_digests(geometry: VerityGeometry, data: bytes | memoryview, *,
                       keep_gil: bool = False) -> bytes:
    """Leaf digests of consecutive data blocks in `data`, the last one zero-padded.

    Returns the digests packed back to back (`digest_size` each). Thread-safe, no shared state,
    so converters can hash chunks in parallel; `keep_gil` as for BlockHasher.
    """
    block_size = geometry.superblock.data_block_size
    hasher = BlockHasher(geometry.superblock, keep_gil=keep_gil)
    view = memoryview(data)
    out = bytearray()
    for start in range(0, len(view), block_size):
        block = view[start:start + block_size]
        if len(block) < block_size:
            block = memoryview(bytes(block) + bytes(block_size - len(block)))
        out += hasher.digest(block)
    return bytes(out)


class VerityTreeBuilder:
    """Builds the tree from leaf digests fed in data-block order; memory is the tree's size."""

    def __init__(self, superblock: VeritySuperblock) -> None:
        if superblock.data_blocks == 0:
            raise ValueError("dm-verity needs at least one data block (the image is empty)")
        self.geometry = verity_geometry(superblock)
        self._hasher = BlockHasher(superblock)
        self._leaves = bytearray()
        self._leaf_count = 0

    def add_leaf_digests(self, digests: bytes) -> None:
        digest_size = self.geometry.digest_size
        if len(digests) % digest_size:
            raise ValueError(f"{len(digests)} bytes is not a whole number of digests")
        count = len(digests) // digest_size
        if self._leaf_count + count > self.geometry.superblock.data_blocks:
            raise ValueError("more data blocks than the superblock declares")
        self._leaves += digests
        self._leaf_count += count

    def finish(self) -> tuple[bytes, bytes]:
        """Return `(payload, root)`: superblock, padding and levels; and the raw root digest."""
        geometry = self.geometry
        if self._leaf_count != geometry.superblock.data_blocks:
            raise ValueError(
                f"{self._leaf_count} data blocks hashed, superblock declares "
                f"{geometry.superblock.data_blocks}"
            )
        superblock_bytes = serialize_verity_superblock(geometry.superblock)
        if not geometry.levels:
            return superblock_bytes, bytes(self._leaves)
        level_bytes: list[bytes] = []
        digests = bytes(self._leaves)
        for level in geometry.levels:
            packed = _pack_hash_blocks(geometry, digests, level.block_count)
            level_bytes.append(packed)
            digests = b"".join(
                self._hasher.digest(packed[start:start + geometry.superblock.hash_block_size])
                for start in range(0, len(packed), geometry.superblock.hash_block_size)
            )
        padding = bytes(geometry.tree_offset - len(superblock_bytes))
        payload = superblock_bytes + padding + b"".join(reversed(level_bytes))
        return payload, digests


def _pack_hash_blocks(geometry: VerityGeometry, digests: bytes, block_count: int) -> bytes:
    """Lay `digests` into hash blocks: `hashes_per_block` slots each, zero-padded."""
    block_size = geometry.superblock.hash_block_size
    digest_size = geometry.digest_size
    per_block = geometry.hashes_per_block
    out = bytearray(block_count * block_size)
    count = len(digests) // digest_size
    if geometry.slot_size == digest_size and per_block * digest_size == block_size:
        out[:len(digests)] = digests
        return bytes(out)
    for index in range(count):
        block_index, position = divmod(index, per_block)
        at = block_index * block_size + position * geometry.slot_size
        out[at:at + digest_size] = digests[index * digest_size:(index + 1) * digest_size]
    return bytes(out)


def check_payload_size(geometry: VerityGeometry, payload_size: int, offset: int = 0) -> None:
    """The payload must hold the whole tree. Raises LayoutError naming both sizes."""
    minimum = geometry.tree_offset + geometry.tree_size if geometry.levels else SUPERBLOCK_SIZE
    if payload_size < minimum:
        raise LayoutError(
            f"dm-verity payload at offset {offset} is {payload_size} bytes, the tree for "
            f"{geometry.superblock.data_blocks} data blocks needs {minimum}"
        )


def hash_blocks_needed(geometry: VerityGeometry, first_block: int, count: int) -> list[int]:
    """Payload offsets of every hash block that authenticates data blocks
    `[first_block, first_block + count)`, top level first (the order to verify them in)."""
    if count <= 0 or not geometry.levels:
        return []
    if not 0 <= first_block < geometry.superblock.data_blocks:
        last = geometry.superblock.data_blocks - 1
        raise IndexError(f"data block {first_block} outside 0..{last}")
    last_block = min(first_block + count, geometry.superblock.data_blocks) - 1
    offsets: list[int] = []
    low, high = first_block, last_block
    per_level: list[list[int]] = []
    for level in range(len(geometry.levels)):
        first_slot = geometry.slot_for(level, low)
        last_slot = geometry.slot_for(level, high)
        block_size = geometry.superblock.hash_block_size
        per_level.append(list(range(first_slot.payload_offset, last_slot.payload_offset + 1,
                                    block_size)))
        low, high = first_slot.block_index, last_slot.block_index
    for level_offsets in reversed(per_level):
        offsets.extend(level_offsets)
    return offsets


def _stored_digest(geometry: VerityGeometry, blocks: Mapping[int, bytes], slot: HashSlot) -> bytes:
    block = blocks[slot.payload_offset]
    return bytes(block[slot.slot_offset:slot.slot_offset + geometry.digest_size])


def check_hash_blocks(
    geometry: VerityGeometry, blocks: Mapping[int, bytes], root: bytes, trusted: Set[int],
) -> tuple[set[int], dict[int, str]]:
    """Authenticate hash blocks (keyed by payload offset) from the root down, each on its own.

    A block is checked against its parent's slot (the top level against the root); `trusted`
    are offsets verified before, not hashed again, and `blocks` must hold them too where they
    are parents. Returns `(offsets newly verified, {offset: why it failed})`: a block that does
    not match, or whose parent is missing, failed or untrusted, fails; the others verify.
    """
    hasher = BlockHasher(geometry.superblock)
    newly: set[int] = set()
    failed: dict[int, str] = {}
    top = len(geometry.levels) - 1
    # Only the given blocks are visited, not every block of the tree: this runs for each fetch.
    # Levels are stored top first, so ascending offsets meet every parent before its children.
    for offset in sorted(blocks):
        if offset in trusted:
            continue
        located = _locate(geometry, offset)
        if located is None:
            continue
        level, index = located
        where = f"dm-verity: hash block {index} of level {level} (payload offset {offset})"
        if level == top:
            expected = root
        else:
            parent = geometry.slot_for(level + 1, index)
            if parent.payload_offset not in trusted and parent.payload_offset not in newly:
                failed[offset] = (f"{where}: its parent at payload offset "
                                  f"{parent.payload_offset} is not verified")
                continue
            expected = _stored_digest(geometry, blocks, parent)
        found = hasher.digest(blocks[offset])
        if found != expected:
            failed[offset] = (
                f"{where} does not match {'the root digest' if level == top else 'its parent'}: "
                f"expected {expected.hex()[:16]}…, found {found.hex()[:16]}…"
            )
            continue
        newly.add(offset)
    return newly, failed


def verify_hash_blocks(
    geometry: VerityGeometry, blocks: Mapping[int, bytes], root: bytes, trusted: Set[int],
) -> set[int]:
    """Authenticate hash blocks from the root down (see `check_hash_blocks`), all or nothing.

    Returns the offsets newly verified. Raises IntegrityError naming the level, block and
    payload offset of the highest block that fails.
    """
    newly, failed = check_hash_blocks(geometry, blocks, root, trusted)
    if failed:
        raise IntegrityError(failed[min(failed)])
    return newly


def _locate(geometry: VerityGeometry, payload_offset: int) -> tuple[int, int] | None:
    """`(level, index)` of the hash block at `payload_offset`, or None if none starts there."""
    block_size = geometry.superblock.hash_block_size
    for level in geometry.levels:
        index, rest = divmod(payload_offset - level.payload_offset, block_size)
        if rest == 0 and 0 <= index < level.block_count:
            return level.level, index
    return None


def verify_data_blocks(
    geometry: VerityGeometry, first_block: int, data: bytes | memoryview,
    blocks: Mapping[int, bytes], root: bytes,
) -> None:
    """Check consecutive data blocks in `data`, starting at `first_block`, against level 0.

    The level-0 hash blocks in `blocks` must already be authenticated (`verify_hash_blocks`).
    Raises IntegrityError naming the first data block that fails and its image offset. Runs
    in a reader's worker thread beside the event loop: the blocks are hashed holding the GIL
    (`BlockHasher`), a batch at a time.
    """
    block_size = geometry.superblock.data_block_size
    digests = data_block_digests(geometry, data, keep_gil=True)
    digest_size = geometry.digest_size
    for position in range(len(digests) // digest_size):
        block_index = first_block + position
        found = digests[position * digest_size:(position + 1) * digest_size]
        if geometry.levels:
            expected = _stored_digest(geometry, blocks, geometry.slot_for(0, block_index))
        else:
            expected = root
        if found != expected:
            raise IntegrityError(
                f"dm-verity: data block {block_index} (image offset {block_index * block_size}) "
                f"does not match its hash: expected {expected.hex()[:16]}…, "
                f"found {found.hex()[:16]}…"
            )


def split_tree(geometry: VerityGeometry, payload: bytes) -> dict[int, bytes]:
    """Every hash block of a whole payload, keyed by payload offset (for eager verification)."""
    check_payload_size(geometry, len(payload))
    block_size = geometry.superblock.hash_block_size
    return {
        level.payload_offset + index * block_size:
            payload[level.payload_offset + index * block_size:
                    level.payload_offset + (index + 1) * block_size]
        for level in geometry.levels
        for index in range(level.block_count)
    }
