"""The disk cache through real mounts: nginx or docker-registry on 127.0.0.1, daemons started
by the CLI, reads through the kernel. A layer mounted again reads from the disk without
fetching, also while its server is down; a daemon killed mid-write leaves nothing that would
be served unverified; a damaged copy is fetched again; two daemons writing at once keep the
cap; two images that share a layer store it once."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from converter.tree import compare_trees, scan_directory
from lazyfs.startup.warm_start import WarmFeed, WarmStart, remembered_layer
from tests.layer.helpers import flip_byte
from tests.support.images import base_layer, change_layer
from tests.support.lazyfs_cli import REPO, Lazyfs, pid_gone, wait_until
from tests.support.mounts import cleanup, mounts_below
from tests.support.nginx import serve_directory
from tests.support.registry import running_registry
from tests.support.registry_images import publish
from tools.sample_tree import make_sample_tree

pytestmark = [pytest.mark.root, pytest.mark.network]

SMALL = "etc/os-release"
# Files of the sample tree in different chunks: what an earlier mount read.
SOME_FILES = ("etc/os-release", "etc/hostname", "usr/lib/data/blob0.bin")


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source tree, served dir with layer.blob): 12 MiB of files in 256 KiB chunks."""
    work = tmp_path_factory.mktemp("disk-cache-layer")
    tree = make_sample_tree(work / "tree", 12 * 1024 * 1024, seed=31)
    served = work / "served"
    served.mkdir()
    convert(tree, served / "layer.blob")
    return tree, served


