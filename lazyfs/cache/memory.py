"""A memory cache of verified, decoded chunks, capped in bytes, with single flight per key.

Keys name content (the digest that authenticates a layer, and a chunk index), so a layer
shared by several images is fetched and kept once. Single flight: the first caller to miss a
key loads it; later callers wait for that load instead of fetching again. Everything runs on
the trio thread, and no method awaits between looking at the state and changing it, so no
lock is needed.

The protocol (`claim` / `complete` / `fail` / `wait`):

- **Who may claim.** Anyone, for a key that is neither cached nor loading: `claim(key)` then
  returns True and the caller is the key's one *claimer* until it resolves it. Otherwise it
  returns False and the caller must not load the key; it `wait`s.
- **What a claimer must do, in every outcome.** Resolve every key it claimed exactly once:
  `complete(key, data)` with verified bytes, or `fail(key, error)`. That includes errors it
  did not expect and cancellation (unmount): resolve in a `finally`, or waiters hang for ever.
  A load that others may wait on runs in the mount's nursery, not in the reader's call, so a
  reader that is interrupted does not cancel it. After resolving a key, never touch it
  again: it may already be claimed anew by another loader, whose load a late `fail` would
  break (`fail` of a key that is not loading does nothing, but it cannot tell whose it is).
- **What waiters see.** `wait(key)` on a loading key blocks until it is resolved, then
  returns the claimer's bytes or raises the claimer's error (the same exception object for
  every waiter: do not modify it). A failure is not cached: the next `claim` may try again;
  remembering bad chunks is the caller's business. `wait` on a key that is not loading
  returns the cached bytes, or None.
- **Eviction between complete and wait.** `complete` hands the bytes to the waiters already
  blocked even if they are evicted at once (or never stored, being larger than the cache).
  A caller that reaches `wait` after the load finished, when the bytes were evicted already,
  gets None, and must go round again: `get`, then `claim` or `wait`.
- **Counts.** `get` counts a hit or a miss; `wait` counts neither; eviction to stay under
  `capacity_bytes` counts an eviction. The cache is the only place these are counted. Hits
  and misses are also kept per key namespace (a tuple key's first element: the layer's
  content key), so a layer reads its own share with `counts(namespace)`; only the
  `NAMESPACES_COUNTED` most recently counted namespaces are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import trio

from lazyfs.cache.defaults import DEFAULT_CACHE_BYTES as DEFAULT_CACHE_BYTES

# A chunk's bytes: a bytes object, or a read-only view of memory shared with the command that
# loaded it before the daemon started (`lazyfs.startup.warm_start`), kept without a copy.
ChunkData = bytes | memoryview

NAMESPACES_COUNTED = 4096


class _Pending:
    """A load in progress: waiters block on `done` and then read `data` or `error`."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: ChunkData | None = None
        self.error: BaseException | None = None


class ChunkCache:
    """LRU of chunk bytes bounded by `capacity_bytes` (a chunk larger than that is not kept)."""

    def __init__(self, capacity_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if capacity_bytes < 0:
            raise ValueError("cache capacity must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.size_bytes = 0
        # Bytes of chunks on their way in (`hold`): counted in the cap, so that the cache
        # makes room for them before they land, not after.
        self.held_bytes = 0
        self._entries: OrderedDict[Hashable, ChunkData] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._counts: OrderedDict[Hashable, list[int]] = OrderedDict()  # [hits, misses]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> ChunkData | None:
        """The cached bytes of `key`, counting a hit or a miss."""
        data = self._entries.get(key)
        counts = self._namespace_counts(key)
        if data is None:
            self.misses += 1
            counts[1] += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        counts[0] += 1
        return data

    def peek(self, key: Hashable) -> ChunkData | None:
        """The cached bytes of `key` without counting a hit or a miss or refreshing it: for
        bytes a check borrows (a neighbouring chunk), not bytes a read returns."""
        return self._entries.get(key)

    def keep(self, key: Hashable, data: ChunkData) -> None:
        """Store verified bytes that no load claimed (a layer's dm-verity hash blocks),
        counted in the cap like a chunk; nobody waits for them."""
        if key not in self._pending:
            self._store(key, data)

    def keys_in(self, namespace: Hashable) -> list[tuple[Hashable, ...]]:
        """The cached keys of `namespace` (tuple keys whose first element it is)."""
        return [key for key in self._entries
                if isinstance(key, tuple) and key and key[0] == namespace]

    def counts(self, namespace: Hashable) -> tuple[int, int]:
        """(hits, misses) of the keys in `namespace` (see `get`)."""
        hits, misses = self._counts.get(namespace, (0, 0))
        return hits, misses

    def _namespace_counts(self, key: Hashable) -> list[int]:
        namespace = key[0] if isinstance(key, tuple) and key else key
        counts = self._counts.get(namespace)
        if counts is None:
            counts = self._counts[namespace] = [0, 0]
            if len(self._counts) > NAMESPACES_COUNTED:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(namespace)
        return counts

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

    def complete(self, key: Hashable, data: ChunkData) -> None:
        """Store the claimed `key`'s bytes and hand them to its waiters. KeyError if `key`
        is not loading (resolved already, or never claimed)."""
        pending = self._pending.pop(key)
        self._store(key, data)
        pending.data = data
        pending.done.set()

    def fail(self, key: Hashable, error: BaseException) -> None:
        """Raise `error` in the claimed `key`'s waiters; nothing is stored. No-op if `key` is
        not loading."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.error = error
            pending.done.set()

    async def wait(self, key: Hashable) -> ChunkData | None:
        """Wait for an in-flight load of `key`. Returns its bytes, or None if nobody is loading
        it. Re-raises the loader's error."""
        pending = self._pending.get(key)
        if pending is None:
            return self._entries.get(key)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.data

    def hold(self, size: int) -> None:
        """Count `size` bytes of a chunk being loaded (its stream's buffer) in the cap until
        `release`: the least recently used entries make room for it now."""
        self.held_bytes += size
        self._evict_to(self.capacity_bytes - self.held_bytes)

    def release(self, size: int) -> None:
        """Stop counting bytes `hold` counted (the chunk is stored, or given up)."""
        self.held_bytes -= size

    @property
    def entries(self) -> int:
        return len(self._entries)

    def stats_snapshot(self) -> dict[str, int]:
        """Capacity, use and counts, for the stats file."""
        return {
            "capacity_bytes": self.capacity_bytes,
            "size_bytes": self.size_bytes,
            "held_bytes": self.held_bytes,
            "entries": self.entries,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    def _store(self, key: Hashable, data: ChunkData) -> None:
        if len(data) > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size_bytes -= len(old)
        self._entries[key] = data
        self.size_bytes += len(data)
        self._evict_to(max(self.capacity_bytes - self.held_bytes, len(data)))

    def _evict_to(self, size: int) -> None:
        """Evict the least recently used entries until they take at most `size` bytes."""
        while self.size_bytes > size and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.size_bytes -= len(evicted)
            self.evictions += 1
