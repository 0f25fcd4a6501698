"""The disk cache's index file (DIR/index.sqlite): its schema, opening it, and what a
process that only looks may read from it (`lazyfs.cache.disk_store` has the protocol).

An index is set up by whichever process opens it first (WAL mode, the tables, the schema
version); one written by a newer lazyfs is refused. Every process that opens it checks it:
sqlite's quick_check of every page, and tables as this lazyfs makes them. One that fails
(garbage written over it, a truncated file, another program's tables) is damaged: it is
started afresh and refilled with the entries whose files are on disk (the store's
`refill_index`), said in one log line. Those files are kept rather than dropped: the index
never vouched for them (every entry is checked when read back, and a process that only looks
reads them without the index), and dropping them would cost every byte fetched again, and
the mounts that a source down needs the disk cache for. What they cannot tell (which layers
use which chunks, and the orders of reads) comes back as layers are mounted again. The check
and the reset happen under a lock (DIR/index.lock), so that processes opening a damaged
index at once reset it once; one that had it open reopens it (`DiskStore`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lazyfs.cache.trust import PRIVATE_FILE_MODE, prepare_database
from lazyfs.errors import LazyfsError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
# Opening a new index while other processes do: tries, and the pause after the first.
SETUP_ATTEMPTS = 20
SETUP_RETRY_S = 0.02
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")
# The WAL's bounds: a checkpoint runs when a commit leaves more than WAL_CHECKPOINT_PAGES
# pages in it, and cuts the file back to WAL_LIMIT_BYTES. sqlite's defaults (1000 pages, no
# limit) let it stay at 4 MB and more, beyond the cap.
WAL_CHECKPOINT_PAGES = 128
WAL_LIMIT_BYTES = 512 << 10
INDEX_LOCK = "index.lock"  # held while an index is opened, checked and reset
# Tables added to index format 1 after its first release: an index may lack them.
LATER_TABLES = ("read_orders",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL,
    last_used REAL NOT NULL, created REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL, evictions INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS layers (
    layer TEXT PRIMARY KEY, label TEXT NOT NULL, chunk_count INTEGER NOT NULL,
    last_used REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs (
    layer TEXT NOT NULL, chunk INTEGER NOT NULL, key TEXT NOT NULL,
    PRIMARY KEY (layer, chunk)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_key ON refs (key);
CREATE TABLE IF NOT EXISTS read_orders (
    layer TEXT PRIMARY KEY, chunks TEXT NOT NULL, written REAL NOT NULL) WITHOUT ROWID;
"""

# A layer's chunks in the store and their entries, least recently used first.
_LAYER_ENTRIES = ("SELECT r.chunk, r.key FROM refs r JOIN entries e ON e.key = r.key"
                  " WHERE r.layer = ? ORDER BY e.last_used, r.chunk")
_READ_ORDER = "SELECT chunks FROM read_orders WHERE layer = ?"


class DiskCacheError(LazyfsError):
    """The cache directory cannot be used (permissions, a newer index format)."""


class DamagedIndexError(sqlite3.DatabaseError):
    """The index file is not one this lazyfs can use: its pages or its tables."""


def is_damage(exc: BaseException) -> bool:
    """Whether `exc` says that the index file is damaged (not that it is busy, read-only, or
    on a full file system: those are no fault of the file)."""
    if isinstance(exc, DamagedIndexError):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    # Tables another program made, or that damage took away.
    return (isinstance(exc, sqlite3.OperationalError)
            and str(exc).startswith(("no such table", "no such column")))


def open_index(directory: Path, refill: Callable[[sqlite3.Connection], int],
               ) -> sqlite3.Connection:
    """The index of the cache in `directory`, set up if new, checked. A damaged one is
    started afresh and `refill(db)` counts into it the entries whose files are on disk
    (returning how many), said in one log line. Raises DiskCacheError for an index of a newer
    lazyfs, sqlite3.Error, OSError."""
    with _setup_lock(directory):
        try:
            return _connect(directory)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise  # locked, read-only, out of space: not the index's fault
            damage = str(exc)
        for name in INDEX_FILES:
            (directory / name).unlink(missing_ok=True)
        db = _connect(directory)
        try:
            entries = refill(db)
        except BaseException:
            db.close()
            raise
    log.warning("disk cache %s: the index was damaged (%s); started it afresh with the %d "
                "entries on disk", directory, damage, entries)
    return db


