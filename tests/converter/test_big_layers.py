"""Big layers convert with lazyfs's writer: an image beyond 2 GiB (mkfs.erofs 1.5 copied its
staged data with copy_file_range and failed there) and a file beyond 4 GiB (an extended inode,
a 64-bit size), checked by fsck.erofs 1.5 and through the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from converter.layer import ConvertOptions, convert_layer
from converter.mkfs import fsck_erofs
from converter.tree import compare_trees, scan_directory
from lazyfs.eager.check import unpack_blob
from tests.converter import mounted_erofs

GIB = 1 << 30
BLOCK = 4096


def _distinct_blocks(path: Path, size: int) -> None:
    """`size` bytes of blocks that all differ (each starts with its number), else zeros:
    nothing to share, little to compress."""
    batch = 256
    with open(path, "wb") as f:
        for first in range(0, size // BLOCK, batch):
            chunk = bytearray(batch * BLOCK)
            for number in range(batch):
                chunk[number * BLOCK:number * BLOCK + 8] = (first + number).to_bytes(8, "little")
            f.write(chunk)


@pytest.mark.slow
@pytest.mark.root
def test_an_image_beyond_2_gib_with_a_file_beyond_4_gib(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _distinct_blocks(src / "distinct.bin", 2 * GIB + 64 * BLOCK)
    with open(src / "sparse.bin", "wb") as f:
        f.truncate(4 * GIB + 12345)
        for offset in (0, 2 * GIB + 100, 4 * GIB):
            f.seek(offset)
            f.write(b"data at %d" % offset)
    (src / "small").write_bytes(b"small")
    out = tmp_path / "layer.blob"
    result = convert_layer(src, out, ConvertOptions())
    assert result.encoded.image_size > 2 * GIB
    raw = tmp_path / "layer.erofs"
    unpack_blob(out, raw, result.descriptor)
    fsck_erofs(raw)
    with mounted_erofs(raw, tmp_path / "mnt") as mounted:
        assert os.path.getsize(mounted / "sparse.bin") == 4 * GIB + 12345
        assert compare_trees(scan_directory(src), scan_directory(mounted)) == []
