"""The snapshotter's sqlite metadata: kinds, parents, labels, remote layers, transactions."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from lazyfs.snapshotter.store import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    Kind,
    NotFoundError,
    Snapshot,
    Store,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "metadata.db"))


def test_prepare_commit_and_children(store: Store) -> None:
    base = store.create("extract-1", "", Kind.ACTIVE, {"a": "1"})
    assert base.kind == Kind.ACTIVE and base.parent == ""
    committed = store.commit("layer-1", "extract-1", {"b": "2"}, size_bytes=10, inodes=3)
    assert committed.id == base.id  # the same directory holds it
    assert committed.kind == Kind.COMMITTED
    assert committed.labels == {"a": "1", "b": "2"}
    assert (committed.size_bytes, committed.inodes) == (10, 3)
    with pytest.raises(NotFoundError):
        store.get("extract-1")

    child = store.create("container", "layer-1", Kind.ACTIVE, {})
    view = store.create("view", "layer-1", Kind.VIEW, {})
    assert child.parent == view.parent == "layer-1"
    assert [s.key for s in store.chain("container")] == ["container", "layer-1"]
    assert {s.key for s in store.all()} == {"layer-1", "container", "view"}


def test_rules_of_kinds(store: Store) -> None:
    store.create("a", "", Kind.ACTIVE, {})
    with pytest.raises(AlreadyExistsError):
        store.create("a", "", Kind.VIEW, {})
    with pytest.raises(FailedPreconditionError, match="not committed"):
        store.create("b", "a", Kind.ACTIVE, {})  # an active snapshot is no parent
    with pytest.raises(NotFoundError, match="parent snapshot missing"):
        store.create("b", "missing", Kind.ACTIVE, {})
    store.create("v", "", Kind.VIEW, {})
    with pytest.raises(FailedPreconditionError, match="view, not active"):
        store.commit("c", "v", {}, 0, 0)
    store.commit("c", "a", {}, 0, 0)
    store.create("d", "", Kind.ACTIVE, {})
    with pytest.raises(AlreadyExistsError):
        store.commit("c", "d", {}, 0, 0)
    assert store.get("d").kind == Kind.ACTIVE  # the failed commit changed nothing
    with pytest.raises(InvalidArgumentError):
        store.create("", "", Kind.ACTIVE, {})


def test_remove_refuses_parents_and_frees_layers(store: Store) -> None:
    source = {"registry": "127.0.0.1:5000", "repository": "app"}
    first = store.add_remote("sha256:c1", "", {"x": "y"}, "sha256:l1", source, 100)
    assert first.kind == Kind.COMMITTED and first.layer_id is not None
    assert store.layer(first.layer_id).source == source
    second = store.add_remote("sha256:c2", "sha256:c1", {}, "sha256:l2", source, 100)
    # The same layer under another chain shares the layer row.
    again = store.add_remote("sha256:c3", "", {}, "sha256:l1", {"other": 1}, 100)
    assert again.layer_id == first.layer_id
    assert store.layer(first.layer_id).source == source  # the first record stays
    with pytest.raises(AlreadyExistsError):
        store.add_remote("sha256:c1", "", {}, "sha256:l1", source, 100)

    with pytest.raises(FailedPreconditionError, match="sha256:c2 is based on it"):
        store.remove("sha256:c1")
    removed, freed = store.remove("sha256:c2")
    assert removed.id == second.id and freed is not None and freed.digest == "sha256:l2"
    removed, freed = store.remove("sha256:c1")
    assert freed is None  # sha256:c3 still uses sha256:l1
    assert [layer.digest for layer in store.layers()] == ["sha256:l1"]
    _, freed = store.remove("sha256:c3")
    assert freed is not None and store.layers() == []
    with pytest.raises(NotFoundError):
        store.remove("sha256:c3")


def test_update_labels_whole_or_by_path(store: Store) -> None:
    store.create("a", "", Kind.ACTIVE, {"keep": "1", "drop": "2"})
    updated = store.update_labels("a", {"new": "3", "keep": "9"}, ["labels.new", "labels.drop"])
    assert updated.labels == {"keep": "1", "new": "3"}
    assert store.update_labels("a", {"only": "x"}, []).labels == {"only": "x"}
    with pytest.raises(InvalidArgumentError):
        store.update_labels("a", {}, ["parent"])


def test_failed_callback_inserts_nothing_and_state_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "metadata.db")
    store = Store(path)

    def fail(snapshot: Snapshot) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.create("a", "", Kind.ACTIVE, {}, on_created=fail)
    with pytest.raises(NotFoundError):
        store.get("a")
    store.create("b", "", Kind.ACTIVE, {"l": "v"})
    store.close()
    reopened = Store(path)
    assert reopened.get("b").labels == {"l": "v"}
    assert reopened.snapshot_ids() == {reopened.get("b").id}


def test_a_killed_writer_leaves_a_consistent_database(tmp_path: Path) -> None:
    """A process killed inside a transaction: the database keeps what was committed."""
    path = str(tmp_path / "metadata.db")
    Store(path).create("kept", "", Kind.ACTIVE, {})
    pid = os.fork()
    if pid == 0:  # the child starts a transaction and dies in it
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM snapshots")
        os._exit(0)
    os.waitpid(pid, 0)
    assert [s.key for s in Store(path).all()] == ["kept"]


def test_concurrent_creates_from_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for n in range(20):
                store.create(f"t{index}-{n}", "", Kind.ACTIVE, {})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.all()) == 80
