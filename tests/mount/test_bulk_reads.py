"""Bulk reads through a lazy mount: a large file read in order reaches the daemon as large
FUSE requests (the kernel's readahead of the block file raised before EROFS is mounted on it),
and the daemon fetches what follows in a few large requests (its readahead grows)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.lazyfs_cli import REPO, Lazyfs
from tests.support.nginx import serve_directory

pytestmark = [pytest.mark.root, pytest.mark.network]

BIG_FILE_BYTES = 24 * 1024 * 1024


@pytest.fixture(scope="module")
def bulk_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source tree, served dir with layer.blob): one 24 MiB file, 512 KiB chunks."""
    work = tmp_path_factory.mktemp("bulk-layer")
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=bulk\n")
    rng = random.Random(3)
    with open(tree / "weights.bin", "wb") as stream:
        for _ in range(BIG_FILE_BYTES // (1 << 20)):
            half = rng.randbytes(1 << 19)
            stream.write(half + half)  # compresses 2:1, as weights about do
    served = work / "served"
    served.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "convert", str(tree), "-o", str(served / "layer.blob")],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return tree, served


def test_a_large_file_read_in_order_comes_in_large_requests(
    lazyfs: Lazyfs, mountpoint: Path, bulk_layer: tuple[Path, Path]
) -> None:
    tree, served = bulk_layer
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), mountpoint=mountpoint)
        with open(mountpoint / "weights.bin", "rb", buffering=0) as stream:
            data = bytearray()
            while piece := stream.read(1 << 20):
                data += piece
        assert data == (tree / "weights.bin").read_bytes()
        result = lazyfs.run("stats", str(mountpoint), "--json")
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        daemon = stats["daemon"]
        # The kernel asked for more than its default 128 KiB at a time.
        assert daemon["read_bytes"] / daemon["reads"] > 256 * 1024, daemon
        layer = next(iter(stats["layers"].values()))
        # The file's chunks fetched in a few requests that grow, not one a chunk or two.
        assert layer["chunks_fetched"] == layer["chunk_count"], layer
        assert layer["chunk_fetches"] * 3 <= layer["chunk_count"], layer
        assert lazyfs.run("umount", str(mountpoint)).returncode == 0
