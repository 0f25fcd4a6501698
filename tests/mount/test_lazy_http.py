"""Lazy mounts over a real nginx: what is fetched, what fails, and that failures stay local.

Layers are made by the real `lazyfs convert` from generated trees, served by nginx on
127.0.0.1, mounted through the CLI, read through the kernel EROFS mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.tree import compare_trees, scan_directory
from lazyfs.format.descriptor import parse_descriptor
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.startup.early_requests import FIRST_FRAME_BYTES
from tests.layer.helpers import flip_byte
from tests.support.lazyfs_cli import REPO, Lazyfs
from tests.support.nginx import serve_directory
from tools.sample_tree import make_sample_tree

pytestmark = [pytest.mark.root, pytest.mark.network]

SMALL_FILE = "etc/os-release"


def convert(source: Path, blob: Path, *extra: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "convert", str(source), "-o", str(blob), *extra],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(blob.with_name(blob.stem + ".descriptor.json").read_text())


def layer_stats(lazyfs: Lazyfs, mountpoint: Path) -> dict[str, object]:
    result = lazyfs.run("stats", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    assert len(layers) == 1
    return next(iter(layers.values()))


@pytest.fixture(scope="module")
def small_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source tree, served dir with layer.blob): 24 MiB of files, 256 KiB chunks."""
    work = tmp_path_factory.mktemp("small-layer")
    tree = make_sample_tree(work / "tree", 24 * 1024 * 1024, seed=5)
    served = work / "served"
    served.mkdir()
    convert(tree, served / "layer.blob", "--chunk-size", "256K")
    return tree, served


