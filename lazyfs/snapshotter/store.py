"""The snapshotter's metadata: snapshots (key, parent, kind, labels, times, usage) and the
remote layers that committed snapshots mount, in one sqlite database.

Every public method is one transaction (BEGIN IMMEDIATE … COMMIT, rolled back on any
error), so a crash leaves the database as before or after a call, never half-way. The
directories of snapshots are created inside the transaction that inserts their row and
removed after the one that deletes it; a crash between the two leaves an orphan directory,
which `orphan_ids` finds for Cleanup. Methods are thread-safe (one connection, one lock):
gRPC handlers call them from a thread pool.

States (the kinds of containerd): ACTIVE (writable, may be committed), VIEW (read-only),
COMMITTED (immutable, may be a parent). Only a committed snapshot has children; a snapshot
with children cannot be removed. A remote snapshot is committed from the start: its
contents are a lazily mounted layer (`layer_id`), never a directory of its own, and it
carries the diff ID its image's config claims for that layer (`diff_id`); the layer carries
what its content was measured to hash to once it has been (`content_digest`). A remote
snapshot whose claim turned out false is renamed out of containerd's way (`quarantine`).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lazyfs.cache.trust import prepare_database
from lazyfs.errors import LazyfsError

SCHEMA_VERSION = 2
QUARANTINE_PREFIX = "lazyfs.quarantined/"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    content_digest TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    labels TEXT NOT NULL,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    layer_id INTEGER REFERENCES layers(id),
    diff_id TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_layer ON snapshots(layer_id);
"""
# From schema 1: remote snapshots claimed no diff ID, layers were never measured.
_MIGRATE_FROM_1 = (
    "ALTER TABLE layers ADD COLUMN content_digest TEXT",
    "ALTER TABLE snapshots ADD COLUMN diff_id TEXT",
)


