"""`lazyfs cache ls|stats|prune|clear` on a disk cache filled by reading layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.cache.disk import DiskCacheOptions
from lazyfs.cli.sizes import human_size
from lazyfs.image.open import LayerSource
from lazyfs.image.remote_image import RemoteImage
from lazyfs.image.tuning import ImageTuning
from tests.cli import assert_one_line_error, run_lazyfs
from tests.image.helpers import make_image_bytes, run_with_layer, write_blob

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
