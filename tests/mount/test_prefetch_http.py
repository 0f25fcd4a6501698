"""Prefetch lists and --fill on lazy mounts over a real nginx: `mount --record` writes what a
mount read, `mount --prefetch` fetches it before any read, `--fill` fetches the whole layer at
its rate cap, and unmount stops background work at once (no request after the daemon left).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lazyfs.format.prefetch_list import LayerPrefetch, PrefetchList, parse_prefetch_list
from lazyfs.format.prefetch_list import serialize_prefetch_list as serialize
from tests.support.lazyfs_cli import REPO, Lazyfs, pid_gone, wait_until
from tests.support.nginx import NginxServer, serve_directory
from tools.linkemu import start_link_emulator
from tools.sample_tree import make_sample_tree

pytestmark = [pytest.mark.root, pytest.mark.network]



@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(tree, served dir with layer.blob, descriptor): a few MiB of files in 64 KiB chunks."""
    work = tmp_path_factory.mktemp("prefetch-layer")
    tree = make_sample_tree(work / "tree", 6 * 1024 * 1024, seed=11)
    served = work / "served"
    served.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "convert", str(tree), "-o", str(served / "layer.blob"),
         "--chunk-size", "64K"], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return tree, served, json.loads((served / "layer.descriptor.json").read_text())


@pytest.fixture
def server(layer: tuple[Path, Path, dict[str, Any]]) -> Iterator[NginxServer]:
    with serve_directory(layer[1]) as running:
        yield running


