"""The disk cache's store: entries by key, capped in bytes with LRU eviction, shared safely by
processes writing at once, and nothing half-written ever under an entry's name."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lazyfs.cache.disk_index import (
    INDEX_FILES,
    DiskCacheError,
    decode_read_order,
    read_layer_entries,
)
from lazyfs.cache.disk_store import (
    DISK_BLOCK,
    MIN_OVERHEAD_BYTES,
    WAL_ROOM_BYTES,
    DiskStore,
    disk_bytes,
)

REPO = Path(__file__).resolve().parents[2]
# A cap with room to spare; and caps of a few blocks for entries: what the cap counts for the
# index and the directories of a small cache is MIN_OVERHEAD_BYTES.
ROOMY = 64 << 20
INDEX = MIN_OVERHEAD_BYTES


def key(name: str | int) -> str:
    return "frame-" + hashlib.sha512(str(name).encode()).hexdigest()


def files_bytes(directory: Path) -> int:
    return sum(disk_bytes(path.stat().st_size) for path in (directory / "data").rglob("*")
               if path.is_file())


def test_put_get_and_delete(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    assert store.get(key(1)) is None
    store.put(key(1), b"one" * 1000)
    assert store.get(key(1)) == b"one" * 1000
    assert store.totals().size_bytes == disk_bytes(3000) == DISK_BLOCK
    store.delete(key(1))
    assert store.get(key(1)) is None and store.totals().size_bytes == 0
    assert list((tmp_path / "tmp").iterdir()) == []
    store.close()


def test_entries_are_written_again_after_their_directories_were_removed(
        tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    store.put(key(1), b"one")
    shutil.rmtree(tmp_path / "data")  # by hand, or `lazyfs cache` of another process
    store.delete(key(1))
    assert store.put_many([[(key(2), b"two", None)]]) == ([], [])
    store.put(key(3), b"three")
    assert store.get(key(2)) == b"two" and store.get(key(3)) == b"three"
    assert list((tmp_path / "tmp").iterdir()) == []
    store.close()


def test_keys_are_checked_before_they_become_paths(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    for bad in ("../../etc/passwd", "frame-../../x", "Frame-" + "a" * 64, "frame-abc"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")
    store.close()


def test_least_recently_used_goes_first_and_the_cap_holds(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, INDEX + 4 * DISK_BLOCK)
    for name in range(4):
        store.put(key(name), bytes([name]) * 100)
    assert store.get(key(0)) is not None  # used: now the most recent
    evicted = store.put(key(4), b"four")
    assert evicted == [key(1)]
    assert store.get(key(1)) is None and store.get(key(0)) is not None
    assert store.totals().size_bytes == 4 * DISK_BLOCK == files_bytes(tmp_path)
    assert store.evictions == 1 and store.totals().evictions == 1
    assert store.put(key("big"), b"x" * (5 * DISK_BLOCK)) == []  # larger than the cap
    assert store.get(key("big")) is None
    store.close()


def test_uses_reach_the_index_of_another_process(tmp_path: Path) -> None:
    first, second = (DiskStore(tmp_path, INDEX + 3 * DISK_BLOCK),
                     DiskStore(tmp_path, INDEX + 3 * DISK_BLOCK))
    for name in range(3):
        first.put(key(name), b"x")
    second.get(key(0))
    second.close()  # writes its uses
    first.put(key(3), b"y")
    assert first.get(key(0)) is not None and first.get(key(1)) is None
    first.close()


def _writer(directory: str, cap: int, prefix: str, count: int) -> None:
    store = DiskStore(directory, cap)
    for number in range(count):
        store.put(key(f"{prefix}{number}"), os.urandom(3 * DISK_BLOCK + number % 5))
        store.get(key(f"{prefix}{number // 2}"))
    store.close()


@pytest.mark.slow
def test_cap_holds_with_processes_writing_at_once(tmp_path: Path) -> None:
    cap = INDEX + 40 * DISK_BLOCK
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(tmp_path), cap, prefix, 150))
               for prefix in "abc"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    store = DiskStore(tmp_path, cap)
    totals = store.totals()
    assert 0 < totals.size_bytes <= cap
    assert files_bytes(tmp_path) == totals.size_bytes  # every file counted, nothing stray
    rows = sqlite3.connect(tmp_path / "index.sqlite").execute(
        "SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
    assert rows == totals.size_bytes
    store.close()


def test_a_killed_writer_leaves_no_named_partial_file(tmp_path: Path) -> None:
    """A writer killed with SIGKILL while writing large entries: every named file is whole
    (its name is the SHA-512 of its bytes), and the next open sweeps old temporary files."""
    script = (
        "import hashlib, os, sys\n"
        "from lazyfs.cache.disk_store import DiskStore\n"
        "store = DiskStore(sys.argv[1], 1 << 30)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    data = os.urandom(8 << 20)\n"
        "    store.put('frame-' + hashlib.sha512(data).hexdigest(), data)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 30
        while len(list((tmp_path / "data").rglob("*"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    named = [path for path in (tmp_path / "data").rglob("*") if path.is_file()]
    assert named
    for path in named:
        assert hashlib.sha512(path.read_bytes()).hexdigest() == path.name
    for leftover in (tmp_path / "tmp").iterdir():
        os.utime(leftover, (0, 0))  # as if from long ago
    store = DiskStore(tmp_path, 1 << 30)
    assert list((tmp_path / "tmp").iterdir()) == []
    for path in named:
        assert store.get(f"frame-{path.name}") == path.read_bytes()
    store.close()


def test_prune_evicts_to_a_size_and_reconciles(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    for name in range(6):
        store.put(key(name), b"x" * 100)
    store.path(key(0)).unlink()  # a file lost: its row goes once old enough
    sqlite3.connect(tmp_path / "index.sqlite").execute(
        "UPDATE entries SET created = 0 WHERE key = ?", (key(0),)).connection.commit()
    stray = store.path(key("stray"))
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"no row")
    os.utime(stray, (0, 0))
    assert store.prune(2 * DISK_BLOCK) == 3
    assert store.totals().size_bytes == 2 * DISK_BLOCK == files_bytes(tmp_path)
    assert not stray.exists()
    assert [store.get(key(name)) is not None for name in range(6)] == [False] * 4 + [True] * 2
    store.close()


def test_layers_list_their_chunks_and_bytes(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    store.register_layer("meta-" + "a" * 64, "http://h/a.blob", 10)
    store.register_layer("meta-" + "b" * 64, "http://h/b.blob", 4)
    store.put(key(1), b"x" * 5000, ("meta-" + "a" * 64, 0))
    store.put(key(2), b"y", ("meta-" + "a" * 64, 3))
    store.get(key(1), ("meta-" + "b" * 64, 1))  # a frame the two layers share
    rows = {row.label: row for row in store.layers()}
    assert (rows["http://h/a.blob"].cached_chunks, rows["http://h/a.blob"].cached_bytes) == (
        2, 3 * DISK_BLOCK)
    assert (rows["http://h/b.blob"].cached_chunks, rows["http://h/b.blob"].chunk_count) == (1, 4)
    store.clear()
    assert store.layers() == [] and store.totals().size_bytes == 0 and store.get(key(1)) is None
    store.close()


LAYER = "meta-" + "c" * 64


def test_a_layer_s_chunks_come_in_its_last_mount_s_read_order(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    for chunk in range(6):
        store.put(key(chunk), b"x", (LAYER, chunk))
    store.get(key(0), (LAYER, 0))  # chunk 0 used last
    store.put(key(9), b"z")  # no chunk of the layer
    # No mount left its order yet: every chunk held, least recently used first.
    assert store.layer_chunks(LAYER) == [1, 2, 3, 4, 5, 0]
    # Then only the chunks the last mount read that are held, in its order (7 is not held).
    store.remember_reads(LAYER, [4, 7, 0, 2])
    assert store.layer_chunks(LAYER) == [4, 0, 2]
    assert read_layer_entries(tmp_path, LAYER) == [(4, key(4)), (0, key(0)), (2, key(2))]
    store.remember_reads(LAYER, [5])  # the next mount's order replaces it
    assert store.layer_chunks(LAYER) == [5]
    store.delete(key(5))  # what is gone is left out
    assert store.layer_chunks(LAYER) == []
    store.clear()
    store.put(key(1), b"x", (LAYER, 1))
    assert store.layer_chunks(LAYER) == [1]
    store.close()


def test_a_damaged_read_order_is_ignored(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    for chunk in range(3):
        store.put(key(chunk), b"x", (LAYER, chunk))
    store.close()
    sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None).execute(
        "INSERT INTO read_orders VALUES (?, '2,x', 0)", (LAYER,))
    store = DiskStore(tmp_path, ROOMY)
    assert store.layer_chunks(LAYER) == [0, 1, 2]
    store.close()
    assert decode_read_order("") == [] and decode_read_order("3,-1") is None


def test_an_index_without_read_orders_is_read_as_before(tmp_path: Path) -> None:
    """An index an older lazyfs wrote, looked at read-only by a warm start."""
    store = DiskStore(tmp_path, ROOMY)
    store.put(key(0), b"x", (LAYER, 0))
    store.close()
    sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None).execute(
        "DROP TABLE read_orders")
    assert read_layer_entries(tmp_path, LAYER) == [(0, key(0))]


def test_an_index_from_a_newer_lazyfs_is_refused(tmp_path: Path) -> None:
    DiskStore(tmp_path, 1).close()
    sqlite3.connect(tmp_path / "index.sqlite").execute("PRAGMA user_version = 99")
    with pytest.raises(DiskCacheError, match="newer"):
        DiskStore(tmp_path, 1)


def _garbage_over_pages(index: Path) -> None:
    with open(index, "r+b") as stream:  # the header stays: sqlite opens it
        stream.seek(5 * 4096)
        stream.write(random.Random(5).randbytes(4 * 4096))


def _truncated(index: Path) -> None:
    os.truncate(index, index.stat().st_size // 3)


def _other_tables(index: Path) -> None:
    db = sqlite3.connect(index, isolation_level=None)
    db.executescript("DROP TABLE entries; CREATE TABLE entries (key TEXT PRIMARY KEY, b BLOB);")
    db.close()


def _a_table_gone(index: Path) -> None:
    sqlite3.connect(index, isolation_level=None).execute("DROP TABLE refs")


def _not_a_database(index: Path) -> None:
    index.write_bytes(b"not a database, " * 512)


@pytest.mark.parametrize("damage", [_garbage_over_pages, _truncated, _other_tables,
                                    _a_table_gone, _not_a_database])
def test_a_damaged_index_is_started_afresh_with_the_entries_on_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None]
) -> None:
    """Found when the index is opened, said once; the entries whose files are on disk are
    kept and counted (what the files cannot tell, the layers, comes back with mounts)."""
    store = DiskStore(tmp_path, 64 << 20)
    for name in range(300):  # an index of some pages
        store.put(key(name), bytes([name % 256]) * (100 + name), (LAYER, name))
    store.register_layer(LAYER, "layer", 300)
    store.close()
    for name in INDEX_FILES[1:]:
        assert not (tmp_path / name).exists()  # the last to close checkpointed the WAL
    damage(tmp_path / "index.sqlite")

    store = DiskStore(tmp_path, 64 << 20)
    (line,) = [record.getMessage() for record in caplog.records]
    assert f"disk cache {tmp_path}: the index was damaged (" in line
    assert line.endswith("started it afresh with the 300 entries on disk")
    assert store.get(key(7)) == bytes([7]) * 107
    assert store.totals().size_bytes == files_bytes(tmp_path) == 300 * DISK_BLOCK
    assert store.layers() == []
    store.put(key("new"), b"y", (LAYER, 0))
    assert store.layer_chunks(LAYER) == [0]
    store.close()
    assert DiskStore(tmp_path, 64 << 20).totals().size_bytes == 301 * DISK_BLOCK
    assert len(caplog.records) == 1  # checked again, and sound


def test_an_index_started_afresh_by_another_process_is_followed(tmp_path: Path) -> None:
    """A store whose index another process replaced (after finding it damaged) writes to
    the new one, not on into the file that is gone."""
    first = DiskStore(tmp_path, ROOMY)
    first.put(key(1), b"one")
    for name in INDEX_FILES:
        (tmp_path / name).unlink(missing_ok=True)
    second = DiskStore(tmp_path, ROOMY)  # a fresh index, as `open_index` makes it
    first.put(key(2), b"two")
    assert second.totals().size_bytes == DISK_BLOCK  # key(1)'s row went with the old file
    rows = sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT key FROM entries")
    assert [row[0] for row in rows] == [key(2)]
    first.close()
    second.close()


def test_a_table_lost_while_in_use_is_found_and_the_call_goes_on(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ROOMY)
    store.put(key(1), b"one", (LAYER, 1))
    _a_table_gone(tmp_path / "index.sqlite")
    store.put(key(2), b"two", (LAYER, 2))  # "no such table: refs": rebuilt, then done
    assert store.totals().size_bytes == 2 * DISK_BLOCK
    assert store.layer_chunks(LAYER) == [2]
    store.close()


def test_an_unusable_directory_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DiskCacheError, match="cannot use the cache directory"):
        DiskStore(tmp_path / "file" / "cache", 1)


def test_an_index_opened_in_the_background_serves_reads_at_once(tmp_path: Path) -> None:
    """Entries are read while the index opens in a thread of its own; what needs the index
    (a put, the cap) waits for it, and the default cap comes from the bytes it counts."""
    store = DiskStore(tmp_path, ROOMY)
    store.put(key(1), b"x" * 5000)
    store.close()
    held: list[int] = []
    store = DiskStore(tmp_path, 0, default_cap=lambda size: held.append(size) or ROOMY,
                      open_index=False)
    assert store.get(key(1)) == b"x" * 5000  # no index yet
    store.open_index_in_background()
    store.put(key(2), b"y")
    assert held == [2 * DISK_BLOCK] and store.capacity_bytes == ROOMY
    assert store.totals().size_bytes == 3 * DISK_BLOCK
    store.close()


def test_an_index_that_cannot_be_opened_in_the_background_is_one_error(tmp_path: Path) -> None:
    DiskStore(tmp_path, 1).close()
    sqlite3.connect(tmp_path / "index.sqlite").execute("PRAGMA user_version = 99")
    store = DiskStore(tmp_path, 1, open_index=False)
    store.open_index_in_background()
    with pytest.raises(DiskCacheError, match="newer"):
        store.wait_index()
    with pytest.raises(DiskCacheError, match="newer"):
        store.totals()
    store.close()  # nothing to close


def du(directory: Path) -> int:
    """What `du` counts of `directory`: the blocks of every file and directory in it."""
    return sum(os.lstat(path).st_blocks * 512 for path in [directory, *directory.rglob("*")])


def test_the_cap_holds_for_everything_on_disk_the_index_included(tmp_path: Path) -> None:
    """Entries of all sizes written, used (the uses written in batches) and remembered in
    read orders, well past an 8 MiB cap: `du` of the whole directory (the entries, the index,
    its WAL and shared memory, the lock, the directories) stays within the cap after every
    write, and the WAL stays small."""
    cap = 8 << 20
    store = DiskStore(tmp_path, cap)
    rng = random.Random(1)
    largest = largest_wal = 0
    for name in range(600):
        store.put(key(name), rng.randbytes(rng.randrange(1, 64 << 10)), (LAYER, name))
        store.get(key(rng.randrange(name + 1)), (LAYER, name))
        if name % 50 == 49:
            store.remember_reads(LAYER, list(range(name)))
        largest = max(largest, du(tmp_path))
        largest_wal = max(largest_wal, (tmp_path / "index.sqlite-wal").stat().st_size)
    assert store.evictions > 100
    assert cap - (1 << 20) < largest <= cap  # full, not over
    assert largest_wal <= WAL_ROOM_BYTES
    store.close()
    assert du(tmp_path) <= cap


def test_put_many_stores_a_batch_in_order_and_cuts_a_group_at_what_does_not_fit(
        tmp_path: Path) -> None:
    store = DiskStore(tmp_path, INDEX + 4 * DISK_BLOCK)
    evicted, errors = store.put_many([
        [(key("tree"), b"t" * 100, None), (key("frame"), b"f" * 100, ("layer", 0))],
        [(key("big"), b"b" * (5 * DISK_BLOCK), None), (key("after-big"), b"a", None)],
        [(key("last"), b"l" * 100, ("layer", 1))],
    ])
    assert evicted == [] and errors == []
    assert store.get(key("tree")) == b"t" * 100 and store.get(key("frame")) == b"f" * 100
    assert store.get(key("last")) == b"l" * 100
    # Larger than the cap: not stored, and neither is what counts on it.
    assert store.get(key("big")) is None and store.get(key("after-big")) is None
    assert store.totals().size_bytes == 3 * DISK_BLOCK == files_bytes(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []
    # Present already: a use is noted, nothing written; a full cache evicts the oldest.
    evicted, errors = store.put_many([[(key("tree"), b"t" * 100, None)],
                                      [(key("new-1"), b"n", None), (key("new-2"), b"n", None)]])
    assert errors == [] and len(evicted) == 1
    assert store.totals().size_bytes == 4 * DISK_BLOCK == files_bytes(tmp_path)
    store.close()
