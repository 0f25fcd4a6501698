"""The content check of remote layers: what a layer's raw EROFS image hashes to, measured from
its frames (containerd's own blobs give the expected digest), and what follows for the
snapshots that claim a diff ID (pure store logic)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio

from lazyfs.format.chain_id import ChainIdError, chain_ids, check_diff_ids
from lazyfs.format.errors import IntegrityError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.snapshotter.content_check import Verdict, measure_layer, torn_down, verdict
from lazyfs.snapshotter.store import QUARANTINE_PREFIX, SCHEMA_VERSION, Store
from lazyfs.startup.open import LayerSource
from tests.layer.helpers import run_with_layer

TARGET = "containerd.io/snapshot.ref"


async def _measure(image: RemoteImage) -> str:
    async def go_ahead() -> None:
        pass

    return await measure_layer(image, trio.CapacityLimiter(2), go_ahead)


def test_measured_digest_is_containerd_s_diff_id(vectors_dir: Path) -> None:
    for blob in sorted(vectors_dir.glob("*.blob")):
        expected = json.loads(blob.with_suffix(".files.json").read_text())["raw_erofs_sha256"]
        found = run_with_layer(LayerSource(str(blob)), _measure)
        assert found == "sha256:" + expected, blob.name


def test_a_corrupt_frame_is_an_error_not_a_digest(vectors_dir: Path) -> None:
    """Every frame is checked against the chunk table as it is measured: a source that
    serves one wrong byte after the layer opened fails the measurement, naming the chunk."""

    async def corrupt_then_measure(image: RemoteImage) -> str:
        last = image.metadata.table.chunk_count - 1
        start, _ = image.metadata.frame_range(last)
        read = image.reader.read

        async def flipped(offset: int, size: int) -> bytes:
            data = bytearray(await read(offset, size))
            if offset <= start < offset + size:
                data[start - offset + 7] ^= 0x40
            return bytes(data)

        image.reader.read = flipped  # type: ignore[method-assign]
        return await _measure(image)

    blob = vectors_dir / "basic-verity-64k.blob"
    with pytest.raises(IntegrityError, match=r"chunk \d+ .*SHA-512 mismatch"):
        run_with_layer(LayerSource(str(blob)), corrupt_then_measure)


def test_chain_ids_and_their_checks() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    chain = chain_ids([a, b])
    assert chain[0] == a and chain[1].startswith("sha256:") and chain[1] != b
    assert chain_ids([a, b])[1] != chain_ids([b, a])[1]
    with pytest.raises(ChainIdError, match="diff ID 2 of 2 is not a sha256 digest"):
        check_diff_ids([a, "sha256:xyz"], "config")


def test_claims_verdicts_and_quarantine(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "metadata.db"))
    good, bad = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    store.add_remote("T1", "", {TARGET: "T1"}, "L1", {}, 10, good)
    store.add_remote("T2", "T1", {TARGET: "T2"}, "L2", {}, 10, good)
    store.add_remote("T3", "", {TARGET: "T3"}, "L2", {}, 10, bad)  # the same blob, claimed twice
    [layer1] = [layer for layer in store.layers() if layer.digest == "L1"]
    assert verdict(store.get("T1"), layer1) is Verdict.PENDING
    store.set_content_digest("L1", good)
    store.set_content_digest("L2", good)
    layers = {layer.digest: layer for layer in store.layers()}
    assert verdict(store.get("T1"), layers["L1"]) is Verdict.HOLDS
    assert verdict(store.get("T3"), layers["L2"]) is Verdict.LIES
    assert not torn_down(store, layers["L2"])  # T2 holds it rightly
    assert [s.key for s in store.claims("L2")] == ["T2", "T3"]

    moved = store.quarantine("T3", TARGET)
    assert moved.startswith(QUARANTINE_PREFIX) and moved.endswith("/T3")
    assert TARGET not in store.get(moved).labels  # containerd finds remote snapshots by it
    store.add_remote("T3", "", {TARGET: "T3"}, "L3", {}, 10, bad)  # the name is free again
    assert store.get("T3").layer_id != store.get(moved).layer_id
    store.remove("T2")
    assert torn_down(store, store.layer(store.get(moved).layer_id))


def test_a_schema_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE layers (id INTEGER PRIMARY KEY AUTOINCREMENT,
                digest TEXT NOT NULL UNIQUE, source TEXT NOT NULL);
            CREATE TABLE snapshots (id INTEGER PRIMARY KEY AUTOINCREMENT,
                key TEXT NOT NULL UNIQUE, parent_id INTEGER REFERENCES snapshots(id),
                kind INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
                labels TEXT NOT NULL, size_bytes INTEGER NOT NULL DEFAULT 0,
                inodes INTEGER NOT NULL DEFAULT 0, layer_id INTEGER REFERENCES layers(id));
            INSERT INTO layers (digest, source) VALUES ('L1', '{}');
            INSERT INTO snapshots (key, kind, created_at, updated_at, labels, layer_id)
                VALUES ('T1', 3, 0, 0, '{}', 1);
            PRAGMA user_version = 1;
        """)
    store = Store(str(path))
    old = store.get("T1")
    assert old.diff_id is None
    assert verdict(old, store.layer(1)) is Verdict.UNCLAIMED
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
