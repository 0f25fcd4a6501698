"""The disk cache as a mount uses it (`lazyfs.cache.disk.DiskCache`) when it fails: whatever
its store raises, a call is a miss or a skipped write, never an error, and what failed is
logged once with the directory and the reason. One whose index cannot be opened (here: a
newer index format; on a full file system: sqlite's "database or disk is full") turns off."""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lazyfs.cache.disk import DiskCache, DiskCacheOptions, open_disk_cache
from lazyfs.cache.disk_store import DiskStore
from tests.support.mounts import cleanup

LAYER = "meta-" + "a" * 64


def key(name: str | int) -> str:
    return "frame-" + hashlib.sha512(str(name).encode()).hexdigest()


def newer_index(directory: Path) -> None:
    """A cache in `directory` whose index this lazyfs refuses to open."""
    DiskStore(directory, 1 << 20).close()
    sqlite3.connect(directory / "index.sqlite").execute("PRAGMA user_version = 99")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING]


async def use_every_call(cache: DiskCache) -> list[object]:
    """What each call of the cache answers (none may raise)."""
    answers: list[object] = [await cache.wait_index()]
    await cache.put(key(1), b"one", (LAYER, 0))
    await cache.register_layer(LAYER, "layer", 1)
    await cache.remember_reads(LAYER, [0])
    await cache.delete(key(2))
    answers += [await cache.get(key(1), (LAYER, 0)), await cache.contains(key(1)),
                await cache.layer_chunks(LAYER)]
    await cache.aclose()
    return answers


def test_an_index_that_cannot_be_opened_in_the_background_turns_the_cache_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    newer_index(tmp_path)
    cache = open_disk_cache(DiskCacheOptions(str(tmp_path), 1 << 20), index_in_background=True)
    assert cache is not None  # the index's error comes later, from the thread that opens it
    assert trio.run(use_every_call, cache) == [False, None, False, []]
    (line,) = warnings_of(caplog)
    assert str(tmp_path) in line and "newer than this lazyfs" in line
    assert "going on without the disk cache" in line
    assert cache.failure is not None and cache.stats_snapshot()["off"] == cache.failure


def test_a_cache_that_cannot_be_opened_at_all_is_none_and_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    newer_index(tmp_path)
    assert open_disk_cache(DiskCacheOptions(str(tmp_path), 1 << 20)) is None
    (file_in_the_way := tmp_path / "file").write_text("")
    assert open_disk_cache(DiskCacheOptions(str(file_in_the_way / "cache"))) is None
    first, second = warnings_of(caplog)
    assert str(tmp_path) in first and "newer than this lazyfs" in first
    assert str(file_in_the_way) in second and "going on without the disk cache" in second


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (mode 0700, as a cache directory must be), unmounted after the test."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        cleanup(mountpoints=[path])


@pytest.mark.root
def test_a_full_file_system_costs_writes_then_the_cache(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes to a full file system fail (ENOSPC for a file, "database or disk is full" for
    the index): skipped, logged once, reads go on. The next process cannot open the index
    there at all: its cache is off, in one line, and nothing raises."""
    options = DiskCacheOptions(str(small_tmpfs), 64 << 20)  # a cap beyond the file system
    cache = DiskCache.open(options)

    async def fill() -> list[object]:
        for name in range(64):
            await cache.put(key(name), random.randbytes(64 << 10), (LAYER, name))
        await cache.register_layer(LAYER, "layer", 64)
        await cache.remember_reads(LAYER, list(range(64)))
        answers = [await cache.get(key(0)), await cache.layer_chunks(LAYER)]
        await cache.aclose()
        return answers

    kept, _ = trio.run(fill)
    assert kept is not None and len(kept) == 64 << 10
    assert 0 < cache.writes < 64 and cache.errors > 0 and cache.failure is None
    (line,) = warnings_of(caplog)
    assert str(small_tmpfs) in line and "cannot write" in line

    caplog.clear()
    again = open_disk_cache(options, index_in_background=True)
    assert again is not None
    assert trio.run(use_every_call, again)[0] is False
    (line,) = warnings_of(caplog)
    assert str(small_tmpfs) in line and "going on without the disk cache" in line
