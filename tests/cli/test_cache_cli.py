"""`lazyfs cache ls|stats|prune|clear` on a disk cache filled by reading layers."""

from __future__ import annotations

import contextlib
import hashlib
import random
import sqlite3
import subprocess
from pathlib import Path

import pytest

from lazyfs.cache.disk import DiskCacheOptions
from lazyfs.cache.disk_store import DiskStore
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.sizes import human_size
from lazyfs.startup.open import LayerSource
from tests.cli import assert_one_line_error, run_lazyfs
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support.mounts import cleanup

CHUNK = 64 * 1024


def store_bytes(cache: Path) -> int:
    return sum(-(-path.stat().st_size // 4096) * 4096
               for path in (cache / "data").rglob("*") if path.is_file())


async def read_some(image: RemoteImage) -> None:
    await image.read(0, 3 * CHUNK)


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A cache holding 3 chunks of a 10-chunk layer and all 3 chunks of another."""
    cache = tmp_path / "cache"
    for name, size in (("big", 10 * CHUNK), ("small", 3 * CHUNK - 5)):
        blob = write_blob(tmp_path, make_image_bytes(size, seed=len(name)), name,
                          chunk_size=CHUNK)[0]
        run_with_layer(LayerSource(str(blob)), read_some, tuning=ImageTuning(readahead_chunks=0),
                       disk=DiskCacheOptions(str(cache), 64 << 20))
    return cache


def test_ls_lists_each_layer_with_its_chunks_and_bytes(filled: Path) -> None:
    result = run_lazyfs("cache", "ls", "--cache-dir", filled)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["chunks", "bytes", "last", "used", "layer"]
    by_layer = {row.split()[-1].rpartition("/")[2]: row.split() for row in rows}
    assert by_layer["big.blob"][0] == "3/10" and by_layer["small.blob"][0] == "3/3"


def test_stats_prune_and_clear(filled: Path) -> None:
    stats = run_lazyfs("cache", "stats", "--cache-dir", filled)
    assert stats.returncode == 0, stats.stderr
    assert f"directory      {filled}" in stats.stdout
    assert "entries        8 (6 frame, 2 meta)" in stats.stdout

    pruned = run_lazyfs("cache", "prune", "--to", "100K", "--cache-dir", filled)
    assert pruned.returncode == 0, pruned.stderr
    evicted = int(pruned.stdout.split()[1])
    assert 0 < evicted < 8
    left = store_bytes(filled)
    assert 0 < left <= 100 << 10 and pruned.stdout.endswith(f"{human_size(left)} left\n")

    assert run_lazyfs("cache", "clear", "--cache-dir", filled).returncode == 0
    assert run_lazyfs("cache", "ls", "--cache-dir", filled).stdout == ""
    assert "used           0 bytes" in run_lazyfs("cache", "stats", "--cache-dir",
                                                  filled).stdout


def test_the_default_directory_comes_from_the_environment(filled: Path) -> None:
    result = run_lazyfs("cache", "stats", LAZYFS_CACHE_DIR=str(filled))
    assert result.returncode == 0 and f"directory      {filled}" in result.stdout


def test_no_cache_there_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_lazyfs("cache", "ls", "--cache-dir", tmp_path / "none"),
                          "no disk cache here")
    assert_one_line_error(run_lazyfs("cache", "prune", "--to", "lots", "--cache-dir", tmp_path),
                          "--to")


def test_a_damaged_index_is_said_once_and_every_command_answers(filled: Path) -> None:
    """Garbage over the index's pages (its header stays: sqlite opens it, and only a query
    of a damaged page used to fail, with a traceback): the first command starts the index
    afresh with the entries on disk and says so in one line; all of them answer."""
    index = filled / "index.sqlite"
    with open(index, "r+b") as stream:
        stream.seek(4096)
        stream.write(random.Random(3).randbytes(index.stat().st_size - 4096))
    listed = run_lazyfs("cache", "ls", "--cache-dir", filled)
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr
    (line,) = listed.stderr.splitlines()
    assert line.startswith(f"lazyfs: WARNING: disk cache {filled}: the index was damaged (")
    assert line.endswith("started it afresh with the 8 entries on disk")
    stats = run_lazyfs("cache", "stats", "--cache-dir", filled)
    assert stats.returncode == 0 and stats.stderr == ""
    assert "entries        8 (6 frame, 2 meta)" in stats.stdout
    assert f"used           {human_size(store_bytes(filled))}" in stats.stdout
    pruned = run_lazyfs("cache", "prune", "--to", "100K", "--cache-dir", filled)
    assert pruned.returncode == 0 and pruned.stderr == "" and 0 < store_bytes(filled) <= 100 << 10
    cleared = run_lazyfs("cache", "clear", "--cache-dir", filled)
    assert cleared.returncode == 0 and cleared.stderr == "" and store_bytes(filled) == 0


def test_a_cache_that_cannot_be_used_is_one_line_for_every_command(filled: Path) -> None:
    sqlite3.connect(filled / "index.sqlite").execute("PRAGMA user_version = 99")
    for action in (("ls",), ("stats",), ("prune", "--to", "1M"), ("clear",)):
        assert_one_line_error(run_lazyfs("cache", *action, "--cache-dir", filled),
                              f"{filled}/index.sqlite: index format 99 is newer")


@pytest.mark.root
def test_clear_empties_a_cache_whose_file_system_is_full(tmp_path: Path) -> None:
    """A file system filled while the index grew: its WAL could not be checkpointed into
    the database file (that would grow), and sqlite cannot open the index there again. The
    commands say so in one line; `clear` still empties the cache (the files go first, which
    makes the room), and the cache works again."""
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs", str(cache)],
                   check=True)
    try:
        store = DiskStore(cache, 64 << 20)  # a cap beyond the file system
        layer = "meta-" + "a" * 64
        for name in range(64):
            with contextlib.suppress(OSError, sqlite3.Error):
                store.put("frame-" + hashlib.sha512(str(name).encode()).hexdigest(),
                          random.randbytes(64 << 10), (layer, name))
        with contextlib.suppress(OSError, sqlite3.Error):
            store.register_layer(layer, "layer", 64)
            store.remember_reads(layer, list(range(64)))
        store.close()
        for action in (("ls",), ("stats",), ("prune", "--to", "1M")):
            assert_one_line_error(run_lazyfs("cache", *action, "--cache-dir", cache),
                                  f"cache directory {cache}: database or disk is full")
        cleared = run_lazyfs("cache", "clear", "--cache-dir", cache)
        assert cleared.returncode == 0 and cleared.stderr == "", cleared.stderr
        stats = run_lazyfs("cache", "stats", "--cache-dir", cache)
        assert stats.returncode == 0 and "used           0 bytes" in stats.stdout, stats.stderr
    finally:
        cleanup(mountpoints=[cache])
