"""A memory cache of verified, decompressed chunks, capped in bytes, with single flight.

Keys name content (the chunk table digest that authenticates a layer, and a chunk index), so
layers shared by several mounts are fetched and kept once. Single flight: the first caller to
miss a key loads it; later callers wait for that load instead of fetching again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import trio

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


class _Pending:
    """A load in progress: waiters block on `done` and then read `data` or `error`."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkCache:
    """LRU of chunk bytes bounded by `capacity_bytes` (a chunk larger than that is not kept)."""

    def __init__(self, capacity_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if capacity_bytes < 0:
            raise ValueError("cache capacity must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.size_bytes = 0
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> bytes | None:
        """The cached bytes of `key`, counting a hit or a miss."""
        data = self._entries.get(key)
        if data is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return data

    def is_loading(self, key: Hashable) -> bool:
        return key in self._pending

    def claim(self, key: Hashable) -> bool:
        """Take responsibility for loading `key`; False if it is cached or already loading.

        The claimer must call `complete` or `fail` for the key, whatever happens.
        """
        if key in self._entries or key in self._pending:
            return False
        self._pending[key] = _Pending()
        return True

    def complete(self, key: Hashable, data: bytes) -> None:
        pending = self._pending.pop(key)
        self._store(key, data)
        pending.data = data
        pending.done.set()

    def fail(self, key: Hashable, error: BaseException) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.error = error
            pending.done.set()

    async def wait(self, key: Hashable) -> bytes | None:
        """Wait for an in-flight load of `key`. Returns its bytes, or None if nobody is loading
        it. Re-raises the loader's error."""
        pending = self._pending.get(key)
        if pending is None:
            return self._entries.get(key)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.data

    def _store(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size_bytes -= len(old)
        self._entries[key] = data
        self.size_bytes += len(data)
        while self.size_bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size_bytes -= len(evicted)
            self.evictions += 1