@pytest.fixture
def served_copy(small_layer: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the served dir, free to corrupt."""
    copy = tmp_path / "served"
    shutil.copytree(small_layer[1], copy)
    return copy


@pytest.mark.slow
def test_large_layer_reads_little_for_one_file_and_equals_source(
    lazyfs: Lazyfs, mountpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("large-layer")
    tree = make_sample_tree(work / "tree", 240 * 1024 * 1024, seed=9)
    served = work / "served"
    served.mkdir()
    descriptor = convert(tree, served / "layer.blob")
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), mountpoint=mountpoint)
        assert (mountpoint / SMALL_FILE).read_bytes() == (tree / SMALL_FILE).read_bytes()
        stats = layer_stats(lazyfs, mountpoint)
        assert stats["image_size"] >= 200 * 1024 * 1024
        assert stats["chunk_count"] >= 50
        # Metadata, the tree's upper levels and a frame or two: a small fraction of the blob.
        assert stats["chunks_fetched"] <= 3, stats
        assert stats["bytes_fetched"] < descriptor["size"] * 0.06, stats

        assert compare_trees(scan_directory(tree), scan_directory(mountpoint)) == []
        stats = layer_stats(lazyfs, mountpoint)
        assert stats["chunks_fetched"] == stats["chunk_count"]
        assert stats["verify_failures"] == 0
        result = lazyfs.run("umount", str(mountpoint))
        assert result.returncode == 0, result.stderr


def test_whole_tree_equals_source_over_http(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path]
) -> None:
    tree, served = small_layer
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), mountpoint=mountpoint)
        assert compare_trees(scan_directory(tree), scan_directory(mountpoint)) == []
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0


def test_many_concurrent_readers_get_correct_data(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path]
) -> None:
    tree, served = small_layer
    files = sorted(p.relative_to(tree) for p in tree.rglob("*") if p.is_file()
                   and not p.is_symlink())
    expected = {name: hashlib.sha256((tree / name).read_bytes()).hexdigest() for name in files}
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for name in rng.sample(files, min(60, len(files))):
            try:
                digest = hashlib.sha256((mountpoint / name).read_bytes()).hexdigest()
            except OSError as exc:
                errors.append(f"{name}: {exc}")
                continue
            if digest != expected[name]:
                errors.append(f"{name}: wrong content")

    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--cache-size", "2M",
                     mountpoint=mountpoint)
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        assert layer_stats(lazyfs, mountpoint)["verify_failures"] == 0
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0


def read_outcomes(mountpoint: Path, tree: Path, limit: int | None = None) -> tuple[int, int, int]:
    """Read every file (or `limit` of them, spread out): (correct, EIO, wrong). Wrong content
    must never happen."""
    correct = eio = wrong = 0
    paths = [p for p in sorted(tree.rglob("*")) if p.is_file() and not p.is_symlink()]
    if limit is not None:
        paths = paths[:: max(1, len(paths) // limit)]
    for path in paths:
        name = path.relative_to(tree)
        try:
            data = (mountpoint / name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{name}: {exc}"
            eio += 1
            continue
        if data == path.read_bytes():
            correct += 1
        else:
            wrong += 1
    return correct, eio, wrong


def test_corrupted_frame_over_http_is_eio_there_and_only_there(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path], served_copy: Path
) -> None:
    tree, _ = small_layer
    descriptor = parse_descriptor((served_copy / "layer.descriptor.json").read_text())
    flip_byte(served_copy / "layer.blob", descriptor.seekable().chunk_table_offset // 2, 0x20)
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))
    with serve_directory(served_copy) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), mountpoint=mountpoint)
        correct, eio, wrong = read_outcomes(mountpoint, tree)
        stats = layer_stats(lazyfs, mountpoint)
        assert wrong == 0 and eio >= 1 and correct > 10 * eio
        assert len(stats["bad_chunks"]) == 1 and stats["verify_failures"] == 1
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0
    assert "verification failed" in lazyfs.logs()


def test_corrupted_tree_block_over_http_is_eio_there_and_only_there(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path], served_copy: Path
) -> None:
    tree, _ = small_layer
    annotations = parse_descriptor(
        (served_copy / "layer.descriptor.json").read_text()).seekable()
    assert annotations.verity_offset is not None
    payload = annotations.verity_offset + SKIPPABLE_HEADER_SIZE
    # 24 MiB image / 4 KiB blocks * 64 B = 384 KiB of level 0 (96 blocks) under one level-1
    # block: payload = superblock block, level 1, then level 0. Corrupt level-0 block 40.
    flip_byte(served_copy / "layer.blob", payload + 4096 * (2 + 40) + 100, 0x20)
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))
    with serve_directory(served_copy) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), mountpoint=mountpoint)
        correct, eio, wrong = read_outcomes(mountpoint, tree)
        stats = layer_stats(lazyfs, mountpoint)
        assert wrong == 0 and eio >= 1 and correct > 10 * eio
        # The bad hash block covers one 256 KiB chunk: kept by the layer as partly bad (here
        # wholly), it is not a frame that failed its checks.
        assert stats["verify_failures"] == 1 and len(stats["partial_chunks"]) == 1
        assert stats["bad_chunks"] == []
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0


def test_a_mount_opens_with_one_request_and_the_top_of_the_tree(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path]
) -> None:
    """No size probe, the metadata in one range, the tree beyond its top fetched only where
    reads went, nothing the command's head start fetched asked for again; and the stats show
    the start-up phases."""
    _, served = small_layer
    annotations = parse_descriptor((served / "layer.descriptor.json").read_text()).seekable()
    assert annotations.verity_offset is not None
    tree_start = annotations.verity_offset + SKIPPABLE_HEADER_SIZE + 4096
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--readahead", "0",
                     mountpoint=mountpoint)
        stats = layer_stats(lazyfs, mountpoint)
        ranges = []
        for line in server.access_lines():
            _, path, asked, status, _ = line.split()
            if path == "/layer.blob":
                assert status == "206", line
                start, end = asked.strip('"').removeprefix("bytes=").split("-")
                ranges.append((int(start), int(end) + 1))
        window = 16 * 1024  # ImageTuning's default verity_window_bytes
        metadata = (annotations.chunk_table_offset, tree_start + window)
        # The command's head start asked for the metadata and, on a second connection, the
        # first frame; the daemon asked for none of that again.
        assert ranges.count(metadata) == 1 and (0, FIRST_FRAME_BYTES) in ranges, ranges
        assert len(set(ranges)) == len(ranges), ranges
        later = sum(min(end, 1 << 62) - max(start, tree_start + window)
                    for start, end in ranges if end > tree_start + window and start != metadata[0])
        # A level-0 hash block covers a 256 KiB chunk: one per chunk read, no more.
        assert later <= 4096 * stats["chunks_fetched"], (ranges, stats)
        result = lazyfs.run("stats", str(mountpoint), "--json")
        phases = json.loads(result.stdout)["daemon"]["phases"]
        assert all(phases[name] is not None and phases[name] >= 0 for name in (
            "cli_start_s", "daemon_start_s", "metadata_s", "fuse_init_s", "kernel_mount_s",
            "ready_s"))
        assert "layer metadata" in lazyfs.run("stats", str(mountpoint)).stdout
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0


def test_a_local_descriptor_gets_a_head_start_too(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path], tmp_path: Path
) -> None:
    """`--descriptor FILE`: the command reads the file at once, its head start asks for the
    metadata and the first frame, and the daemon asks for neither again; nobody asks for a
    descriptor."""
    _, served = small_layer
    blob_only = tmp_path / "served"
    blob_only.mkdir()
    (blob_only / "layer.blob").symlink_to(served / "layer.blob")
    descriptor = tmp_path / "layer.json"
    shutil.copy(served / "layer.descriptor.json", descriptor)
    annotations = parse_descriptor(descriptor.read_text()).seekable()
    with serve_directory(blob_only) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--descriptor",
                     str(descriptor), "--readahead", "0", mountpoint=mountpoint)
        ranges = []
        for line in server.access_lines():
            _, path, asked, status, _ = line.split()
            assert (path, status) == ("/layer.blob", "206"), line
            start, end = asked.strip('"').removeprefix("bytes=").split("-")
            ranges.append((int(start), int(end) + 1))
        # The first frame as the head start asks for it (the daemon would ask for the frame).
        assert (0, FIRST_FRAME_BYTES) in ranges, ranges
        assert [start for start, _ in ranges].count(annotations.chunk_table_offset) == 1
        assert len(set(ranges)) == len(ranges), ranges
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0


def test_wrong_chunk_digest_refuses_the_mount(
    lazyfs: Lazyfs, mountpoint: Path, served_copy: Path
) -> None:
    path = served_copy / "layer.descriptor.json"
    document = json.loads(path.read_text())
    key = "dev.containerd.erofs.zstd.chunk_digest"
    document["annotations"][key] = "sha512:" + "ab" * 64
    path.write_text(json.dumps(document))
    lazyfs.expected_log_levels.add("ERROR")  # the daemon logs why it did not start
    with serve_directory(served_copy) as server:
        result = lazyfs.run("mount", server.url + "layer.blob", str(mountpoint))
    assert result.returncode != 0
    assert "chunk table digest mismatch" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mountpoint) and lazyfs.records() == []


def test_server_dying_mid_read_gives_eio_and_umount_still_works(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path]
) -> None:
    tree, served = small_layer
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--readahead", "0",
                     mountpoint=mountpoint)
        assert (mountpoint / SMALL_FILE).read_bytes() == (tree / SMALL_FILE).read_bytes()
        server.stop()
        _, eio, wrong = read_outcomes(mountpoint, tree, limit=40)
        assert wrong == 0 and eio >= 1
        stats = layer_stats(lazyfs, mountpoint)  # the daemon is alive and answers
        assert stats["fetch_failures"] >= 1 and stats["verify_failures"] == 0
        assert stats["retries"] >= 1
        result = lazyfs.run("umount", str(mountpoint))
        assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)


@pytest.fixture(autouse=True)
def _no_stray_mounts(mountpoint: Path) -> Iterator[None]:
    yield
    assert not os.path.ismount(mountpoint)


def _walk_fetches(lazyfs: Lazyfs, mountpoint: Path, served: Path, tree: Path,
                  trace: Path) -> tuple[list[int], int]:
    """Look up and stat every name of the mounted tree, reading no file; (the chunks fetched,
    sorted, and the layer's chunk count)."""
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--readahead", "0",
                     "--trace", str(trace), mountpoint=mountpoint)
        names = sorted(path.relative_to(tree) for path in tree.rglob("*"))
        for name in names:
            seen, source = os.lstat(mountpoint / name), os.lstat(tree / name)
            assert seen.st_mode == source.st_mode, name
            assert seen.st_size == source.st_size or stat.S_ISDIR(seen.st_mode), name
        stats = layer_stats(lazyfs, mountpoint)
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    fetched = sorted({event["chunk"] for event in events if event["event"] == "fetch"})
    assert len(fetched) == stats["chunks_fetched"]
    return fetched, int(stats["chunk_count"])  # type: ignore[call-overload]


def test_metadata_first_layout_answers_every_lookup_from_the_first_chunks(
    lazyfs: Lazyfs, mountpoint: Path, small_layer: tuple[Path, Path], tmp_path: Path
) -> None:
    """`lazyfs convert`'s default layout puts every inode and directory before the file data:
    a walk that looks up every name fetches a prefix of the image, a few of its chunks, where
    mkfs.erofs's interleaved layout has the walk fetch chunks all over the image."""
    tree = small_layer[0]
    fetched: dict[str, list[int]] = {}
    for layout in ("metadata-first", "interleaved"):
        served = tmp_path / layout
        served.mkdir()
        convert(tree, served / "layer.blob", "--chunk-size", "64K", "--erofs-layout", layout)
        fetched[layout], chunk_count = _walk_fetches(lazyfs, mountpoint, served, tree,
                                                     tmp_path / f"{layout}.trace")
        print(f"\n[layout] {layout}: the walk fetched {len(fetched[layout])} of "
              f"{chunk_count} chunks")
    first = fetched["metadata-first"]
    assert first == list(range(len(first))) and len(first) <= chunk_count // 20, first
    assert len(fetched["interleaved"]) >= 4 * len(first), fetched