def layer_stats(lazyfs: Lazyfs, mountpoint: Path) -> dict[str, Any]:
    result = lazyfs.run("stats", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    (stats,) = json.loads(result.stdout)["layers"].values()
    return stats  # type: ignore[no-any-return]


def some_files(tree: Path) -> list[str]:
    """A dozen files from all over the tree, so that a start reads several chunks."""
    files = sorted(str(path.relative_to(tree)) for path in tree.rglob("*")
                   if path.is_file() and not path.is_symlink())
    return files[::max(1, len(files) // 12)]


def whole_list(descriptor: dict[str, Any], chunk_count: int) -> bytes:
    """A list naming every chunk of the layer, for long background loads."""
    digest = descriptor["annotations"]["dev.containerd.erofs.zstd.chunk_digest"]
    return serialize(PrefetchList((LayerPrefetch(digest, chunk_count,
                                                 tuple(range(chunk_count))),)))


def test_record_then_prefetch_fetches_the_reads_before_they_happen(
    lazyfs: Lazyfs, tmp_path: Path, layer: tuple[Path, Path, dict[str, Any]],
    server: NginxServer,
) -> None:
    tree, _, descriptor = layer
    url = server.url + "layer.blob"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    recorded = tmp_path / "start.json"
    # No disk cache: what the second mount has, the prefetch brought.
    lazyfs.mount(url, str(first), "--record", str(recorded), "--no-disk-cache",
                 mountpoint=first)
    for name in some_files(tree):
        assert (first / name).read_bytes() == (tree / name).read_bytes()
    assert lazyfs.run("umount", str(first)).returncode == 0
    prefetch = parse_prefetch_list(recorded.read_bytes(), str(recorded))
    (entry,) = prefetch.layers
    assert entry.chunk_digest == descriptor["annotations"][
        "dev.containerd.erofs.zstd.chunk_digest"]
    assert entry.name == "layer.blob" and len(entry.chunks) >= 4

    lazyfs.mount(url, str(second), "--prefetch", str(recorded), "--readahead", "0",
                 "--no-disk-cache", mountpoint=second)
    wait_until(lambda: layer_stats(lazyfs, second)["background"]["state"] == "done",
               "the prefetch to finish")
    stats = layer_stats(lazyfs, second)
    background = stats["background"]
    assert background["listed_chunks"] == len(entry.chunks)
    # The kernel's mount reads chunk 0 on demand meanwhile: fetched either way, once.
    assert background["prefetched_chunks"] + background["skipped_chunks"] == len(entry.chunks)
    assert background["prefetched_chunks"] >= 1
    assert background["prefetch_requests"] >= 1 and background["prefetch_bytes"] > 0
    assert stats["chunks_fetched"] == len(entry.chunks)
    requests = len(server.access_lines())
    for name in some_files(tree):  # everything the first mount read is here already
        assert (second / name).read_bytes() == (tree / name).read_bytes()
    assert len(server.access_lines()) == requests
    assert lazyfs.run("umount", str(second)).returncode == 0


def test_a_list_of_another_layer_is_refused(
    lazyfs: Lazyfs, mountpoint: Path, tmp_path: Path, server: NginxServer
) -> None:
    lazyfs.expected_log_levels.add("ERROR")  # the daemon logs why it did not start
    foreign = tmp_path / "foreign.json"
    foreign.write_bytes(serialize(PrefetchList((LayerPrefetch("sha512:" + "0" * 128, 3, (1,),
                                                              "elsewhere"),))))
    result = lazyfs.run("mount", server.url + "layer.blob", str(mountpoint), "--prefetch",
                        str(foreign))
    assert result.returncode == 2
    assert "recorded for other layers (elsewhere) than those mounted (layer.blob)" in (
        result.stderr)
    assert "Traceback" not in result.stderr and lazyfs.records() == []
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = lazyfs.run("mount", server.url + "layer.blob", str(mountpoint), "--prefetch",
                        str(bad))
    assert result.returncode == 2 and "not a prefetch list" in result.stderr


def test_fill_fetches_everything_at_its_rate_cap(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path, dict[str, Any]],
    server: NginxServer,
) -> None:
    rate = 2 * 1024 * 1024
    started = time.monotonic()
    lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--fill", "--fill-rate", "2M",
                 mountpoint=mountpoint)
    samples = []
    while (stats := layer_stats(lazyfs, mountpoint))["background"]["state"] == "filling":
        samples.append((time.monotonic() - started, stats["background"]["fill_bytes"]))
        assert time.monotonic() - started < 30
        time.sleep(0.1)
    background = stats["background"]
    assert background["state"] == "done"
    assert stats["chunks_fetched"] == stats["chunk_count"]
    assert background["filled_chunks"] + background["skipped_chunks"] == stats["chunk_count"]
    # Never ahead of the cap (one request of slack: it is paid for when it starts).
    for elapsed, fetched in samples:
        assert fetched <= rate * elapsed + 1024 * 1024, samples
    assert time.monotonic() - started >= (background["fill_bytes"] - 1024 * 1024) / rate
    assert lazyfs.run("umount", str(mountpoint)).returncode == 0


@pytest.mark.slow
def test_unmount_stops_background_loads_at_once(
    lazyfs: Lazyfs, mountpoint: Path, tmp_path: Path,
    layer: tuple[Path, Path, dict[str, Any]], server: NginxServer,
) -> None:
    _, served, descriptor = layer
    inspect = lazyfs.run("inspect", str(served / "layer.blob"), "--json")
    count = json.loads(inspect.stdout)["chunk_count"]
    everything = tmp_path / "all.json"
    everything.write_bytes(whole_list(descriptor, count))
    port, emulator = start_link_emulator(server.port, 10, 2)  # 2 Mbit/s per connection
    try:
        url = f"http://127.0.0.1:{port}/layer.blob"
        record = lazyfs.mount(url, str(mountpoint), "--prefetch", str(everything), "--fill",
                              mountpoint=mountpoint)
        time.sleep(0.5)
        background = layer_stats(lazyfs, mountpoint)["background"]
        assert background["state"] == "prefetching"
        assert background["prefetched_chunks"] < count // 2
        started = time.monotonic()
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0
        assert time.monotonic() - started < 5
        assert pid_gone(record["pid"])
        time.sleep(0.5)  # requests cut off by the unmount are logged when nginx sees it
        logged = len(server.access_lines())
        time.sleep(1.0)
        assert len(server.access_lines()) == logged
    finally:
        emulator.terminate()
        emulator.wait()
