"""Source detection by content, decompressing tar streams, strict tar reading."""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

from converter.errors import ConvertError, UnsupportedSourceError
from converter.source import (
    SourceKind,
    detect_source,
    iter_layer,
    looks_like_tar,
    open_tar_stream,
    read_member,
)
from tests.converter import LayerBuilder, rich_layer

EROFS_MAGIC_LE = bytes.fromhex("e2e1f5e0")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _v7_tar() -> bytes:
    """An old-style tar: no `ustar` magic, only a valid header checksum."""
    header = bytearray(512)
    header[0:7] = b"old.txt"
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"00000000003\0"
    header[136:148] = b"14000000000\0"
    header[156:157] = b"0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"old".ljust(512, b"\0") + bytes(1024)


def test_directory(tmp_path: Path) -> None:
    assert detect_source(tmp_path) is SourceKind.DIRECTORY


@pytest.mark.parametrize(
    ("name", "make", "kind", "first_names"),
    [
        # Names deliberately lie: detection looks at content only.
        ("layer.tar.gz", lambda: rich_layer().tar(), SourceKind.TAR, [".", "etc"]),
        ("layer.tar", lambda: rich_layer().gzip(), SourceKind.TAR_GZIP, [".", "etc"]),
        ("layer.erofs", lambda: rich_layer().zstd(), SourceKind.TAR_ZSTD, [".", "etc"]),
        ("blob", lambda: rich_layer().zstd(frame_bytes=1000), SourceKind.TAR_ZSTD, [".", "etc"]),
        ("empty-layer", lambda: gzip.compress(bytes(1024)), SourceKind.TAR_GZIP, []),
        ("empty.tar", lambda: bytes(10240), SourceKind.TAR, []),
        ("old.tar", _v7_tar, SourceKind.TAR, ["old.txt"]),
    ],
)
def test_tar_kinds(
    tmp_path: Path,
    name: str,
    make: Callable[[], bytes],
    kind: SourceKind,
    first_names: list[str],
) -> None:
    path = _write(tmp_path, name, make())
    assert detect_source(path) is kind
    with open_tar_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
        names = [member.name for member in archive]
    assert names[:2] == first_names


def test_raw_erofs_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello")
    image = tmp_path / "image.tar"  # the name says tar; the content says EROFS
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(src)], check=True)
    assert detect_source(image) is SourceKind.EROFS_IMAGE


def test_seekable_erofs_blob(tmp_path: Path) -> None:
    image = bytes(1024) + EROFS_MAGIC_LE + bytes(4096 - 1028) + b"\x01" * 8192
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    blob = b"".join(compressor.compress(image[i : i + 4096]) for i in range(0, len(image), 4096))
    path = _write(tmp_path, "layer.tar.zst", blob)
    assert detect_source(path) is SourceKind.SEEKABLE_EROFS
    with pytest.raises(UnsupportedSourceError, match="seekable-erofs source, not a tar"):
        open_tar_stream(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"#!/bin/sh\necho not a layer\n" * 40, r"first bytes: 23 21 2f 62"),
        (b"", r"first bytes: none, the stream is empty"),
        (gzip.compress(b"plain text, not a tar" * 100), r"gzip stream does not contain a tar"),
        (
            zstandard.ZstdCompressor().compress(b"\x01" * 4096),
            r"zstd stream holds neither a tar archive nor an EROFS image.*01 01 01",
        ),
        (b"\x1f\x8b\x08\x00garbage", r"tar\+gzip stream is corrupt or truncated"),
        (bytes(1024) + b"\x01" * 1024, r"first bytes: 00 00 00"),
    ],
)
def test_unsupported_names_file_and_bytes(tmp_path: Path, data: bytes, message: str) -> None:
    path = _write(tmp_path, "thing.bin", data)
    with pytest.raises(UnsupportedSourceError, match=message) as info:
        detect_source(path)
    assert str(path) in str(info.value)


def test_old_style_header_with_bad_checksum_is_not_tar() -> None:
    header = bytearray(_v7_tar()[:512])
    header[0] ^= 0x01
    assert not looks_like_tar(bytes(header) + bytes(512))


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="cannot read source"):
        detect_source(tmp_path / "nope")


def test_open_tar_stream_decodes_multiframe_zstd(tmp_path: Path) -> None:
    layer = rich_layer()
    path = _write(tmp_path, "x", layer.zstd(frame_bytes=4096))
    with open_tar_stream(path) as stream:
        decoded = b"".join(iter(lambda: stream.read(65536), b""))
    assert decoded == layer.tar()


# --- strict tar reading -----------------------------------------------------------------------


def _names(data: bytes) -> list[str]:
    return _names_from(io.BytesIO(data))


def test_iter_layer_reads_every_member() -> None:
    names = _names(rich_layer().tar())
    assert names[:3] == [".", "etc", "etc/passwd"]
    assert names.count("replaced") == 2


def test_truncated_member_data_is_an_error() -> None:
    data = LayerBuilder().file("a", b"x" * 5000).file("b", b"y").tar()
    cut = data.index(b"x" * 5000) + 100
    with pytest.raises(ConvertError, match="'a': content truncated or corrupt"):
        _names(data[:cut])


def test_archive_without_end_marker_is_an_error() -> None:
    data = LayerBuilder().file("a", b"x" * 100).tar()
    body = data.rstrip(b"\0")
    cut = -(-len(body) // 512) * 512  # the end of the last data block, before the zero blocks
    with pytest.raises(ConvertError, match="without an end-of-archive marker"):
        _names(data[:cut])


def test_corrupt_header_in_the_middle_is_an_error() -> None:
    data = bytearray(LayerBuilder().file("first", b"1").file("second", b"2").tar())
    second = data.index(b"second")
    data[second + 130] ^= 0x55  # inside the header's size field: checksum mismatch
    with pytest.raises(ConvertError, match="corrupt after entry 'first'"):
        _names(bytes(data))


def test_oversized_pax_header_is_refused() -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 64 << 20
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    with pytest.raises(ConvertError, match="larger than"):
        _names(header + bytes(1024))


def test_corrupt_gzip_trailer_is_an_error(tmp_path: Path) -> None:
    data = bytearray(rich_layer().gzip())
    data[-6] ^= 0xFF  # CRC32 of the uncompressed data, checked only at the end of the stream
    path = _write(tmp_path, "layer", bytes(data))
    stream = open_tar_stream(path, SourceKind.TAR_GZIP)
    with stream, pytest.raises(ConvertError, match="corrupt after the end of the tar"):
        _names_from(stream)


def test_corrupt_zstd_frame_is_an_error(tmp_path: Path) -> None:
    data = bytearray(rich_layer().zstd())
    data[len(data) // 2] ^= 0xFF
    path = _write(tmp_path, "layer", bytes(data))
    stream = open_tar_stream(path, SourceKind.TAR_ZSTD)
    with stream, pytest.raises(ConvertError, match="corrupt"):
        _names_from(stream)


def _names_from(stream: BinaryIO) -> list[str]:
    names = []
    for archive, member in iter_layer(stream):
        for _ in read_member(archive, member):
            pass
        names.append(member.name)
    return names
