"""Writes the disk cache takes in the background (`DiskCache.put_later`): batched, and bounded
for the whole process, whatever the number of layers that hand them on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio

from lazyfs.cache.disk import DiskCache
from lazyfs.cache.disk_store import DiskStore


def key(name: str | int) -> str:
    return "frame-" + hashlib.sha512(str(name).encode()).hexdigest()


def test_pending_writes_are_bounded_for_all_layers_together(tmp_path: Path) -> None:
    cache = DiskCache(DiskStore(tmp_path, 64 << 20), pending_write_bytes=3 << 20)
    done: list[str] = []
    frame = b"x" * (1 << 20)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # Forty layers, a frame each: the process holds at most three waiting.
            taken = [cache.put_later(nursery, [(key(layer), frame, (f"layer{layer}", 0))],
                                     lambda layer=layer: done.append(f"layer{layer}"))
                     for layer in range(40)]
            assert taken == [True] * 3 + [False] * 37
            assert cache.pending_write_bytes == 3 << 20
        assert cache.pending_write_bytes == 0 and sorted(done) == ["layer0", "layer1", "layer2"]
        assert [await cache.get(key(layer)) == frame for layer in range(4)] == [
            True, True, True, False]
        # Room again once written.
        async with trio.open_nursery() as nursery:
            assert cache.put_later(nursery, [(key(40), frame, None)], lambda: None)
        assert cache.stats_snapshot()["writes_skipped"] == 37
        assert cache.stats_snapshot()["writes"] == 4

    trio.run(main)


def test_writes_given_up_at_unmount_free_their_room(tmp_path: Path) -> None:
    cache = DiskCache(DiskStore(tmp_path, 64 << 20), pending_write_bytes=1 << 20)
    done: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert cache.put_later(nursery, [(key(1), b"y" * 1000, None)], lambda: done.append(1))
            nursery.cancel_scope.cancel()
        assert done == [1] and cache.pending_write_bytes == 0

    trio.run(main)
