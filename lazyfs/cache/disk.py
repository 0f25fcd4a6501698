"""The disk cache: verified data kept on disk across mounts, daemons and restarts, capped in
bytes, shared by every process of the machine that opens the same directory.

What goes in is chosen by the image layer: compressed frames keyed by their SHA-512 from the
authenticated chunk table (so a frame that several layers or images share is stored once),
and each layer's metadata keyed by the digests that authenticate it. Frames rather than
decoded chunks: they are smaller on disk (often by half), they are exactly the bytes the
chunk table authenticates, so reading one back goes through the very checks a fetched frame
goes through, and they need no dm-verity tree to be checked. The memory cache keeps decoded
chunks for what is hot.

This module is the asynchronous face of `disk_store.DiskStore` (its docstring is the
protocol between processes): every call runs in a worker thread under a limiter, counts what
it did, and turns disk and index errors into misses and skipped writes: a cache that cannot
write must not fail a read, nor a mount. One that cannot be used at all (its directory or its
index cannot be opened, a newer index format, a file system too full to open the index on)
turns itself off: every call is a miss or a skipped write from then on. Either is logged once,
with the directory and the reason.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from lazyfs.cache.defaults import default_cache_dir
from lazyfs.cache.disk_index import DiskCacheError
from lazyfs.cache.disk_store import DiskStore

log = logging.getLogger(__name__)

DEFAULT_FREE_FRACTION = 0.10
DEFAULT_MAX_BYTES = 20 << 30
MIN_DEFAULT_BYTES = 64 << 20
IO_THREADS = 4
# Bytes handed to `DiskCache.put_later` and not yet written, for the whole process: past it a
# write is skipped (the memory it would hold matters more than one more entry on disk).
DEFAULT_PENDING_WRITE_BYTES = 32 << 20
# How long the background writer lets writes gather before it takes a batch, unless a quarter
# of the pending limit waits already: one transaction and one hand-over to a worker thread
# then serve dozens of entries, not one or two (a bulk read's frames came a few at a time,
# and each batch's fixed cost made an entry 1.7 ms of CPU instead of 0.2).
WRITE_GATHER_S = 0.05

__all__ = ["PULL_POLICIES", "STORE_ERRORS", "DiskCache", "DiskCacheError", "DiskCacheOptions",
           "default_cache_dir", "open_disk_cache"]

# What the store raises for a cache that fails: its files (OSError), its index (sqlite3.Error),
# or the whole cache (DiskCacheError: its directory or index cannot be used).
STORE_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.Error, DiskCacheError)


# When an image's tag is looked up in its registry (`lazyfs.oci.image_memory`): every time;
# only when the disk cache remembers no manifest for it (as container runtimes run an image
# pulled before); never.
PULL_POLICIES = ("always", "missing", "never")


@dataclass(frozen=True)
class DiskCacheOptions:
    """Where the disk cache lives and how large it may grow. `size_bytes` None: a tenth of
    the file system's free space (plus what the cache holds already), at most 20 GiB.
    `pull`: one of PULL_POLICIES."""

    directory: str = field(default_factory=default_cache_dir)
    size_bytes: int | None = None
    pull: str = "always"

    def __post_init__(self) -> None:
        if self.size_bytes is not None and self.size_bytes < 0:
            raise ValueError("disk cache size must be >= 0")
        if self.pull not in PULL_POLICIES:
            raise ValueError(f"pull policy {self.pull!r} is none of {PULL_POLICIES}")


def default_capacity(directory: str, used_bytes: int) -> int:
    """The cap when none is given: a tenth of the free space the cache could grow into."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    wanted = int(DEFAULT_FREE_FRACTION * (free + used_bytes))
    return min(DEFAULT_MAX_BYTES, max(MIN_DEFAULT_BYTES, wanted))


def open_store(options: DiskCacheOptions, *, index_in_background: bool = False) -> DiskStore:
    """Open (creating) the store of `options`, with its cap; `index_in_background`: see
    `DiskStore.open_index_in_background` (its errors come from `DiskStore.wait_index`).
    Raises DiskCacheError."""
    default_cap = (None if options.size_bytes is not None
                   else partial(default_capacity, options.directory))
    store = DiskStore(options.directory, options.size_bytes or 0, default_cap=default_cap,
                      open_index=not index_in_background)
    if index_in_background:
        store.open_index_in_background()
    return store


Ref = tuple[str, int] | None  # the chunk (layer, index) an entry is kept for


@dataclass(frozen=True)
class _QueuedWrite:
    entries: list[tuple[str, bytes, Ref]]
    size: int
    done: Callable[[], None]