class Kind(enum.IntEnum):
    """containerd's snapshot kinds, with its numbers."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


class SnapshotError(LazyfsError):
    """A snapshot request that cannot be carried out; subclasses map to gRPC codes."""


class NotFoundError(SnapshotError):
    pass


class AlreadyExistsError(SnapshotError):
    pass


class FailedPreconditionError(SnapshotError):
    pass


class InvalidArgumentError(SnapshotError):
    pass


@dataclass(frozen=True)
class Snapshot:
    id: int
    key: str
    parent: str  # the parent's key, "" for none
    kind: Kind
    created_at: float
    updated_at: float
    labels: dict[str, str]
    size_bytes: int = 0
    inodes: int = 0
    layer_id: int | None = None
    # A remote snapshot's diff ID, as its image's config says (None: not known).
    diff_id: str | None = None


@dataclass(frozen=True)
class Layer:
    """A remote layer: its digest, what re-opening it needs (`source`, JSON-able) and the
    sha256 of its raw EROFS image once measured (`content_digest`)."""

    id: int
    digest: str
    source: dict[str, Any]
    content_digest: str | None = None


class Store:
    """The database at `path` (created if missing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        prepare_database(path)  # private, with its -wal and -shm: it names images and URLs
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                for statement in _MIGRATE_FROM_1:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if version == 0:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise SnapshotError(
                    f"{path}: database schema {version}, this lazyfs knows {SCHEMA_VERSION}"
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str) -> Snapshot:
        """The snapshot `key`. Raises NotFoundError."""
        with self._transaction() as db:
            return self._get(db, key)

    def all(self) -> list[Snapshot]:
        with self._transaction() as db:
            rows = db.execute(_SELECT + " ORDER BY s.id").fetchall()
        return [_snapshot(row) for row in rows]

    def chain(self, key: str) -> list[Snapshot]:
        """The snapshot `key` and its ancestors, itself first. Raises NotFoundError."""
        with self._transaction() as db:
            found = [self._get(db, key)]
            while found[-1].parent:
                found.append(self._get(db, found[-1].parent))
        return found

    def layer(self, layer_id: int) -> Layer:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM layers WHERE id = ?", (layer_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"remote layer {layer_id} not found")
        return _layer(row)

    def layers(self) -> list[Layer]:
        """Every remote layer that a snapshot still uses."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM layers WHERE id IN (SELECT layer_id FROM snapshots) ORDER BY id"
            ).fetchall()
        return [_layer(row) for row in rows]

    def claims(self, digest: str) -> list[Snapshot]:
        """The remote snapshots whose contents are the layer `digest`."""
        with self._transaction() as db:
            rows = db.execute(_SELECT + " JOIN layers l ON l.id = s.layer_id"
                              " WHERE l.digest = ? ORDER BY s.id", (digest,)).fetchall()
        return [_snapshot(row) for row in rows]

    def snapshot_ids(self) -> set[int]:
        with self._transaction() as db:
            return {row[0] for row in db.execute("SELECT id FROM snapshots")}

    # -- changing ----------------------------------------------------------------------------

    def create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        on_created: Callable[[Snapshot], None] | None = None,
    ) -> Snapshot:
        """Insert an active or view snapshot of `parent` (a committed snapshot, or "").
        `on_created(snapshot)` runs inside the transaction (to make its directory): if it
        raises, nothing is inserted. Raises AlreadyExistsError, NotFoundError,
        FailedPreconditionError, InvalidArgumentError."""
        if not key:
            raise InvalidArgumentError("a snapshot key must not be empty")
        if kind == Kind.COMMITTED:
            raise InvalidArgumentError("create makes active or view snapshots only")
        with self._transaction() as db:
            parent_id = self._parent_id(db, key, parent)
            now = time.time()
            try:
                cursor = db.execute(
                    "INSERT INTO snapshots (key, parent_id, kind, created_at, updated_at, labels)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (key, parent_id, int(kind), now, now, json.dumps(dict(labels))),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"snapshot {key} already exists") from None
            snapshot = self._get_id(db, _rowid(cursor))
            if on_created is not None:
                on_created(snapshot)
            return snapshot

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], size_bytes: int, inodes: int
    ) -> Snapshot:
        """Turn the active snapshot `key` into the committed `name` (same id, so same
        directory). Raises NotFoundError, AlreadyExistsError, FailedPreconditionError."""
        if not name:
            raise InvalidArgumentError("a snapshot name must not be empty")
        with self._transaction() as db:
            snapshot = self._get(db, key)
            if snapshot.kind != Kind.ACTIVE:
                raise FailedPreconditionError(
                    f"snapshot {key} is {snapshot.kind.name.lower()}, not active: cannot commit"
                )
            try:
                db.execute(
                    "UPDATE snapshots SET key = ?, kind = ?, updated_at = ?, labels = ?,"
                    " size_bytes = ?, inodes = ? WHERE id = ?",
                    (name, int(Kind.COMMITTED), time.time(),
                     json.dumps({**snapshot.labels, **labels}), size_bytes, inodes, snapshot.id),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"snapshot {name} already exists") from None
            return self._get_id(db, snapshot.id)

    def add_remote(
        self, name: str, parent: str, labels: Mapping[str, str], digest: str,
        source: Mapping[str, Any], size_bytes: int, diff_id: str | None = None,
    ) -> Snapshot:
        """Insert the committed snapshot `name` whose contents are the remote layer `digest`
        (recorded with `source` unless known), claimed by its image to hash to `diff_id`.
        Raises AlreadyExistsError, NotFoundError, FailedPreconditionError."""
        with self._transaction() as db:
            parent_id = self._parent_id(db, name, parent)
            db.execute(
                "INSERT OR IGNORE INTO layers (digest, source) VALUES (?, ?)",
                (digest, json.dumps(dict(source), sort_keys=True)),
            )
            layer_id = db.execute("SELECT id FROM layers WHERE digest = ?", (digest,)).fetchone()
            now = time.time()
            try:
                cursor = db.execute(
                    "INSERT INTO snapshots (key, parent_id, kind, created_at, updated_at,"
                    " labels, size_bytes, layer_id, diff_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, parent_id, int(Kind.COMMITTED), now, now, json.dumps(dict(labels)),
                     size_bytes, layer_id[0], diff_id),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"snapshot {name} already exists") from None
            return self._get_id(db, _rowid(cursor))

    def remove(self, key: str) -> tuple[Snapshot, Layer | None]:
        """Delete `key`; returns it, and its remote layer if no other snapshot uses it (the
        layer's row is deleted then too). Raises NotFoundError, FailedPreconditionError."""
        with self._transaction() as db:
            snapshot = self._get(db, key)
            children = db.execute(
                "SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot.id,)
            ).fetchone()
            if children is not None:
                raise FailedPreconditionError(
                    f"cannot remove snapshot {key}: snapshot {children[0]} is based on it"
                )
            db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot.id,))
            freed = None
            if snapshot.layer_id is not None:
                users = db.execute(
                    "SELECT COUNT(*) FROM snapshots WHERE layer_id = ?", (snapshot.layer_id,)
                ).fetchone()[0]
                if users == 0:
                    row = db.execute(
                        "SELECT * FROM layers WHERE id = ?", (snapshot.layer_id,)
                    ).fetchone()
                    freed = _layer(row)
                    db.execute("DELETE FROM layers WHERE id = ?", (snapshot.layer_id,))
            return snapshot, freed

    def set_content_digest(self, digest: str, content_digest: str) -> None:
        """Record what the raw EROFS image of the layer `digest` hashes to (absent: no-op)."""
        with self._transaction() as db:
            db.execute("UPDATE layers SET content_digest = ? WHERE digest = ?",
                       (content_digest, digest))

    def quarantine(self, key: str, target_label: str) -> str:
        """Rename the committed remote snapshot `key`, whose layer is not what its image
        claimed, out of the way of the snapshot that should have that name, and drop its
        `target_label` (containerd finds a remote snapshot by that label); returns the new
        key. containerd's garbage collection removes it once no container uses it (no
        namespace refers to the new key). Raises NotFoundError."""
        with self._transaction() as db:
            snapshot = self._get(db, key)
            new_key = f"{QUARANTINE_PREFIX}{snapshot.id}/{key}"
            labels = {k: v for k, v in snapshot.labels.items() if k != target_label}
            db.execute("UPDATE snapshots SET key = ?, labels = ?, updated_at = ? WHERE id = ?",
                       (new_key, json.dumps(labels), time.time(), snapshot.id))
            return new_key

    def update_labels(
        self, key: str, labels: Mapping[str, str], paths: list[str]
    ) -> Snapshot:
        """Replace the labels of `key` (no `paths`, or the path "labels"), or set/delete only
        the `labels.NAME` paths given. Raises NotFoundError, InvalidArgumentError."""
        with self._transaction() as db:
            snapshot = self._get(db, key)
            if not paths or "labels" in paths:
                new = dict(labels)
            else:
                new = dict(snapshot.labels)
                for path in paths:
                    name = path.removeprefix("labels.")
                    if name == path or not name:
                        raise InvalidArgumentError(f"cannot update {path!r} of snapshot {key}")
                    if name in labels:
                        new[name] = labels[name]
                    else:
                        new.pop(name, None)
            db.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
                (json.dumps(new), time.time(), snapshot.id),
            )
            return self._get_id(db, snapshot.id)

    # -- helpers -----------------------------------------------------------------------------

    def _get(self, db: sqlite3.Connection, key: str) -> Snapshot:
        row = db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFoundError(f"snapshot {key} does not exist")
        return _snapshot(row)

    def _get_id(self, db: sqlite3.Connection, snapshot_id: int) -> Snapshot:
        return _snapshot(db.execute(_SELECT + " WHERE s.id = ?", (snapshot_id,)).fetchone())

    def _parent_id(self, db: sqlite3.Connection, key: str, parent: str) -> int | None:
        if not parent:
            return None
        try:
            found = self._get(db, parent)
        except NotFoundError:
            raise NotFoundError(f"parent snapshot {parent} of {key} does not exist") from None
        if found.kind != Kind.COMMITTED:
            raise FailedPreconditionError(
                f"parent snapshot {parent} of {key} is {found.kind.name.lower()}, not committed"
            )
        return found.id


_SELECT = (
    "SELECT s.*, COALESCE(p.key, '') AS parent_key FROM snapshots s"
    " LEFT JOIN snapshots p ON p.id = s.parent_id"
)


def _snapshot(row: sqlite3.Row) -> Snapshot:
    return Snapshot(
        id=row["id"],
        key=row["key"],
        parent=row["parent_key"],
        kind=Kind(row["kind"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        labels=json.loads(row["labels"]),
        size_bytes=row["size_bytes"],
        inodes=row["inodes"],
        layer_id=row["layer_id"],
        diff_id=row["diff_id"],
    )


def _layer(row: sqlite3.Row) -> Layer:
    return Layer(row["id"], row["digest"], json.loads(row["source"]), row["content_digest"])


def _rowid(cursor: sqlite3.Cursor) -> int:
    rowid = cursor.lastrowid
    assert rowid is not None
    return rowid


def database_path(root: str) -> str:
    return os.path.join(root, "metadata.db")