def convert(tree: Path, blob: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "convert", str(tree), "-o", str(blob),
         "--chunk-size", "256K"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def mount_stats(lazyfs: Lazyfs, mountpoint: Path) -> dict[str, Any]:
    result = lazyfs.run("stats", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def only_layer(stats: dict[str, Any]) -> dict[str, Any]:
    (layer,) = stats["layers"].values()
    return layer  # type: ignore[no-any-return]


def assert_reads_equal(mountpoint: Path, tree: Path, names: tuple[str, ...]) -> None:
    for name in names:
        assert (mountpoint / name).read_bytes() == (tree / name).read_bytes(), name


def umount(lazyfs: Lazyfs, mountpoint: Path) -> None:
    result = lazyfs.run("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr


def frame_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "data" / "frame").rglob("*") if p.is_file())


def du(directory: Path) -> int:
    """What `du` counts of `directory`: the blocks of every file and directory in it (a file
    a running daemon evicts between the listing and its stat counts nothing, as in `du`)."""
    total = 0
    for path in [directory, *directory.rglob("*")]:
        try:
            total += os.lstat(path).st_blocks * 512
        except FileNotFoundError:
            continue
    return total


def read_until_gone(mountpoint: Path) -> None:
    """Read every file until the mount goes away under the reader."""
    for directory, _, names in os.walk(mountpoint):
        for name in names:
            try:
                with open(os.path.join(directory, name), "rb") as stream:
                    stream.read()
            except OSError:
                return


def test_a_layer_mounted_again_reads_from_the_disk_without_fetching_chunks(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    tree, served = layer
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        lazyfs.mount(url, str(mountpoint), mountpoint=mountpoint)
        assert compare_trees(scan_directory(tree), scan_directory(mountpoint)) == []
        cold = mount_stats(lazyfs, mountpoint)
        assert only_layer(cold)["chunks_fetched"] == only_layer(cold)["chunk_count"]
        assert cold["disk_cache"]["directory"] == str(lazyfs.cache_dir)
        umount(lazyfs, mountpoint)
        assert len(frame_files(lazyfs.cache_dir)) == only_layer(cold)["chunk_count"]

        before = len(server.access_lines())
        lazyfs.mount(url, str(mountpoint), mountpoint=mountpoint)
        assert compare_trees(scan_directory(tree), scan_directory(mountpoint)) == []
        # Nothing of the blob fetched, by the daemon or the command's head start: the
        # descriptor (it may have changed) and, once the start-up is over
        # (`ImageTuning.source_probe_delay_s`), a one-byte probe that the source answers.

        def asked() -> list[str]:
            return sorted(" ".join(line.split()[1:3])
                          for line in server.access_lines()[before:])

        wait_until(lambda: len(asked()) >= 2, "the probe of the source")
        assert asked() == ['/layer.blob "bytes=0-0"', '/layer.descriptor.json "-"']
        warm = mount_stats(lazyfs, mountpoint)
        layer_stats = only_layer(warm)
        assert layer_stats["chunks_fetched"] == 0 and layer_stats["bytes_fetched"] == 0
        assert layer_stats["chunks_from_disk"] == layer_stats["chunk_count"]
        assert warm["disk_cache"]["hits"] >= layer_stats["chunk_count"]
        text = lazyfs.run("stats", str(mountpoint)).stdout
        assert f"disk cache {lazyfs.cache_dir}" in text and "hits / misses" in text
        umount(lazyfs, mountpoint)


def test_offline_remount_serves_what_was_read_and_fails_the_rest_fast(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    tree, served = layer
    read_before = SOME_FILES
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        lazyfs.mount(url, str(mountpoint), "--readahead", "0", mountpoint=mountpoint)
        assert_reads_equal(mountpoint, tree, read_before)
        umount(lazyfs, mountpoint)
    lazyfs.expected_log_levels.add("WARNING")
    lazyfs.mount(url, str(mountpoint), "--readahead", "0", mountpoint=mountpoint)
    assert_reads_equal(mountpoint, tree, read_before)
    began = time.monotonic()
    with pytest.raises(OSError) as failed:
        (mountpoint / "usr/lib/data/blob2.bin").read_bytes()
    assert failed.value.errno == errno.EIO
    assert time.monotonic() - began < 5.0
    assert only_layer(mount_stats(lazyfs, mountpoint))["chunks_fetched"] == 0
    umount(lazyfs, mountpoint)
    logs = lazyfs.logs()
    assert "source unreachable" in logs and "using the descriptor the disk cache kept" in logs
    assert logs.count("source unreachable") == 1


def test_a_daemon_killed_mid_write_leaves_only_verified_bytes(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    tree, served = layer
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        record = lazyfs.mount(url, str(mountpoint), mountpoint=mountpoint)
        reader = threading.Thread(target=read_until_gone, args=(mountpoint,), daemon=True)
        reader.start()
        wait_until(lambda: len(frame_files(lazyfs.cache_dir)) >= 5, "frames on disk")
        os.kill(record["pid"], signal.SIGKILL)
        wait_until(lambda: pid_gone(record["pid"]), "the daemon to die")
        reader.join(60)
        umount(lazyfs, mountpoint)  # a dead daemon's mount is taken down all the same
        for path in frame_files(lazyfs.cache_dir):  # whole, or not there at all
            assert hashlib.sha512(path.read_bytes()).hexdigest() == path.name

        lazyfs.mount(url, str(mountpoint), mountpoint=mountpoint)
        assert compare_trees(scan_directory(tree), scan_directory(mountpoint)) == []
        layer_stats = only_layer(mount_stats(lazyfs, mountpoint))
        assert layer_stats["chunks_from_disk"] >= 5 and layer_stats["verify_failures"] == 0
        umount(lazyfs, mountpoint)


def test_flipped_bytes_on_disk_are_detected_and_fetched_again(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    tree, served = layer
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        lazyfs.mount(url, str(mountpoint), mountpoint=mountpoint)
        scan_directory(mountpoint)
        umount(lazyfs, mountpoint)
        frames = frame_files(lazyfs.cache_dir)
        for path in frames[::3]:
            flip_byte(path, path.stat().st_size // 3)
        lazyfs.expected_log_levels.add("WARNING")
        lazyfs.mount(url, str(mountpoint), mountpoint=mountpoint)
        assert compare_trees(scan_directory(tree), scan_directory(mountpoint)) == []
        stats = mount_stats(lazyfs, mountpoint)
        layer_stats = only_layer(stats)
        assert layer_stats["chunks_fetched"] == len(frames[::3])
        assert layer_stats["bad_chunks"] == [] and layer_stats["verify_failures"] == 0
        assert stats["disk_cache"]["bad_entries"] == len(frames[::3])
        umount(lazyfs, mountpoint)
    for path in frame_files(lazyfs.cache_dir):
        assert hashlib.sha512(path.read_bytes()).hexdigest() == path.name
    assert lazyfs.logs().count("the disk cache's copy failed verification") == len(frames[::3])


def test_two_daemons_writing_at_once_keep_the_cap(
    lazyfs: Lazyfs, tmp_path: Path, layer: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _, served = layer
    both = tmp_path / "served"
    both.mkdir()
    for name in ("layer.blob", "layer.descriptor.json"):
        os.link(served / name, both / name)
    other_tree = make_sample_tree(tmp_path_factory.mktemp("other") / "tree", 12 << 20, seed=32)
    convert(other_tree, both / "other.blob")
    cap = 6 << 20
    mountpoints = [tmp_path / "a", tmp_path / "b"]
    with serve_directory(both) as server:
        for path, blob in zip(mountpoints, ("layer.blob", "other.blob"), strict=True):
            path.mkdir()
            lazyfs.mount(server.url + blob, str(path), "--disk-cache-size", "6M",
                         mountpoint=path)
        threads = [threading.Thread(target=scan_directory, args=(path,))
                   for path in mountpoints]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        # Everything counts: the entries, the index with its WAL, the directories.
        assert 0 < du(lazyfs.cache_dir) <= cap
        for path in mountpoints:
            assert mount_stats(lazyfs, path)["disk_cache"]["evictions"] > 0
            umount(lazyfs, path)
    assert 0 < du(lazyfs.cache_dir) <= cap
    listed = lazyfs.run("cache", "stats")
    assert listed.returncode == 0 and "evictions" in listed.stdout


def test_two_images_sharing_a_layer_store_it_once(
    lazyfs: Lazyfs, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_registry(tmp_path_factory.mktemp("registry")) as registry:
        first = publish(tmp_path / "one", registry.host, repository="test/one")
        second = publish(tmp_path / "two", registry.host, repository="test/two",
                         layers=[base_layer(), change_layer("-two")])
        mountpoints = [tmp_path / "m1", tmp_path / "m2"]
        layer_stats = []
        for image, path in zip((first, second), mountpoints, strict=True):
            path.mkdir()
            lazyfs.mountpoints.append(path)
            result = lazyfs.run("mount", image.converted, str(path), "--insecure-registry")
            assert result.returncode == 0, result.stderr
            record = lazyfs.record(path)
            assert record is not None
            lazyfs.pids.append(record["pid"])
            scan_directory(path)
            for name in ("bin/busybox", "etc/passwd"):
                (path / name).read_bytes()
            layer_stats.append(mount_stats(lazyfs, path)["layers"])
            umount(lazyfs, path)
    shared = set(layer_stats[0]) & set(layer_stats[1])
    assert len(shared) == 1  # the base layer, by digest
    (base,) = shared
    assert layer_stats[0][base]["chunks_fetched"] >= 1
    assert layer_stats[1][base]["chunks_fetched"] == 0
    assert layer_stats[1][base]["chunks_from_disk"] == layer_stats[0][base]["chunks_fetched"]
    listed = lazyfs.run("cache", "ls")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert len(rows) == 3  # the base layer once, and each image's own
    assert sum(base in row for row in rows) == 1
    cleanup(mountpoints=mountpoints)


def test_a_layer_mounted_again_loads_what_the_disk_holds_ahead_of_reads(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    """A warm start waits for no disk read: what the last mount read is loaded from the disk
    in the background, in that order, before the reads come (not with --no-prefetch)."""
    tree, served = layer
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        lazyfs.mount(url, str(mountpoint), "--readahead", "0", mountpoint=mountpoint)
        assert_reads_equal(mountpoint, tree, SOME_FILES)
        read_before = only_layer(mount_stats(lazyfs, mountpoint))["chunks_fetched"]
        umount(lazyfs, mountpoint)

        lazyfs.mount(url, str(mountpoint), "--readahead", "0", mountpoint=mountpoint)
        wait_until(lambda: only_layer(mount_stats(lazyfs, mountpoint))["background"]["state"]
                   == "done", "the chunks on disk to be loaded")
        warm = only_layer(mount_stats(lazyfs, mountpoint))
        assert warm["background"]["listed_chunks"] == read_before
        assert warm["chunks_from_disk"] == read_before and warm["chunks_fetched"] == 0
        assert_reads_equal(mountpoint, tree, SOME_FILES)
        after = only_layer(mount_stats(lazyfs, mountpoint))
        assert after["chunks_from_disk"] == read_before  # the reads found them in memory
        assert after["chunks_fetched"] == 0
        umount(lazyfs, mountpoint)

        lazyfs.mount(url, str(mountpoint), "--readahead", "0", "--no-prefetch",
                     mountpoint=mountpoint)
        cold = only_layer(mount_stats(lazyfs, mountpoint))
        assert cold["background"]["listed_chunks"] == 0
        assert cold["chunks_from_disk"] <= 1  # the superblock's chunk, for the kernel mount
        umount(lazyfs, mountpoint)


def test_a_warm_start_loads_only_what_the_last_mount_read(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    """The disk holds every chunk of the layer (a first mount read everything); a second
    mount reads a few files; a third loads ahead of reads only the chunks the second read,
    not all the disk holds, and its reads of those files find them in memory, reading
    nothing else ahead (the chunks after them were not read last time either)."""
    tree, served = layer
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        lazyfs.mount(url, str(mountpoint), "--readahead", "0", mountpoint=mountpoint)
        everything = tuple(str(path.relative_to(tree)) for path in sorted(tree.rglob("*"))
                           if path.is_file() and not path.is_symlink())
        assert_reads_equal(mountpoint, tree, everything)
        held = only_layer(mount_stats(lazyfs, mountpoint))["chunks_fetched"]
        umount(lazyfs, mountpoint)

        # Nothing loaded ahead: each chunk the reads touch comes from the disk once.
        lazyfs.mount(url, str(mountpoint), "--readahead", "0", "--no-prefetch",
                     mountpoint=mountpoint)
        assert_reads_equal(mountpoint, tree, SOME_FILES)
        read = only_layer(mount_stats(lazyfs, mountpoint))["chunks_from_disk"]
        umount(lazyfs, mountpoint)
        assert 0 < read < held

        lazyfs.mount(url, str(mountpoint), "--readahead", "4", mountpoint=mountpoint)
        wait_until(lambda: only_layer(mount_stats(lazyfs, mountpoint))["background"]["state"]
                   == "done", "the chunks on disk to be loaded")
        warm = only_layer(mount_stats(lazyfs, mountpoint))
        assert warm["background"]["listed_chunks"] == read
        assert warm["chunks_from_disk"] == read
        assert_reads_equal(mountpoint, tree, SOME_FILES)
        after = only_layer(mount_stats(lazyfs, mountpoint))
        assert (after["chunks_from_disk"], after["chunks_fetched"]) == (read, 0)
        assert after["readahead_chunks"] == 0
        umount(lazyfs, mountpoint)


def test_a_warm_start_handed_over_early_goes_on_loading_for_the_daemon(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    """Handed over to a daemon at once (`WarmStart.hand_over`), the loader goes on: the chunks
    it loads next come on the feed, each as the blob decodes it, until the feed ends."""
    cache = lazyfs.cache_dir
    with layer_read_once(lazyfs, mountpoint, layer) as (_, served, url):
        metadata, held = _held_chunks(cache, url)
        chunks, feed = warm_start_of(cache, url, 1 << 30).hand_over()
    assert feed is not None and len(chunks) < len(held)  # handed over before it was done
    chunks = loaded_to_the_end(chunks, feed)
    assert set(chunks) == set(held) and feed.pending == b""
    assert_decoded_as_in(served / "layer.blob", chunks, metadata, held)


@contextlib.contextmanager
def layer_read_once(lazyfs: Lazyfs, mountpoint: Path,
                    layer: tuple[Path, Path]) -> Iterator[tuple[Path, Path, str]]:
    """The layer served, mounted (no readahead) to read SOME_FILES right, and unmounted: the
    disk cache then holds their chunks, and the order they were read in. Yields (source tree,
    served directory, blob URL) while it is served."""
    tree, served = layer
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        lazyfs.mount(url, str(mountpoint), "--readahead", "0", mountpoint=mountpoint)
        assert_reads_equal(mountpoint, tree, SOME_FILES)
        umount(lazyfs, mountpoint)
        yield tree, served, url


def loaded_to_the_end(chunks: dict[str, memoryview],
                      feed: WarmFeed | None) -> dict[str, memoryview]:
    """`chunks`, with those a handed-over warm start's `feed` brings until its loader is done
    (as the daemon follows it); the feed is closed."""
    if feed is None:
        return chunks
    try:
        while select.select([feed.records], [], [], 30)[0]:
            data = os.read(feed.records, 65536)
            if not data:
                break
            chunks.update(feed.chunks_of(data))
    finally:
        feed.close()
    return chunks


def warm_start_of(cache: Path, url: str, budget: int) -> WarmStart:
    """A warm start (started) of what the disk cache at `cache` holds of the layer at `url`."""
    started = WarmStart(cache, lambda: remembered_layer(cache, url, None), budget).start()
    assert started is not None
    return started


def assert_decoded_as_in(blob_file: Path, chunks: dict[str, memoryview], metadata: Any,
                         held: dict[str, int]) -> None:
    """Each chunk of `held` (frame key -> chunk index) in `chunks` is read-only and what its
    frame in the blob decodes to."""
    from lazyfs.format.frames import decode_chunk_frame

    blob = blob_file.read_bytes()
    for key, index in held.items():
        start, end = metadata.frame_range(index)
        expected = decode_chunk_frame(blob[start:end], metadata.table.decoded_size(index),
                                      index, start)
        assert chunks[key] == expected and chunks[key].readonly


def _held_chunks(cache: Path, url: str) -> tuple[Any, dict[str, int]]:
    """(the layer's authenticated metadata, frame key -> chunk index) of what the disk cache
    holds of the layer at `url`."""
    from lazyfs.cache.disk_index import read_layer_entries
    from lazyfs.cache.disk_store import read_entry
    from lazyfs.cache.keys import layer_key
    from lazyfs.layer.disk_entries import check_cached_metadata

    (remembered,) = remembered_layer(cache, url, None)
    key = layer_key(remembered.annotations)
    assert key is not None
    entry = read_entry(cache, key)
    assert entry is not None
    metadata, _ = check_cached_metadata(remembered.annotations, entry, remembered.blob_size)
    return metadata, {entry_key: chunk for chunk, entry_key in read_layer_entries(cache, key)}


def test_a_warm_start_loads_what_the_disk_holds_each_chunk_checked(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path]
) -> None:
    """The command's warm start (`lazyfs.startup.warm_start`) loads, in a process of its own,
    exactly the chunks the disk holds of the layer as the blob decodes them; a frame damaged
    on disk is left out (the daemon finds it bad and fetches it), the budget holds, and a
    remount with a warm start reads right and fetches nothing."""
    cache = lazyfs.cache_dir
    with layer_read_once(lazyfs, mountpoint, layer) as (tree, served, url):
        metadata, held = _held_chunks(cache, url)
        assert len(held) >= 3

        def warm_start(budget: int) -> dict[str, memoryview]:
            return loaded_to_the_end(*warm_start_of(cache, url, budget).hand_over())

        chunks = warm_start(1 << 30)
        assert set(chunks) == set(held)
        assert_decoded_as_in(served / "layer.blob", chunks, metadata, held)

        chunk_size = metadata.table.chunk_size
        assert len(warm_start(chunk_size + chunk_size // 2)) == 1

        damaged = sorted(held)[0]
        lazyfs.expected_log_levels.add("WARNING")  # the daemon's "copy failed verification"
        flip_byte(cache / "data" / "frame" / damaged[6:8] / damaged[6:], 100)
        assert set(warm_start(1 << 30)) == set(held) - {damaged}

        lazyfs.mount(url, str(mountpoint), "--readahead", "0", mountpoint=mountpoint)
        assert_reads_equal(mountpoint, tree, SOME_FILES)
        stats = mount_stats(lazyfs, mountpoint)
        # At most the damaged frame's chunk (the figures say why, should it ever be more).
        assert only_layer(stats)["chunks_fetched"] <= 1, (only_layer(stats), stats["disk_cache"])
        assert stats["disk_cache"]["warm_start_chunks"] <= len(held) - 1
        text = lazyfs.run("stats", str(mountpoint)).stdout  # no reads since: the same count
        assert f"  warm start chunks         {stats['disk_cache']['warm_start_chunks']}\n" in text
        umount(lazyfs, mountpoint)


def test_a_local_descriptor_starts_warm_too(
    lazyfs: Lazyfs, mountpoint: Path, layer: tuple[Path, Path], tmp_path: Path
) -> None:
    """`--descriptor FILE` (the disk cache keeps only descriptors fetched from URLs): a second
    mount's warm start reads the file and loads what the first mount read, its head start
    asks for nothing the disk holds, and no chunk is fetched."""
    tree, served = layer
    blob_only = tmp_path / "served"
    blob_only.mkdir()
    (blob_only / "layer.blob").symlink_to(served / "layer.blob")
    descriptor = tmp_path / "layer.json"
    descriptor.write_bytes((served / "layer.descriptor.json").read_bytes())
    with serve_directory(blob_only) as server:
        url = server.url + "layer.blob"
        for _ in range(2):
            asked_before = len(server.access_lines())
            lazyfs.mount(url, str(mountpoint), "--descriptor", str(descriptor), "--readahead",
                         "0", mountpoint=mountpoint)
            assert_reads_equal(mountpoint, tree, SOME_FILES)
            stats = mount_stats(lazyfs, mountpoint)
            umount(lazyfs, mountpoint)
        assert stats["disk_cache"]["warm_start_chunks"] >= 1
        assert only_layer(stats)["chunks_fetched"] == 0
        # Only the daemon's probe of a layer opened from the disk: does its source answer?
        assert [line.split()[2] for line in server.access_lines()[asked_before:]] in (
            [], ['"bytes=0-0"'])


@pytest.fixture
def full_cache_dir(tmp_path: Path) -> Iterator[Path]:
    """A cache directory on a 48 MiB tmpfs (mode 0700, as a cache directory must be)."""
    path = tmp_path / "small-cache"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48M,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        cleanup(mountpoints=[path])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_full_cache_file_system_stops_no_mount(
    lazyfs: Lazyfs, mountpoint: Path, tmp_path: Path, full_cache_dir: Path
) -> None:
    """The disk cache on a 48 MiB tmpfs, a 72 MiB layer read whole, mounted again and again.
    The first mount fills the file system (its writes fail); the next ones cannot even open
    the index there ("database or disk is full"), an error that used to end the start-up
    while the kernel waited for FUSE, and the teardown then hung in a stat of the FUSE
    directory whose loop it had cancelled. Now every mount comes up in time without the disk
    cache, logged once by each daemon, reads right, and leaves nothing mounted."""
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    for index in range(3):
        (tree / "data" / f"random{index}.bin").write_bytes(random.randbytes(24 << 20))
    served = tmp_path / "served"
    served.mkdir()
    convert(tree, served / "layer.blob")
    lazyfs.expected_log_levels.add("WARNING")  # "cannot write", "going on without it"
    lazyfs.mountpoints.append(mountpoint)
    cycles = 4
    with serve_directory(served) as server:
        url = server.url + "layer.blob"
        for _ in range(cycles):
            # A cap beyond the file system: it fills whatever the default cap would be.
            mounted = lazyfs.run("mount", url, str(mountpoint), "--cache-dir",
                                 str(full_cache_dir), "--disk-cache-size", "1G", timeout=90)
            assert mounted.returncode == 0, mounted.stderr
            record = lazyfs.record(mountpoint)
            assert record is not None and record["ready"]
            lazyfs.pids.append(record["pid"])
            assert compare_trees(scan_directory(tree), scan_directory(mountpoint)) == []
            result = lazyfs.run("umount", str(mountpoint), timeout=60)
            assert result.returncode == 0, result.stderr
            assert mounts_below(lazyfs.state_dir) == [] and mounts_below(mountpoint) == []
            assert lazyfs.records() == []
    # Filled, to within a few entries: a write that fails takes its partial file back (and
    # the entries of a batch written after it may fit), and the index may trim its log.
    left = os.statvfs(full_cache_dir)
    assert left.f_bavail * left.f_frsize < 1 << 20, left
    by_daemon: dict[str, list[str]] = {}
    for line in lazyfs.logs().splitlines():
        daemon = re.search(r"lazyfs\[(\d+)\] (WARNING|ERROR) ", line)
        if daemon is not None:
            by_daemon.setdefault(daemon.group(1), []).append(line)
    assert all(len(lines) == 1 and "lazyfs.cache.disk" in lines[0]
               for lines in by_daemon.values()), by_daemon
    # Each daemon said once what failed and why: a write, a read of the index or its opening
    # (which one a daemon meets first depends on what sqlite needs when), the disk full.
    assert len(by_daemon) == cycles
    assert all("disk is full" in lines[0] or "No space left on device" in lines[0]
               for lines in by_daemon.values()), by_daemon