class DiskCache:
    """The disk cache as a trio program uses it: `get`, `put`, `delete` of keys named by the
    image layer, in worker threads; counters for the stats file."""

    def __init__(self, store: DiskStore, io_threads: int = IO_THREADS,
                 pending_write_bytes: int = DEFAULT_PENDING_WRITE_BYTES) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(io_threads)
        # Writes in the background (`put_later`): what waits, and its bytes, for every layer
        # of the process together.
        self.pending_write_limit = pending_write_bytes
        self.pending_write_bytes = 0
        self._queued: list[_QueuedWrite] = []
        self._writing = False
        self.skipped_writes = 0
        self._told_failure = False  # an operation that failed has been logged
        self.failure: str | None = None  # why the cache is off (None: it is on)
        self.hits = 0
        self.misses = 0
        self.bytes_read = 0
        self.writes = 0
        self.bytes_written = 0
        self.bad_entries = 0
        self.errors = 0
        self.warm_chunks = 0
        # Decoded chunks by frame key, loaded and checked by the command before it started
        # this process (`lazyfs.startup.warm_start`); each is taken once, or dropped.
        self._warm: dict[str, memoryview] = {}

    def adopt_warm(self, chunks: dict[str, memoryview]) -> None:
        """Take the chunks a warm start loaded (see `take_warm`), with those taken before."""
        self._warm.update(chunks)

    def take_warm(self, key: str, ref: tuple[str, int]) -> memoryview | None:
        """The decoded chunk a warm start loaded from the entry `key` (for chunk `ref` =
        (layer, index)), once; the use is noted as a read of the entry would be. The caller
        checks that `key` is its chunk's frame key and the size is the chunk's."""
        view = self._warm.pop(key, None)
        if view is None:
            return None
        self.store.note_use(key, ref)  # written with the next batch: no index on the loop
        self.hits += 1
        self.warm_chunks += 1
        return view

    def drop_warm(self) -> None:
        """Drop what the layers did not take (chunks of a manifest that has moved on)."""
        self._warm = {}

    @classmethod
    def open(cls, options: DiskCacheOptions, *, index_in_background: bool = False) -> DiskCache:
        """Open the cache directory (blocking: call from a thread or before trio runs).
        `index_in_background`: entries can be read at once while the index opens (see
        `DiskStore.open_index_in_background`). Raises DiskCacheError."""
        return cls(open_store(options, index_in_background=index_in_background))

    @property
    def directory(self) -> str:
        return str(self.store.directory)

    async def wait_index(self) -> bool:
        """Wait until the index is open (`DiskStore.wait_index`). Returns whether the cache is
        on: one whose index cannot be opened is turned off (logged once) instead."""
        if self.failure is None:
            try:
                await trio.to_thread.run_sync(self.store.wait_index, limiter=self._limiter)
            except STORE_ERRORS as exc:
                self._trouble("open", exc)
        return self.failure is None

    async def get(self, key: str, ref: tuple[str, int] | None = None) -> bytes | None:
        """The bytes stored under `key` (not verified: the caller must), or None."""
        data = None
        if self.failure is None:
            try:
                data = await trio.to_thread.run_sync(self.store.get, key, ref,
                                                     limiter=self._limiter)
            except STORE_ERRORS as exc:
                self._trouble("read", exc)
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
            self.bytes_read += len(data)
        return data

    async def contains(self, key: str) -> bool:
        if self.failure is not None:
            return False
        try:
            return await trio.to_thread.run_sync(self.store.contains, key,
                                                 limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("read", exc)
            return False

    async def put(self, key: str, data: bytes, ref: tuple[str, int] | None = None) -> None:
        """Store `data` (verified by the caller) under `key`; a failure is logged once."""
        if self.failure is not None:
            return
        try:
            await trio.to_thread.run_sync(self.store.put, key, data, ref,
                                          limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("write", exc)
            return
        self.writes += 1
        self.bytes_written += len(data)

    def put_later(self, nursery: trio.Nursery, entries: list[tuple[str, bytes, Ref]],
                  done: Callable[[], None]) -> bool:
        """Store `entries` (verified by the caller; each counts on those before it) in the
        background, batched with the others waiting (`DiskStore.put_many`: one transaction
        and one flush of the disk for a batch); `done` is called once they are written or
        given up. False, and nothing done, when the process's pending writes would exceed
        `pending_write_limit` (or the cache is off)."""
        size = sum(len(data) for _, data, _ in entries)
        if (self.failure is not None or not entries
                or self.pending_write_bytes + size > self.pending_write_limit):
            self.skipped_writes += self.failure is None
            return False
        self.pending_write_bytes += size
        self._queued.append(_QueuedWrite(entries, size, done))
        if not self._writing:
            self._writing = True
            nursery.start_soon(self._write_queued)
        return True

    async def _write_queued(self) -> None:
        """Write what `put_later` queued, a batch at a time (gathered for WRITE_GATHER_S),
        until nothing waits."""
        batch: list[_QueuedWrite] = []
        try:
            while self._queued:
                if self.pending_write_bytes < self.pending_write_limit // 4:
                    await trio.sleep(WRITE_GATHER_S)
                batch, self._queued = self._queued, []
                await self._write_batch(batch)
                self._release(batch)
                batch = []
        finally:
            self._writing = False
            self._release(batch)  # cancelled (unmount): given up
            if self._queued:  # cancelled while others queued: they are given up too
                queued, self._queued = self._queued, []
                self._release(queued)

    async def _write_batch(self, batch: list[_QueuedWrite]) -> None:
        if self.failure is not None:
            return
        groups = [write.entries for write in batch]
        try:
            _, errors = await trio.to_thread.run_sync(self.store.put_many, groups,
                                                      limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("write", exc)
            return
        for error in errors:
            self._trouble("write", error)
        self.writes += sum(len(group) for group in groups) - len(errors)
        self.bytes_written += sum(write.size for write in batch)

    def _release(self, writes: list[_QueuedWrite]) -> None:
        for write in writes:
            self.pending_write_bytes -= write.size
            write.done()

    async def delete(self, key: str) -> None:
        if self.failure is not None:
            return
        try:
            await trio.to_thread.run_sync(self.store.delete, key, limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("delete", exc)

    async def register_layer(self, layer: str, label: str, chunk_count: int) -> None:
        if self.failure is not None:
            return
        try:
            await trio.to_thread.run_sync(self.store.register_layer, layer, label, chunk_count,
                                          limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("write", exc)

    async def layer_chunks(self, layer: str) -> list[int]:
        """`DiskStore.layer_chunks` (empty when the index cannot be read)."""
        if self.failure is not None:
            return []
        try:
            return await trio.to_thread.run_sync(self.store.layer_chunks, layer,
                                                 limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("read", exc)
            return []

    def note_used(self, keys: tuple[str, ...]) -> None:
        """Count a use of each of `keys` (read by another process that did not), for the LRU
        order; written with this process's next batch of uses."""
        for key in keys:
            self.store.note_use(key)

    async def remember_reads(self, layer: str, chunks: list[int]) -> None:
        """`DiskStore.remember_reads`; a failure is logged once."""
        if self.failure is not None:
            return
        try:
            await trio.to_thread.run_sync(self.store.remember_reads, layer, chunks,
                                          limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("write", exc)

    def note_bad_entry(self) -> None:
        self.bad_entries += 1

    def stats_snapshot(self) -> dict[str, Any]:
        """What this process did with the disk cache, and its cap."""
        return {
            "directory": self.directory,
            "capacity_bytes": self.store.capacity_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "bytes_read": self.bytes_read,
            "writes": self.writes,
            "writes_skipped": self.skipped_writes,
            "pending_write_bytes": self.pending_write_bytes,
            "bytes_written": self.bytes_written,
            "evictions": self.store.evictions,
            "bad_entries": self.bad_entries,
            "errors": self.errors,
            "warm_start_chunks": self.warm_chunks,
            "off": self.failure,
        }

    async def aclose(self) -> None:
        """Close the store (uses not yet written are lost, quietly, if it has failed)."""
        try:
            await trio.to_thread.run_sync(self.store.close, limiter=self._limiter)
        except STORE_ERRORS as exc:
            self._trouble("close", exc)

    def _trouble(self, what: str, exc: Exception) -> None:
        """Count a failed operation. A DiskCacheError means that the cache cannot be used at
        all (its message names the directory): it is turned off. The first failure of an
        operation and the turning off are each logged once, with the directory and reason."""
        self.errors += 1
        if isinstance(exc, DiskCacheError):
            if self.failure is None:
                self.failure = str(exc)
                log.warning("%s (going on without the disk cache)", exc)
        elif not self._told_failure and self.failure is None:
            self._told_failure = True
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.warning("disk cache %s: cannot %s: %s (the cache skips what fails; logged once)",
                        self.directory, what, reason)


def open_disk_cache(options: DiskCacheOptions, *,
                    index_in_background: bool = False) -> DiskCache | None:
    """`DiskCache.open`, for a process that goes on without the disk cache when it cannot be
    used: None then, logged once with the directory and the reason. Blocking (call from a
    thread or before trio runs)."""
    try:
        return DiskCache.open(options, index_in_background=index_in_background)
    except STORE_ERRORS as exc:
        reason = str(exc)  # a DiskCacheError names the directory, the others may not
        if not isinstance(exc, DiskCacheError):
            reason = f"disk cache {options.directory}: {reason}"
        log.warning("%s (going on without the disk cache)", reason)
        return None
