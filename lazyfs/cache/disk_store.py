"""The disk cache's store: immutable entries in files, an sqlite index for the cap and the LRU.

Synchronous: callers run it in worker threads (`lazyfs.cache.disk` does). Any number of
processes may use one directory at once (mount daemons, the snapshotter, `lazyfs cache`).

    DIR/index.sqlite      entries (key, kind, bytes, last use), the total, layers and the
                          chunks each layer has in the store (for `lazyfs cache ls`), and
                          the order in which each layer's last mount first read its chunks
                          (`lazyfs.cache.disk_index`)
    DIR/index.lock        held while a process opens the index, checks it and, if damaged,
                          starts it afresh with the entry files (`disk_index.open_index`)
    DIR/data/KIND/HH/HEX  one file per entry: complete once it has this name, never changed
    DIR/tmp/              files being written; a writer killed mid-write leaves one here

The protocol every process follows (sqlite's write lock serialises the index; WAL mode lets
readers go on meanwhile):

- **put.** One IMMEDIATE transaction inserts the entry's row (or refreshes it), adds its size
  to the total and deletes least-recently-used rows until the total fits the cap, less what
  the index's own files and the directories take (`overhead_bytes`); after the
  commit the evicted files are unlinked. Only then is the file written: `tmp/`, then
  renamed to its name. If the row is gone by then (another process evicted it meanwhile), the
  file is unlinked again. So every named file has a row, the total counts every named file,
  and after a commit the total never exceeds the cap of the process that committed.
- **put_many.** The same for a batch: one transaction for all its rows, then every file is
  written and renamed, in order.
- **No fsync.** Entry files are not synced: a name means a complete file while the machine
  runs, and after a power loss one written shortly before may be short or empty. It then
  fails its check like any damaged entry and is fetched again (see below); syncing each
  entry cost a bulk read more than its writes (a 3 GiB layer is some 6,000 entries).
- **get.** Opens the file by name, without the index: a name means a complete file. Uses are
  kept in memory and written to the index in batches, so the LRU order is approximate.
- **delete.** Row first, then the file.
- **A crash** at any point leaves at worst a file in `tmp/` (removed by a later open once it is
  old) or a row without a file (a get misses; the row is evicted in time, or by `prune`).
- **A damaged index**, found when it is opened or used, is started afresh with a row for each
  entry file; a process that had the old one open follows the new one at its next transaction.

Nothing read from the store is trusted: every byte is verified by the caller before use, so
a torn or flipped file costs a refetch, never a wrong byte.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from lazyfs.cache.disk_index import (
    INDEX_FILES,
    DiskCacheError,
    encode_read_order,
    is_damage,
    layer_entries,
    open_index,
)
from lazyfs.cache.trust import prepare_directory, private_opener, untrusted_message

log = logging.getLogger(__name__)

DISK_BLOCK = 4096
TMP_MAX_AGE_S = 3600.0
# A row whose file is missing may belong to a put in progress: `prune` leaves it this long.
PENDING_MAX_AGE_S = 600.0
TOUCH_FLUSH_S = 2.0
TOUCH_FLUSH_ENTRIES = 512
# What the cap counts besides the entries (`DiskStore.overhead_bytes`): the index's files, its
# WAL as no less than WAL_ROOM_BYTES (it grows to disk_index.WAL_CHECKPOINT_PAGES pages and
# a transaction more before a checkpoint cuts it back), and the directories, recounted every
# DIRECTORIES_RECOUNT_S (this process counts those it makes at once); in all no less than
# MIN_OVERHEAD_BYTES, more than a small cache's take, so that the room for entries does not
# move with every page the index grows by.
WAL_ROOM_BYTES = 1 << 20
MIN_OVERHEAD_BYTES = 2 << 20
DIRECTORIES_RECOUNT_S = 10.0
_KEY = re.compile(r"^([a-z]+)-([0-9a-f]{16,128})$")



@dataclass(frozen=True)
class LayerRow:
    """A layer in the store: what it is called, its chunks in the store and their bytes."""

    layer: str
    label: str
    chunk_count: int
    cached_chunks: int
    cached_bytes: int
    last_used: float


@dataclass(frozen=True)
class StoreTotals:
    """The store as a whole: bytes counted against the cap, entries by kind, evictions ever."""

    size_bytes: int
    entries: dict[str, int]
    evictions: int


def read_entry(directory: Path, key: str) -> bytes | None:
    """Entry `key` of the cache in `directory` (unverified), or None; for a process that only
    looks (nothing is touched or written). Raises OSError."""
    try:
        with open(entry_path(directory, key), "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def disk_bytes(size: int) -> int:
    """What a file of `size` bytes is counted as: whole file-system blocks."""
    return max(1, -(-size // DISK_BLOCK)) * DISK_BLOCK


def entry_path(directory: Path, key: str) -> Path:
    """Where the cache in `directory` keeps entry `key` (whether it has it or not)."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"not a cache key: {key!r}")
    kind, name = match.groups()
    return directory / "data" / kind / name[:2] / name