@contextlib.contextmanager
def _setup_lock(directory: Path) -> Iterator[None]:
    """Hold DIR/index.lock (an exclusive flock) for as long as the block runs."""
    fd = os.open(directory / INDEX_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _connect(directory: Path) -> sqlite3.Connection:
    """Open the index, set up by whichever process comes first. Processes opening a new index
    at once can be told it is locked without sqlite's busy wait (switching it to WAL takes an
    exclusive lock): that is tried again, a bounded number of times."""
    for attempt in range(SETUP_ATTEMPTS):
        try:
            return _connect_once(directory / "index.sqlite")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == SETUP_ATTEMPTS - 1:
                raise
            time.sleep(SETUP_RETRY_S * (attempt + 1))
    raise AssertionError("unreachable")


def _connect_once(path: Path) -> sqlite3.Connection:
    prepare_database(path)  # private, and so are the -wal and -shm files sqlite creates
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DiskCacheError(f"{path}: index format {version} is newer than this "
                                 f"lazyfs ({SCHEMA_VERSION}); use another --cache-dir")
        if version == SCHEMA_VERSION:  # set up before: its tables must be there
            present = {str(name) for (name,) in
                       db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = sorted(set(_tables()) - present - set(LATER_TABLES))
            if missing:
                raise DamagedIndexError(f"its table {missing[0]} is missing")
        # Every page (about 25 ms for the index of 40,000 entries, off a start's path).
        problems = db.execute("PRAGMA quick_check").fetchall()
        if problems != [("ok",)]:  # the first problem, on one line
            first = str(problems[0][0]).replace("*** in database main ***", "")
            raise DamagedIndexError(f"quick_check: {' '.join(first.split())}")
        # The write lock first: upgrading a read to a write could not wait for it.
        db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} "
                         f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        for table, columns in _tables().items():
            if _columns(db, table) != columns:
                raise DamagedIndexError(f"its table {table} is not this lazyfs's")
    except BaseException:
        db.close()
        raise
    return db


@functools.cache
def _tables() -> dict[str, list[tuple[str, str, int, int]]]:
    """The tables `_SCHEMA` makes, with their columns (`_columns`)."""
    reference = sqlite3.connect(":memory:")
    try:
        reference.executescript(_SCHEMA)
        names = [str(name) for (name,) in
                 reference.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: _columns(reference, name) for name in names}
    finally:
        reference.close()


def _columns(db: sqlite3.Connection, table: str) -> list[tuple[str, str, int, int]]:
    """(name, type, not null, primary key position) of each column of `table`."""
    return [(str(name), str(kind), int(notnull), int(pk))
            for _, name, kind, notnull, _, pk in db.execute(f"PRAGMA table_info({table})")]


# -- reading -------------------------------------------------------------------------------------


def read_layer_entries(directory: Path, layer: str) -> list[tuple[int, str]]:
    """`layer_entries` of the cache in `directory`, read without writing anything ([] without
    an index). Raises sqlite3.Error."""
    path = directory / "index.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                         timeout=BUSY_TIMEOUT_S)
    try:
        return layer_entries(db, layer)
    finally:
        db.close()


def layer_entries(db: sqlite3.Connection, layer: str) -> list[tuple[int, str]]:
    """(chunk, entry key) of the chunks of `layer` the store holds that its last mount read,
    in the order it first read them; all it holds, least recently used first, when no mount
    left its order (or an index from before orders were kept)."""
    held = {int(chunk): str(key) for chunk, key in db.execute(_LAYER_ENTRIES, (layer,))}
    try:
        row = db.execute(_READ_ORDER, (layer,)).fetchone()
    except sqlite3.OperationalError:  # an index this lazyfs has not opened for writing yet
        row = None
    order = None if row is None else decode_read_order(str(row[0]))
    if order is None:
        return list(held.items())
    return [(chunk, held[chunk]) for chunk in order if chunk in held]


def encode_read_order(chunks: list[int]) -> str:
    return ",".join(str(chunk) for chunk in chunks)


def decode_read_order(text: str) -> list[int] | None:
    """The chunk indices of a stored read order; None when it is not one."""
    try:
        chunks = [int(item) for item in text.split(",")] if text else []
    except ValueError:
        return None
    return chunks if all(chunk >= 0 for chunk in chunks) else None
