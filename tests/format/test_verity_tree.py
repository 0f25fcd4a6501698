"""The verity tree against veritysetup byte for byte, and range verification against bit flips."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.format.errors import IntegrityError, LayoutError
from lazyfs.format.verity_superblock import (
    HASH_TYPE_CHROMEOS,
    HASH_TYPE_NORMAL,
    SUPERBLOCK_SIZE,
    VeritySuperblock,
    serialize_verity_superblock,
)
from lazyfs.format.verity_tree import (
    HASHLIB_GIL_RELEASE_BYTES,
    BlockHasher,
    VerityGeometry,
    VerityTreeBuilder,
    check_hash_blocks,
    check_payload_size,
    data_block_digests,
    hash_blocks_needed,
    split_tree,
    verify_data_blocks,
    verify_hash_blocks,
    verity_geometry,
)
from tests.format import (
    build_verity_payload,
    flip,
    make_superblock,
    needs_veritysetup,
    pad_to_blocks,
    pattern,
    veritysetup_format,
    veritysetup_verify,
)

SALT_32 = bytes(range(100, 132))
SALT_256 = bytes(range(256))

# (image size, data block size, hash block size, hash, salt, hash type)
VERITYSETUP_CASES = [
    (4096, 4096, 4096, "sha512", b"", HASH_TYPE_NORMAL),  # containerd's lone-block edge case
    (1, 4096, 4096, "sha256", SALT_32, HASH_TYPE_NORMAL),
    (700, 512, 512, "sha1", b"\x01", HASH_TYPE_CHROMEOS),
    (704512, 4096, 4096, "sha512", b"", HASH_TYPE_NORMAL),  # containerd defaults, two levels
    (301 * 4096, 4096, 4096, "sha512", b"", HASH_TYPE_NORMAL),
    (128 * 4096, 4096, 4096, "sha256", SALT_32, HASH_TYPE_NORMAL),  # one full hash block
    (129 * 4096, 4096, 4096, "sha256", SALT_32, HASH_TYPE_NORMAL),  # one more: two levels
    (100 * 512 + 7, 512, 512, "sha512", b"\xaa", HASH_TYPE_NORMAL),  # 8 per block: 3 levels
    (300 * 512, 512, 512, "sha1", SALT_256, HASH_TYPE_NORMAL),  # sha1: 32-byte slots
    (300 * 512, 512, 512, "sha1", SALT_256, HASH_TYPE_CHROMEOS),  # sha1: packed, salt last
    (200 * 4096, 4096, 512, "sha256", bytes(7), HASH_TYPE_CHROMEOS),
    (50 * 1024, 1024, 65536, "sha512", b"", HASH_TYPE_NORMAL),
    (3 * 65536 + 5, 65536, 65536, "sha256", SALT_32[:16], HASH_TYPE_NORMAL),
    (2 * 65536, 512, 4096, "sha1", b"", HASH_TYPE_CHROMEOS),
    (5 * 4096, 4096, 1024, "sha512", SALT_256, HASH_TYPE_CHROMEOS),
    (40 * 2048 - 1, 2048, 32768, "sha256", b"", HASH_TYPE_NORMAL),
]


def _case_id(case: tuple[int, int, int, str, bytes, int]) -> str:
    size, data_bs, hash_bs, name, salt, hash_type = case
    return f"{size}B-d{data_bs}-h{hash_bs}-{name}-salt{len(salt)}-type{hash_type}"


def _superblock(case: tuple[int, int, int, str, bytes, int]) -> VeritySuperblock:
    size, data_bs, hash_bs, name, salt, hash_type = case
    return make_superblock(size, block_size=data_bs, hash_name=name, salt=salt,
                           hash_type=hash_type, hash_block_size=hash_bs)


@needs_veritysetup
@pytest.mark.parametrize("case", VERITYSETUP_CASES, ids=_case_id)
def test_payload_and_root_equal_veritysetup(case, tmp_path):
    superblock = _superblock(case)
    data = pattern(case[0], seed=case[1] + case[2])
    payload, root = build_verity_payload(superblock, [data])
    reference, reference_root = veritysetup_format(tmp_path, data, superblock)
    assert root == reference_root
    geometry = verity_geometry(superblock)
    if geometry.levels:
        assert len(payload) == len(reference)
        assert payload == reference
    else:
        # veritysetup pads the lone superblock to a hash block; containerd writes 512 bytes.
        assert len(payload) == SUPERBLOCK_SIZE
        assert payload == reference[:SUPERBLOCK_SIZE]
        assert not any(reference[SUPERBLOCK_SIZE:])
    accepted = veritysetup_verify(tmp_path, data, payload, root, superblock.data_block_size)
    assert accepted.returncode == 0, accepted.stderr


@needs_veritysetup
@pytest.mark.parametrize("case", [VERITYSETUP_CASES[3], VERITYSETUP_CASES[9]], ids=_case_id)
def test_veritysetup_rejects_our_payload_with_a_wrong_root(case, tmp_path):
    superblock = _superblock(case)
    data = pattern(case[0])
    payload, root = build_verity_payload(superblock, [data])
    wrong = flip(root, len(root) - 1)
    rejected = veritysetup_verify(tmp_path, data, payload, wrong, superblock.data_block_size)
    assert rejected.returncode != 0


@pytest.mark.parametrize("salt", [b"", SALT_32])
@pytest.mark.parametrize("hash_type", [HASH_TYPE_NORMAL, HASH_TYPE_CHROMEOS])
def test_single_block_payload_is_the_superblock_and_root_hashes_the_block(salt, hash_type):
    data = pattern(3000)
    superblock = make_superblock(len(data), hash_name="sha512", salt=salt, hash_type=hash_type)
    payload, root = build_verity_payload(superblock, [data])
    assert payload == serialize_verity_superblock(superblock)
    block = pad_to_blocks(data, 4096)
    salted = salt + block if hash_type == HASH_TYPE_NORMAL else block + salt
    assert root == hashlib.sha512(salted).digest()


@pytest.mark.parametrize("salt", [b"", SALT_32])
@pytest.mark.parametrize("hash_type", [HASH_TYPE_NORMAL, HASH_TYPE_CHROMEOS])
def test_block_digests_holding_the_gil_equal_those_of_one_update(salt, hash_type):
    superblock = make_superblock(8192, hash_name="sha256", salt=salt, hash_type=hash_type)
    released, kept = BlockHasher(superblock), BlockHasher(superblock, keep_gil=True)
    for size in (0, 1, HASHLIB_GIL_RELEASE_BYTES - 1, HASHLIB_GIL_RELEASE_BYTES, 4095, 4096):
        block = pattern(size)
        salted = salt + block if hash_type == HASH_TYPE_NORMAL else block + salt
        assert kept.digest(block) == released.digest(block) == hashlib.sha256(salted).digest()
    data = pattern(3 * 4096 + 5)
    geometry = verity_geometry(make_superblock(len(data), hash_name="sha256", salt=salt,
                                               hash_type=hash_type))
    assert (data_block_digests(geometry, data, keep_gil=True)
            == data_block_digests(geometry, data))


def test_builder_refuses_an_image_of_zero_blocks():
    with pytest.raises(ValueError, match="empty"):
        VerityTreeBuilder(make_superblock(0))
    with pytest.raises(ValueError, match="empty"):
        build_verity_payload(make_superblock(0), [b""])


def test_builder_refuses_fewer_or_more_blocks_than_declared():
    superblock = make_superblock(3 * 4096)
    with pytest.raises(ValueError, match="2 data blocks hashed"):
        build_verity_payload(superblock, [bytes(2 * 4096)])
    with pytest.raises(ValueError, match="more data blocks"):
        build_verity_payload(superblock, [bytes(4 * 4096)])


def test_spec_example_geometry():
    geometry = verity_geometry(make_superblock(301 * 4096))
    assert [level.block_count for level in geometry.levels] == [5, 1]
    assert geometry.tree_offset == 4096
    assert geometry.tree_size == 6 * 4096
    assert geometry.levels[1].payload_offset == 4096  # top level first
    assert geometry.levels[0].payload_offset == 2 * 4096
    assert geometry.payload_size == 7 * 4096


def test_building_in_block_aligned_pieces_equals_building_at_once():
    data = pattern(37 * 512 + 100, seed=3)
    superblock = make_superblock(len(data), block_size=512, hash_name="sha256", salt=b"s")
    whole = build_verity_payload(superblock, [data])
    pieces = [data[start:start + 5 * 512] for start in range(0, len(data), 5 * 512)]
    assert build_verity_payload(superblock, pieces) == whole
    assert data_block_digests(verity_geometry(superblock), data) == b"".join(
        data_block_digests(verity_geometry(superblock), piece) for piece in pieces
    )


def test_payload_too_short_for_the_tree_is_a_layout_error():
    superblock = make_superblock(10 * 512, block_size=512, hash_name="sha512")
    geometry = verity_geometry(superblock)
    payload, _root = build_verity_payload(superblock, [bytes(10 * 512)])
    check_payload_size(geometry, len(payload))
    with pytest.raises(LayoutError, match=f"needs {len(payload)}"):
        check_payload_size(geometry, len(payload) - 1, offset=1234)
    with pytest.raises(LayoutError):
        split_tree(geometry, payload[:-1])


# --- range verification ------------------------------------------------------------------------

@dataclass(frozen=True)
class Tree:
    geometry: VerityGeometry
    data: bytes
    payload: bytes
    root: bytes

    @property
    def block_size(self) -> int:
        return self.geometry.superblock.data_block_size

    @property
    def data_blocks(self) -> int:
        return self.geometry.superblock.data_blocks

    def blocks(self, offsets: list[int]) -> dict[int, bytes]:
        size = self.geometry.superblock.hash_block_size
        return {offset: self.payload[offset:offset + size] for offset in offsets}

    def level_and_index(self, offset: int) -> tuple[int, int]:
        size = self.geometry.superblock.hash_block_size
        for level in self.geometry.levels:
            index, rest = divmod(offset - level.payload_offset, size)
            if rest == 0 and 0 <= index < level.block_count:
                return level.level, index
        raise AssertionError(f"{offset} is not a hash block")


TREE_CASES = {
    "sha256-512-3levels": (300 * 512 - 11, 512, 512, "sha256", b"salt", HASH_TYPE_NORMAL),
    "sha1-512-normal": (300 * 512, 512, 512, "sha1", b"", HASH_TYPE_NORMAL),
    "sha1-512-chromeos": (300 * 512, 512, 512, "sha1", SALT_32, HASH_TYPE_CHROMEOS),
    "sha512-4k-2levels": (172 * 4096, 4096, 4096, "sha512", b"", HASH_TYPE_NORMAL),
    "sha512-data4k-hash1k": (40 * 4096, 4096, 1024, "sha512", b"", HASH_TYPE_NORMAL),
    "single-block": (4000, 4096, 4096, "sha512", b"", HASH_TYPE_NORMAL),
}


@cache
def _tree(name: str) -> Tree:
    case = TREE_CASES[name]
    superblock = _superblock(case)
    data = pattern(case[0], seed=len(name))
    payload, root = build_verity_payload(superblock, [data])
    return Tree(verity_geometry(superblock), data, payload, root)


def _range(tree: Tree, first: int, count: int) -> bytes:
    return tree.data[first * tree.block_size:(first + count) * tree.block_size]


def _block_ranges(draw_tree: str) -> st.SearchStrategy[tuple[Tree, int, int]]:
    tree = _tree(draw_tree)
    return st.integers(0, tree.data_blocks - 1).flatmap(
        lambda first: st.tuples(st.just(tree), st.just(first),
                                st.integers(1, tree.data_blocks - first))
    )


ranges = st.sampled_from(sorted(TREE_CASES)).flatmap(_block_ranges)


@settings(max_examples=60, deadline=None)
@given(ranges)
def test_needed_blocks_are_exactly_the_ancestors_top_first(sample):
    tree, first, count = sample
    needed = hash_blocks_needed(tree.geometry, first, count)
    ancestors = {slot.payload_offset
                 for block in range(first, first + count)
                 for slot in tree.geometry.path(block)}
    assert needed == sorted(ancestors)  # stored top level first: ascending offsets
    assert len(set(needed)) == len(needed)


@settings(max_examples=60, deadline=None)
@given(ranges)
def test_correct_data_verifies_for_any_range(sample):
    tree, first, count = sample
    needed = hash_blocks_needed(tree.geometry, first, count)
    blocks = tree.blocks(needed)
    assert verify_hash_blocks(tree.geometry, blocks, tree.root, set()) == set(needed)
    assert verify_hash_blocks(tree.geometry, blocks, tree.root, set(needed)) == set()
    verify_data_blocks(tree.geometry, first, _range(tree, first, count), blocks, tree.root)


@settings(max_examples=60, deadline=None)
@given(ranges, st.data())
def test_a_flipped_data_bit_in_any_range_is_caught_naming_the_block(sample, data):
    tree, first, count = sample
    bad_block = data.draw(st.integers(first, first + count - 1))
    chunk = _range(tree, first, count)
    position = (bad_block - first) * tree.block_size + data.draw(
        st.integers(0, min(tree.block_size, len(chunk) - (bad_block - first) * tree.block_size)
                    - 1))
    corrupted = flip(chunk, position, 1 << data.draw(st.integers(0, 7)))
    blocks = tree.blocks(hash_blocks_needed(tree.geometry, first, count))
    verify_hash_blocks(tree.geometry, blocks, tree.root, set())
    with pytest.raises(IntegrityError) as caught:
        verify_data_blocks(tree.geometry, first, corrupted, blocks, tree.root)
    message = str(caught.value)
    assert f"data block {bad_block} " in message
    assert f"image offset {bad_block * tree.block_size}" in message


@settings(max_examples=60, deadline=None)
@given(ranges, st.data())
def test_a_flipped_hash_bit_in_any_needed_block_is_caught_naming_it(sample, data):
    tree, first, count = sample
    needed = hash_blocks_needed(tree.geometry, first, count)
    if not needed:
        return  # a lone data block has no hash blocks: see the wrong-root test
    bad_offset = data.draw(st.sampled_from(needed))
    position = data.draw(st.integers(0, tree.geometry.superblock.hash_block_size - 1))
    blocks = tree.blocks(needed)
    blocks[bad_offset] = flip(blocks[bad_offset], position, 1 << data.draw(st.integers(0, 7)))
    with pytest.raises(IntegrityError) as caught:
        verify_hash_blocks(tree.geometry, blocks, tree.root, set())
    level, index = tree.level_and_index(bad_offset)
    assert f"hash block {index} of level {level} (payload offset {bad_offset})" in str(
        caught.value)


@pytest.mark.parametrize("name", sorted(TREE_CASES))
def test_every_hash_block_of_every_level_is_covered(name):
    tree = _tree(name)
    all_offsets = hash_blocks_needed(tree.geometry, 0, tree.data_blocks)
    assert tree.blocks(all_offsets) == split_tree(tree.geometry, tree.payload)
    size = tree.geometry.superblock.hash_block_size
    for offset in all_offsets:
        level, index = tree.level_and_index(offset)
        for position in (0, size // 2, size - 1):  # first digest, middle, trailing padding
            blocks = tree.blocks(all_offsets)
            blocks[offset] = flip(blocks[offset], position)
            with pytest.raises(IntegrityError, match=(
                    f"hash block {index} of level {level} \\(payload offset {offset}\\)")):
                verify_hash_blocks(tree.geometry, blocks, tree.root, set())


@pytest.mark.parametrize("name", sorted(TREE_CASES))
def test_every_data_block_is_covered(name):
    tree = _tree(name)
    blocks = split_tree(tree.geometry, tree.payload)
    verify_hash_blocks(tree.geometry, blocks, tree.root, set())
    verify_data_blocks(tree.geometry, 0, tree.data, blocks, tree.root)
    for block in range(tree.data_blocks):
        position = min(block * tree.block_size + 7, len(tree.data) - 1)
        with pytest.raises(IntegrityError, match=f"data block {block} "):
            verify_data_blocks(tree.geometry, 0, flip(tree.data, position), blocks, tree.root)


@pytest.mark.parametrize("name", sorted(TREE_CASES))
def test_a_wrong_root_is_caught(name):
    tree = _tree(name)
    wrong_root = flip(tree.root, 0)
    blocks = split_tree(tree.geometry, tree.payload)
    if not tree.geometry.levels:
        with pytest.raises(IntegrityError, match="data block 0 "):
            verify_data_blocks(tree.geometry, 0, tree.data, blocks, wrong_root)
        return
    top = len(tree.geometry.levels) - 1
    with pytest.raises(IntegrityError, match=f"of level {top} .*the root digest"):
        verify_hash_blocks(tree.geometry, blocks, wrong_root, set())


def test_trusted_blocks_are_not_hashed_again():
    tree = _tree("sha256-512-3levels")
    needed = hash_blocks_needed(tree.geometry, 0, 1)
    blocks = tree.blocks(needed)
    trusted = verify_hash_blocks(tree.geometry, blocks, tree.root, set())
    top = needed[0]
    # A trusted block is taken as verified; only untrusted ones are checked against it.
    blocks[top] = flip(blocks[top], len(blocks[top]) - 1)
    assert verify_hash_blocks(tree.geometry, blocks, tree.root, trusted) == set()
    with pytest.raises(IntegrityError):
        verify_hash_blocks(tree.geometry, blocks, tree.root, trusted - {top})


def test_hash_blocks_needed_clips_to_the_image_and_ignores_empty_ranges():
    tree = _tree("sha256-512-3levels")
    assert hash_blocks_needed(tree.geometry, 3, 0) == []
    assert hash_blocks_needed(tree.geometry, tree.data_blocks - 1, 10**6) == \
        hash_blocks_needed(tree.geometry, tree.data_blocks - 1, 1)


@pytest.mark.parametrize("hash_type", [HASH_TYPE_NORMAL, HASH_TYPE_CHROMEOS])
def test_digest_slots_follow_the_hash_type(hash_type):
    # sha1 digests are 20 bytes: a normal tree pads each to 32, a Chrome OS tree packs them.
    tree_sb = make_superblock(20 * 512, block_size=512, hash_name="sha1", hash_type=hash_type)
    payload, _root = build_verity_payload(tree_sb, [pattern(20 * 512)])
    geometry = verity_geometry(tree_sb)
    assert geometry.hashes_per_block == 16
    level0 = payload[geometry.levels[0].payload_offset:][:512]
    leaf1 = data_block_digests(geometry, pattern(20 * 512)[512:1024])
    slot = 32 if hash_type == HASH_TYPE_NORMAL else 20
    assert level0[slot:slot + 20] == leaf1


def test_hash_blocks_needed_refuses_blocks_outside_the_image():
    tree = _tree("sha256-512-3levels")
    for first in (-1, tree.data_blocks, tree.data_blocks + 10):
        with pytest.raises(IndexError, match=f"data block {first} outside"):
            hash_blocks_needed(tree.geometry, first, 1)


class _CountingBlocks(dict[int, bytes]):
    """A block map that counts how often it is consulted."""

    lookups = 0

    def __contains__(self, key: object) -> bool:
        self.lookups += 1
        return super().__contains__(key)

    def __getitem__(self, key: int) -> bytes:
        self.lookups += 1
        return super().__getitem__(key)


def test_verifying_a_path_costs_its_length_not_the_tree_size():
    # 2^40 data blocks: level 0 alone has 2^33 hash blocks; a read needs one block per level.
    superblock = make_superblock(0, hash_name="sha256", data_blocks=2**40)
    geometry = verity_geometry(superblock)
    assert len(geometry.levels) == 6
    data_block = 2**39 + 12345
    path = geometry.path(data_block)
    data = pattern(4096, seed=7)
    blocks = _CountingBlocks()
    digest = hashlib.sha256(data).digest()
    for slot in path:  # leaf level up: each hash block holds the digest of the one below
        block = bytearray(superblock.hash_block_size)
        block[slot.slot_offset:slot.slot_offset + len(digest)] = digest
        blocks[slot.payload_offset] = bytes(block)
        digest = hashlib.sha256(block).digest()
    root = digest
    assert hash_blocks_needed(geometry, data_block, 1) == sorted(blocks)
    assert verify_hash_blocks(geometry, blocks, root, set()) == set(blocks)
    assert blocks.lookups <= 4 * len(path)
    verify_data_blocks(geometry, data_block, data, blocks, root)


def test_each_hash_block_is_checked_on_its_own_and_a_bad_one_takes_its_subtree() -> None:
    tree = _tree("sha256-512-3levels")  # levels of 19, 2 and 1 blocks of 512 bytes
    geometry = tree.geometry
    everything = hash_blocks_needed(geometry, 0, tree.data_blocks)
    blocks = tree.blocks(everything)
    level1 = geometry.levels[1].payload_offset + 512  # level-1 block 1: level-0 blocks 16-18
    level0 = geometry.levels[0].payload_offset + 2 * 512  # level-0 block 2, under block 0
    for bad in (level1, level0):
        blocks[bad] = bytes([blocks[bad][0] ^ 1]) + blocks[bad][1:]
    verified, failed = check_hash_blocks(geometry, blocks, tree.root, set())
    below_level1 = {geometry.levels[0].payload_offset + i * 512 for i in range(16, 19)}
    assert set(failed) == {level1, level0} | below_level1
    assert verified == set(everything) - set(failed)
    assert "does not match its parent" in failed[level1]
    assert "is not verified" in failed[min(below_level1)]
    with pytest.raises(IntegrityError, match=f"payload offset {level1}\\) does not match"):
        verify_hash_blocks(geometry, blocks, tree.root, set())
    # Trusted blocks are parents without being hashed again; a missing parent fails its child.
    top = geometry.levels[2].payload_offset
    again = check_hash_blocks(geometry, tree.blocks([top, level0 + 512]), tree.root, {top})
    assert set(again[1]) == {level0 + 512}