def refill_index(directory: Path, db: sqlite3.Connection) -> int:
    """Count the entry files of the cache in `directory` into its fresh index `db` (after it
    was found damaged): each with its size, and its modification time as its last use.
    Returns how many. Raises sqlite3.Error."""
    rows = []
    for key in _entry_keys(directory):
        try:
            status = entry_path(directory, key).stat()  # also: a file where its key says
        except FileNotFoundError:
            continue
        rows.append((key, key.partition("-")[0], disk_bytes(status.st_size), status.st_mtime,
                     status.st_mtime))
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?)", rows)
        db.execute("UPDATE totals SET bytes = (SELECT COALESCE(SUM(size), 0) FROM entries) "
                   "WHERE id = 1")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return len(rows)


def _entry_keys(directory: Path) -> Iterator[str]:
    """The keys of the entry files under `directory / "data"`."""
    for path in (directory / "data").glob("*/*/*"):
        key = f"{path.parent.parent.name}-{path.name}"
        if _KEY.match(key):
            yield key


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _recovering(method: Callable[Concatenate[DiskStore, _P], _R],
                ) -> Callable[Concatenate[DiskStore, _P], _R]:
    """`method`, called once more when it failed on a damaged index, after the index was
    opened anew (`DiskStore._reopen_index`: checked, and started afresh if damaged)."""
    @functools.wraps(method)
    def call(self: DiskStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            log.info("disk cache %s: the index failed (%s); opening it anew",
                     self.directory, exc)
            with self._lock:
                self._reopen_index()
        return method(self, *args, **kwargs)

    return call


class DiskStore:
    """One process's handle on a cache directory; thread-safe (one lock around the index).

    With `default_cap`, the cap is `default_cap(bytes held)` once the index tells that. With
    `open_index=False` the index is opened by `open_index_in_background`: entries can be read
    at once (a read needs no index), anything that needs the index waits for it.

    An index found damaged while in use (sqlite's "malformed", a missing table) is opened
    anew, checked and if need be started afresh (`disk_index.open_index`), and the call tried
    once more; one that another process started afresh meanwhile is followed (its file is
    another): before each transaction the file is compared with the one open."""

    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int, *,
                 default_cap: Callable[[int], int] | None = None,
                 open_index: bool = True) -> None:
        if capacity_bytes < 0:
            raise ValueError("disk cache capacity must be >= 0")
        self.directory = Path(directory)
        self._capacity = capacity_bytes
        self._default_cap = default_cap
        self.evictions = 0  # by this process
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._refs: dict[tuple[str, int], str] = {}
        self._last_flush = time.monotonic()
        self._index: sqlite3.Connection | None = None
        self._index_path = self.directory / "index.sqlite"
        self._index_id: tuple[int, int] | None = None  # the file open (device, inode)
        self._index_error: DiskCacheError | None = None
        self._index_ready = threading.Event()
        self._directory_bytes = 0  # the directories, as last counted (`overhead_bytes`)
        self._directories_counted_at = -DIRECTORIES_RECOUNT_S
        try:
            unsafe = prepare_directory(self.directory)
            if unsafe is None:
                for sub in ("data", "tmp"):
                    (self.directory / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DiskCacheError(f"cannot use the cache directory {self.directory}: "
                                 f"{_reason(exc)}") from None
        if unsafe is not None:
            raise DiskCacheError(untrusted_message(self.directory, unsafe))
        if open_index:
            self._open_index()
            self.wait_index()

    def open_index_in_background(self) -> None:
        """Open the index (and set a default cap) in a thread of its own."""
        threading.Thread(target=self._open_index, name="lazyfs-disk-index", daemon=True).start()

    def wait_index(self) -> None:
        """Return once the index is open. Raises DiskCacheError when it cannot be."""
        self._index_ready.wait()
        if self._index_error is not None:
            raise self._index_error

    @property
    def _db(self) -> sqlite3.Connection:
        self.wait_index()
        assert self._index is not None
        return self._index

    @property
    def capacity_bytes(self) -> int:
        self._index_ready.wait()  # a default cap is set once the index tells the size held
        return self._capacity

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self._capacity = value

    def _open_index(self) -> None:
        try:
            self._index = open_index(self.directory, partial(refill_index, self.directory))
            self._index_id = _file_id(self._index_path)
            self._sweep_tmp(TMP_MAX_AGE_S)
            if self._default_cap is not None:
                (held,) = self._index.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()
                self._capacity = self._default_cap(int(held))
        except (OSError, sqlite3.Error, DiskCacheError) as exc:
            if self._index is not None:
                self._index.close()
                self._index = None
            self._index_error = _unusable(self.directory, exc)
        finally:
            self._index_ready.set()

    def _reopen_index(self) -> None:
        """Open the index anew (the caller holds the lock): checked, and started afresh if
        damaged (`open_index`). Raises DiskCacheError when it cannot be opened: so does every
        call that needs it from then on."""
        index, self._index = self._index, None
        if index is not None:
            with contextlib.suppress(sqlite3.Error):
                index.close()
        try:
            self._index = open_index(self.directory, partial(refill_index, self.directory))
        except (OSError, sqlite3.Error, DiskCacheError) as exc:
            self._index_error = _unusable(self.directory, exc)
            raise self._index_error from None
        self._index_id = _file_id(self._index_path)

    def close(self) -> None:
        self._index_ready.wait()
        with self._lock:
            if self._index is None:
                return
            with contextlib.suppress(sqlite3.Error):
                self._flush_touches()
            self._index.close()

    # -- entries ---------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return entry_path(self.directory, key)

    def get(self, key: str, ref: tuple[str, int] | None = None) -> bytes | None:
        """The entry's bytes (unverified), or None. Raises OSError, sqlite3.Error."""
        data = read_entry(self.directory, key)
        if data is None:
            return None
        self.touch(key, ref)
        return data

    def contains(self, key: str) -> bool:
        return self.path(key).exists()

    def note_use(self, key: str, ref: tuple[str, int] | None = None) -> None:
        """Remember a use of `key` (by chunk `ref` = (layer, index)), written with the next
        batch of uses (never now: no index work, no error)."""
        with self._lock:
            self._touched[key] = time.time()
            if ref is not None:
                self._refs[ref] = key

    @_recovering
    def touch(self, key: str, ref: tuple[str, int] | None = None) -> None:
        """Remember a use of `key` (by chunk `ref` = (layer, index)); written in batches."""
        with self._lock:
            self._touched[key] = time.time()
            if ref is not None:
                self._refs[ref] = key
            due = time.monotonic() - self._last_flush > TOUCH_FLUSH_S
            if due or len(self._touched) + len(self._refs) > TOUCH_FLUSH_ENTRIES:
                with self._transaction():
                    self._flush_touches()

    @_recovering
    def put(self, key: str, data: bytes, ref: tuple[str, int] | None = None) -> list[str]:
        """Store `data` under `key` unless it is there (then only a use is noted). Returns the
        keys evicted to make room. An entry larger than the cap is not stored. Raises
        OSError (the row is withdrawn again), sqlite3.Error."""
        final = self.path(key)
        if final.exists():
            self.touch(key, ref)
            return []
        size = disk_bytes(len(data))
        # A directory the file needs first is a block more besides the entries.
        new_directories = sum(not path.is_dir() for path in (final.parents[1], final.parent))
        room = self.capacity_bytes - self.overhead_bytes(new_directories * DISK_BLOCK)
        if size > room:
            return []
        with self._lock, self._transaction():
            self._flush_touches()
            evicted = self._reserve(key, size, room)
            if ref is not None:
                self._add_ref(ref, key)
        self._unlink(evicted)
        try:
            self._write(final, data)
        except OSError:
            self.delete(key)
            raise
        self._directory_bytes += new_directories * DISK_BLOCK
        with self._lock:
            kept = self._db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone()
        if kept is None:  # evicted by another process while we wrote
            final.unlink(missing_ok=True)
        return [victim for victim, _ in evicted]

    @_recovering
    def put_many(self, groups: Sequence[Sequence[tuple[str, bytes, tuple[str, int] | None]]],
                 ) -> tuple[list[str], list[OSError]]:
        """`put` of many entries at once: one transaction counts them all, then their files
        are written, one after another. Within a group an entry counts on those before it (a
        frame on its hash blocks): once one fails, the rest of its group is withdrawn too.
        Returns (the keys evicted to make room, the errors of the groups that failed);
        raises sqlite3.Error."""
        wanted: list[list[tuple[str, bytes, tuple[str, int] | None]]] = []
        for group in groups:
            fresh = []
            for key, data, ref in group:
                if self.path(key).exists():
                    self.touch(key, ref)
                else:
                    fresh.append((key, data, ref))
            if fresh:
                wanted.append(fresh)
        if not wanted:
            return [], []
        directories = {self.path(key).parent for group in wanted for key, _, _ in group}
        new_directories = len({path for path in directories if not path.is_dir()}
                              | {path.parent for path in directories
                                 if not path.parent.is_dir()})
        room = self.capacity_bytes - self.overhead_bytes(new_directories * DISK_BLOCK)
        counted: list[list[tuple[str, bytes]]] = []
        with self._lock, self._transaction():
            self._flush_touches()
            evicted: list[tuple[str, int]] = []
            for group in wanted:
                kept_group = []
                for key, data, ref in group:
                    size = disk_bytes(len(data))
                    if size > room:
                        break
                    evicted += self._reserve(key, size, room)
                    if ref is not None:
                        self._add_ref(ref, key)
                    kept_group.append((key, data))
                counted.append(kept_group)
        batch = {key for entries in counted for key, _ in entries}
        self._unlink([victim for victim in evicted if victim[0] not in batch])
        errors: list[OSError] = []
        renamed: list[str] = []
        for entries in counted:
            for position, (key, data) in enumerate(entries):
                try:
                    self._write(self.path(key), data)
                except OSError as exc:
                    errors.append(exc)
                    for withdrawn, _ in entries[position:]:
                        self.delete(withdrawn)
                    break
                renamed.append(key)
        self._directory_bytes += new_directories * DISK_BLOCK
        if renamed:
            with self._lock:
                rows = {row[0] for row in self._db.execute(
                    f"SELECT key FROM entries WHERE key IN ({','.join('?' * len(renamed))})",
                    renamed)}
            for key in renamed:
                if key not in rows:  # evicted by another process (or this batch) meanwhile
                    self.path(key).unlink(missing_ok=True)
        return [victim for victim, _ in evicted], errors

    @_recovering
    def delete(self, key: str) -> None:
        """Forget `key`: its row, then its file."""
        with self._lock, self._transaction():
            self._drop(key)
        self.path(key).unlink(missing_ok=True)

    @_recovering
    def register_layer(self, layer: str, label: str, chunk_count: int) -> None:
        """Name a layer for `lazyfs cache ls` (its chunks are added with their entries)."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO layers VALUES (?, ?, ?, ?) ON CONFLICT (layer) DO UPDATE SET "
                "label = excluded.label, last_used = excluded.last_used",
                (layer, label, chunk_count, time.time()))

    # -- the whole store -------------------------------------------------------------------

    def overhead_bytes(self, new_directory_bytes: int = 0) -> int:
        """What the cap counts besides the entries: the index's files (the WAL as no less than
        WAL_ROOM_BYTES) and the cache's directories, with `new_directory_bytes` about to be
        made; no less than MIN_OVERHEAD_BYTES."""
        index = 0
        for name in INDEX_FILES:
            used = _disk_usage(self.directory / name)
            index += max(used, WAL_ROOM_BYTES) if name.endswith("-wal") else used
        now = time.monotonic()
        if now - self._directories_counted_at >= DIRECTORIES_RECOUNT_S:
            self._directory_bytes = _directories_bytes(self.directory)
            self._directories_counted_at = now
        return max(MIN_OVERHEAD_BYTES, index + self._directory_bytes + new_directory_bytes)

    @_recovering
    def totals(self) -> StoreTotals:
        with self._lock:
            size, evictions = self._db.execute(
                "SELECT bytes, evictions FROM totals WHERE id = 1").fetchone()
            kinds = dict(self._db.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind"))
        return StoreTotals(int(size), {str(k): int(v) for k, v in kinds.items()},
                           int(evictions))

    @_recovering
    def layers(self) -> list[LayerRow]:
        with self._lock, self._transaction():
            self._flush_touches()
        with self._lock:
            rows = self._db.execute(
                "SELECT l.layer, l.label, l.chunk_count, COUNT(e.key), COALESCE(SUM(e.size), 0),"
                " l.last_used FROM layers l LEFT JOIN refs r ON r.layer = l.layer"
                " LEFT JOIN entries e ON e.key = r.key GROUP BY l.layer"
                " ORDER BY l.last_used DESC").fetchall()
        return [LayerRow(*row) for row in rows]

    @_recovering
    def layer_chunks(self, layer: str) -> list[int]:
        """The chunks of `layer` the store holds that its last mount read, in the order it
        first read them (see `remember_reads`); without such an order, every chunk it holds,
        least recently used first."""
        with self._lock, self._transaction():
            self._flush_touches()
        with self._lock:
            return [chunk for chunk, _ in layer_entries(self._db, layer)]

    @_recovering
    def remember_reads(self, layer: str, chunks: list[int]) -> None:
        """Keep the order in which a mount of `layer` first read `chunks`, in place of the
        last mount's: what a warm start loads ahead of reads, and in which order."""
        with self._lock, self._transaction():
            self._db.execute("INSERT OR REPLACE INTO read_orders VALUES (?, ?, ?)",
                             (layer, encode_read_order(chunks), time.time()))

    @_recovering
    def prune(self, to_bytes: int) -> int:
        """Evict least-recently-used entries until at most `to_bytes` are kept, after
        reconciling the index with the files (rows without files, files without rows, old
        temporary files). Returns the entries evicted."""
        self.reconcile()
        with self._lock, self._transaction():
            self._flush_touches()
            evicted = self._evict_to(to_bytes, keep=None)
        self._unlink(evicted)
        return len(evicted)

    @_recovering
    def reconcile(self) -> None:
        """Make the index and the files agree; the total is recounted from the rows."""
        cutoff = time.time() - PENDING_MAX_AGE_S
        named = set(_entry_keys(self.directory))
        with self._lock, self._transaction():
            rows = self._db.execute("SELECT key, created FROM entries").fetchall()
            keys = {key for key, _ in rows}
            for key, created in rows:
                if key not in named and created < cutoff:
                    self._drop(key)
            self._db.execute("DELETE FROM refs WHERE key NOT IN (SELECT key FROM entries)")
            self._db.execute("DELETE FROM read_orders WHERE layer NOT IN "
                             "(SELECT layer FROM refs)")
            self._db.execute("UPDATE totals SET bytes = (SELECT COALESCE(SUM(size), 0) "
                             "FROM entries) WHERE id = 1")
        for key in named - keys:
            path = self.path(key)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
        self._sweep_tmp(PENDING_MAX_AGE_S)

    @_recovering
    def clear(self) -> None:
        """Delete every entry and layer: the files first (on a full file system, sqlite can
        write the index only once they are gone), then the rows."""
        self.drop_files()
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM entries")
            self._db.execute("DELETE FROM refs")
            self._db.execute("DELETE FROM layers")
            self._db.execute("DELETE FROM read_orders")
            self._db.execute("UPDATE totals SET bytes = 0 WHERE id = 1")
            self._touched.clear()
            self._refs.clear()

    def drop_files(self) -> None:
        """Delete every entry's file, without the index (a row left without its file misses,
        and goes with `clear` or `reconcile`)."""
        shutil.rmtree(self.directory / "data", ignore_errors=True)
        (self.directory / "data").mkdir(mode=0o700, exist_ok=True)

    # -- internals (the caller holds the lock and a transaction) ---------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.wait_index()
        if _file_id(self._index_path) != self._index_id:
            self._reopen_index()  # another process started it afresh (`open_index`)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            # Also after a COMMIT that failed (a full disk): sqlite keeps that transaction
            # open, and every later BEGIN would fail. One that sqlite rolled back itself has
            # nothing to roll back: that error must not hide the first.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _reserve(self, key: str, size: int, room: int) -> list[tuple[str, int]]:
        """Count `key` at `size` bytes, and evict until the entries fit in `room`."""
        now = time.time()
        row = self._db.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                             (key, key.partition("-")[0], size, now, now))
            delta = size
        else:
            self._db.execute("UPDATE entries SET size = ?, last_used = ?, created = ? "
                             "WHERE key = ?", (size, now, now, key))
            delta = size - int(row[0])
        self._db.execute("UPDATE totals SET bytes = bytes + ? WHERE id = 1", (delta,))
        return self._evict_to(room, keep=key)

    def _evict_to(self, limit: int, keep: str | None) -> list[tuple[str, int]]:
        """Delete LRU rows (never `keep`) until the total is at most `limit`."""
        evicted: list[tuple[str, int]] = []
        (total,) = self._db.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()
        while total > limit:
            victims = self._db.execute(
                "SELECT key, size FROM entries WHERE key IS NOT ? ORDER BY last_used LIMIT 64",
                (keep,)).fetchall()
            if not victims:
                break
            for victim, size in victims:
                if total <= limit:
                    break
                self._db.execute("DELETE FROM entries WHERE key = ?", (victim,))
                self._db.execute("DELETE FROM refs WHERE key = ?", (victim,))
                total -= size
                evicted.append((victim, size))
        if evicted:
            self._db.execute("UPDATE totals SET bytes = ?, evictions = evictions + ? "
                             "WHERE id = 1", (total, len(evicted)))
            self.evictions += len(evicted)
        return evicted

    def _drop(self, key: str) -> None:
        row = self._db.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM entries WHERE key = ?", (key,))
            self._db.execute("UPDATE totals SET bytes = bytes - ? WHERE id = 1", (row[0],))
        self._db.execute("DELETE FROM refs WHERE key = ?", (key,))

    def _add_ref(self, ref: tuple[str, int], key: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?)", (*ref, key))

    def _flush_touches(self) -> None:
        if self._touched:
            self._db.executemany(
                "UPDATE entries SET last_used = MAX(last_used, ?) WHERE key = ?",
                [(when, key) for key, when in self._touched.items()])
        for ref, key in self._refs.items():
            self._db.execute("INSERT OR REPLACE INTO refs SELECT ?, ?, key FROM entries "
                             "WHERE key = ?", (*ref, key))
        self._touched.clear()
        self._refs.clear()
        self._last_flush = time.monotonic()

    def _write(self, final: Path, data: bytes) -> None:
        """Write `data` to a temporary file and rename it to `final` (not synced: see the
        module docstring), making its directories when the rename finds them missing."""
        temporary = self.directory / "tmp" / f"{final.name[:32]}.{os.urandom(16).hex()}"
        try:
            with open(temporary, "xb", opener=private_opener) as stream:
                stream.write(data)
            try:
                os.rename(temporary, final)
            except FileNotFoundError:  # a first entry of its directory (or they were removed)
                for directory in (final.parents[2], final.parents[1], final.parent):
                    directory.mkdir(mode=0o700, exist_ok=True)  # data/KIND/HH
                os.rename(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def _unlink(self, evicted: list[tuple[str, int]]) -> None:
        for key, _ in evicted:
            with contextlib.suppress(OSError):
                self.path(key).unlink(missing_ok=True)

    def _sweep_tmp(self, max_age_s: float) -> None:
        cutoff = time.time() - max_age_s
        with contextlib.suppress(OSError):
            for path in (self.directory / "tmp").iterdir():
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()


def _disk_usage(path: Path) -> int:
    """The bytes the file at `path` takes on disk (0 when there is none)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _directories_bytes(directory: Path) -> int:
    """The bytes the directories of the cache in `directory` take: its own, tmp/, data/,
    data/KIND/ and data/KIND/HH/ (the entry files lie in the last)."""
    data = directory / "data"
    total = 0
    for path in (directory, directory / "tmp", data, *data.glob("*"), *data.glob("*/*")):
        with contextlib.suppress(OSError):  # gone meanwhile
            status = os.lstat(path)
            if stat.S_ISDIR(status.st_mode):
                total += status.st_blocks * 512
    return total


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _unusable(directory: Path, exc: BaseException) -> DiskCacheError:
    """The DiskCacheError of a cache whose index cannot be opened (`exc` says why)."""
    if isinstance(exc, DiskCacheError):
        return exc
    return DiskCacheError(f"cannot use the cache directory {directory}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
