"""The compression algorithms an EROFS superblock lists: containerd's zstd vector, images
mkfs.erofs 1.5 makes, forged bitmaps, truncation and garbage."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.erofs.compression import (
    ALGORITHMS,
    EROFS_MAGIC,
    SUPERBLOCK_OFFSET,
    algorithm_name,
    compression_algorithms,
)
from lazyfs.format.errors import FieldError, FormatError, TruncatedError

HEAD_BYTES = SUPERBLOCK_OFFSET + 86


def superblock(incompat: int, bitmap: int, magic: int = EROFS_MAGIC) -> bytes:
    head = bytearray(SUPERBLOCK_OFFSET + 128)
    struct.pack_into("<I", head, SUPERBLOCK_OFFSET, magic)
    struct.pack_into("<IH", head, SUPERBLOCK_OFFSET + 80, incompat, bitmap)
    return bytes(head)


def image_head(blob: Path) -> bytes:
    """The first bytes of the raw EROFS image a seekable blob holds (its first frame)."""
    with open(blob, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return reader.read(4096)


def test_containerd_zstd_vector_lists_zstd(vectors_dir: Path) -> None:
    assert compression_algorithms(image_head(vectors_dir / "ctd-zstd-erofs.blob")) == ("zstd",)


def test_uncompressed_vector_lists_none(vectors_dir: Path) -> None:
    assert compression_algorithms(image_head(vectors_dir / "basic-noverity.blob")) == ()


@pytest.mark.parametrize(("options", "expected"), [
    ([], ()),
    (["-zlz4hc"], ()),  # lz4 without big physical clusters: no bitmap, lz4 is all it can be
    (["-zlz4hc", "-C65536"], ("lz4",)),
])
def test_images_of_the_installed_mkfs(tmp_path: Path, options: list[str],
                                      expected: tuple[str, ...]) -> None:
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs is not installed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"compressible " * 50_000)
    image = tmp_path / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", *options, str(image), str(src)], check=True,
                   capture_output=True)
    assert compression_algorithms(image.read_bytes()[:4096]) == expected


def test_every_bit_of_the_bitmap() -> None:
    assert compression_algorithms(superblock(0x2, 0b1010)) == ("lzma", "zstd")
    assert compression_algorithms(superblock(0x3, 0b1111)) == ALGORITHMS
    assert compression_algorithms(superblock(0x2, 1 << 5)) == ("algorithm 5",)
    # Without COMPR_CFGS the field is lz4's maximum distance, not a bitmap.
    assert compression_algorithms(superblock(0x1, 0xFFFF)) == ()
    assert algorithm_name(3) == "zstd" and algorithm_name(9) == "algorithm 9"


def test_not_an_erofs_image() -> None:
    with pytest.raises(FieldError, match=r"EROFS superblock: field magic at offset 1024: "
                                         r"expected 0xe0f5e1e2, found 0x0"):
        compression_algorithms(bytes(4096))


@given(st.integers(0, HEAD_BYTES - 1))
def test_any_truncation_is_the_truncation_error(size: int) -> None:
    with pytest.raises(TruncatedError):
        compression_algorithms(superblock(0x2, 0b1000)[:size])


@given(st.binary(min_size=HEAD_BYTES, max_size=HEAD_BYTES + 64))
def test_garbage_is_a_format_error_or_a_list(data: bytes) -> None:
    try:
        found = compression_algorithms(data)
    except FormatError:
        return
    assert all(isinstance(name, str) for name in found)
