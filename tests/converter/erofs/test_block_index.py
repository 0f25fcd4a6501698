"""The writer's index of stored blocks: found by content, the first address kept, growing,
and bounded."""

from __future__ import annotations

from converter.erofs.block_index import BlockIndex, block_key


def test_finds_what_was_added_across_growth() -> None:
    index = BlockIndex()
    keys = [block_key(b"%d" % number) for number in range(50_000)]
    for address, key in enumerate(keys):
        index.add(key, address)
    assert index.entries == 50_000
    assert all(index.find(key) == address for address, key in enumerate(keys))
    assert index.find(block_key(b"absent")) is None
    index.add(keys[7], 99)  # the first address stays
    assert index.find(keys[7]) == 7


def test_colliding_slots_and_zero_keys() -> None:
    index = BlockIndex()
    for address, key in enumerate([0, 1 << 14, 2 << 14, 0xFFFFFFFFFFFFFFFF]):
        index.add(key, address)
    assert [index.find(key) for key in (0, 1 << 14, 2 << 14, 0xFFFFFFFFFFFFFFFF)] == [0, 1, 2, 3]


def test_stops_taking_blocks_when_full() -> None:
    index = BlockIndex(max_entries=3)
    for address in range(5):
        index.add(block_key(bytes([address])), address)
    assert index.entries == 3
    assert index.find(block_key(bytes([4]))) is None
    assert index.find(block_key(bytes([2]))) == 2
