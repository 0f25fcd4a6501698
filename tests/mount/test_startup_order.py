"""A start recorded with `lazyfs mount --record` and laid out with `lazyfs convert
--startup-order`: the files it read come right after the metadata, in the order it read them,
and the new layer mounts (through FUSE and the kernel's EROFS) with the same tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import walk
from converter.layer_image import decode_seekable
from converter.mkfs import fsck_erofs
from converter.tree import compare_trees, scan_directory
from lazyfs.format.prefetch_list import parse_prefetch_annotation, parse_prefetch_list
from tests.support.lazyfs_cli import REPO, Lazyfs
from tools.sample_tree import make_sample_tree

pytestmark = pytest.mark.root
BLOCK = 4096


def _convert(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "lazyfs", "convert", *args,
                             "--chunk-size", "64K"], cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _first_blocks(raw: Path, names: list[str]) -> dict[str, list[int]]:
    """Every image block of each file of `names`."""
    with ErofsSource(raw) as source:
        paths = {node: os.fsdecode(path) for path, node in walk(source.root)}
        found: dict[str, list[int]] = {name: [] for name in names}
        for block, node, _ in source.blocks_of(BLOCK):
            if paths[node] in found:
                found[paths[node]].append(block)
    return found


def test_a_recorded_start_comes_first(lazyfs: Lazyfs, tmp_path: Path) -> None:
    tree = make_sample_tree(tmp_path / "tree", 3 * 1024 * 1024, seed=5)
    files = sorted(str(path.relative_to(tree)) for path in tree.rglob("*")
                   if path.is_file() and not path.is_symlink()
                   and path.stat().st_size > 2 * BLOCK)
    read = [files[-1], files[len(files) // 2], files[3]]  # against the layout's order
    served = tmp_path / "served"
    served.mkdir()
    _convert(str(tree), "-o", str(served / "layer.blob"))
    first = tmp_path / "first"
    first.mkdir()
    recorded = tmp_path / "start.json"
    lazyfs.mount(str(served / "layer.blob"), str(first), "--record", str(recorded),
                 "--no-disk-cache", mountpoint=first)
    for name in read:
        assert (first / name).read_bytes() == (tree / name).read_bytes()
    assert lazyfs.run("umount", str(first)).returncode == 0
    (entry,) = parse_prefetch_list(recorded.read_bytes(), str(recorded)).layers
    assert entry.blocks and entry.block_size == BLOCK
    assert len(entry.layout) == 32 and entry.layout == json.loads(
        (served / "layer.descriptor.json").read_text())["annotations"]["dev.lazyfs.layout"]

    ordered = tmp_path / "ordered"
    ordered.mkdir()
    summary = _convert(str(tree), "-o", str(ordered / "layer.blob"), "--startup-order",
                       str(recorded))
    assert "start-up    blocks first up to byte" in summary
    raw = tmp_path / "ordered.erofs"
    decode_seekable(ordered / "layer.blob", raw)
    fsck_erofs(raw)
    descriptor = json.loads((ordered / "layer.descriptor.json").read_text())
    carried = parse_prefetch_annotation(descriptor["annotations"]["dev.lazyfs.prefetch"], "d")
    startup_end_chunk = len(carried.chunks)
    blocks = _first_blocks(raw, read)
    # Each file read is whole in the start-up region, and they come in the order read.
    assert all(max(found) < startup_end_chunk * 64 * 1024 // BLOCK for found in blocks.values())
    starts = [min(blocks[name]) for name in read]
    assert starts == sorted(starts)
    for name in read:
        assert blocks[name] == list(range(min(blocks[name]), min(blocks[name]) +
                                          len(blocks[name])))

    second = tmp_path / "second"
    second.mkdir()
    again = tmp_path / "again.json"
    lazyfs.mount(str(ordered / "layer.blob"), str(second), "--no-disk-cache",
                 "--record", str(again), mountpoint=second)
    assert compare_trees(scan_directory(tree), scan_directory(second)) == []
    assert lazyfs.run("umount", str(second)).returncode == 0
    refused = lazyfs.run("convert", str(tree), "-o", str(tmp_path / "x.blob"),
                         "--startup-order", str(again))
    assert refused.returncode != 0 and "laid out otherwise" in refused.stderr
