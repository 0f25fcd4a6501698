"""The disk cache's index file (DIR/index.sqlite): its schema, opening it, and what a
process that only looks may read from it (`lazyfs.cache.disk_store` has the protocol).

An index is set up by whichever process opens it first (WAL mode, the tables, the schema
version); one sqlite cannot read (damaged) is started afresh with the entries it counted, as
a cache may; one written by a newer lazyfs is refused.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from pathlib import Path

from lazyfs.cache.trust import prepare_database
from lazyfs.errors import LazyfsError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
# Opening a new index while other processes do: tries, and the pause after the first.
SETUP_ATTEMPTS = 20
SETUP_RETRY_S = 0.02
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")

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


def open_index(directory: Path) -> sqlite3.Connection:
    """The index of the cache in `directory`, set up if new, started afresh if damaged (the
    entry files under `directory / "data"` go with it). Raises DiskCacheError for an index of
    a newer lazyfs, sqlite3.Error, OSError."""
    try:
        return _connect(directory)
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):
            raise  # locked, read-only, out of space: not the index's fault
        log.warning("disk cache %s: the index cannot be read (%s); starting afresh",
                    directory, exc)
    for name in INDEX_FILES:
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(directory / "data", ignore_errors=True)
    (directory / "data").mkdir(mode=0o700, exist_ok=True)
    return _connect(directory)


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
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DiskCacheError(f"{path}: index format {version} is newer than this "
                                 f"lazyfs ({SCHEMA_VERSION}); use another --cache-dir")
        # The write lock first: upgrading a read to a write could not wait for it.
        db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} "
                         f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    except BaseException:
        db.close()
        raise
    return db


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
