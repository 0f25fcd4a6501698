"""What a conversion source is, decided by its content (magic bytes), never by its name.

A layer may be handed over as a directory, a tar (plain, gzip or zstd, as registries serve
them), a raw EROFS image, or a blob that is already seekable EROFS. Only a few KiB of the head
are read (and decompressed) to decide.

Tar sources are then read as streams: `open_tar_stream` decompresses incrementally and
`iter_layer` walks the members strictly (a truncated or corrupt archive is an error, not an
early end), for extraction and for the model of a layer alike.
"""

from __future__ import annotations

import enum
import gzip
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Self, cast

import zstandard

from converter.errors import ConvertError, UnsupportedSourceError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC = 0xE0F5E1E2
_EROFS_MAGIC_BYTES = EROFS_SUPER_MAGIC.to_bytes(4, "little")
_TAR_BLOCK = 512
# Enough decoded bytes for a tar header (512) and the EROFS superblock magic (1024 + 4).
_SNIFF_SIZE = 2048
CHUNK_SIZE = 1 << 20
# pax and GNU long-name headers are read whole by tarfile: cap them so a hostile layer
# cannot make us allocate gigabytes for one header.
_MAX_META_HEADER_BYTES = 16 << 20
_META_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, OSError)


class SourceKind(enum.Enum):
    """The kinds of input the converter accepts."""

    DIRECTORY = "directory"
    TAR = "tar"
    TAR_GZIP = "tar+gzip"
    TAR_ZSTD = "tar+zstd"
    EROFS_IMAGE = "erofs"
    SEEKABLE_EROFS = "seekable-erofs"

    @property
    def is_tar(self) -> bool:
        return self in (SourceKind.TAR, SourceKind.TAR_GZIP, SourceKind.TAR_ZSTD)


def looks_like_tar(head: bytes) -> bool:
    """Whether `head` (the first decoded bytes of a stream) starts a tar archive.

    True for a POSIX/GNU header (`ustar` at offset 257), an old-style header whose checksum is
    valid, or an empty archive (nothing but zero blocks, as in the canonical empty layer).
    """
    if len(head) < _TAR_BLOCK:
        return False
    block = head[:_TAR_BLOCK]
    if block[257:262] == b"ustar":
        return True
    if block.count(0) == _TAR_BLOCK:
        # An end-of-archive marker first: an empty tar, provided nothing but zeros follows in
        # what we have seen (an EROFS image also starts with 1024 zero bytes).
        return len(head) >= 2 * _TAR_BLOCK and head.count(0) == len(head)
    return _tar_checksum_ok(block)


def _tar_checksum_ok(block: bytes) -> bool:
    """Check an old-style (v7) tar header checksum: the sum of the header bytes, with the
    checksum field itself counted as spaces, written in octal at offset 148."""
    field = block[148:156].replace(b"\0", b" ").strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    stored = int(field, 8)
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    return stored == unsigned


def has_erofs_magic(head: bytes) -> bool:
    """Whether the EROFS superblock magic sits at byte 1024 of `head`."""
    end = EROFS_SUPER_OFFSET + 4
    return len(head) >= end and head[EROFS_SUPER_OFFSET:end] == _EROFS_MAGIC_BYTES


def detect_source(path: Path) -> SourceKind:
    """Return what `path` is, by content.

    Raises ConvertError when it cannot be read, UnsupportedSourceError when it is none of the
    SourceKind kinds (the message names the file and the first bytes found).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read source: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return SourceKind.DIRECTORY
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedSourceError(f"{path}: not a regular file or directory")
    try:
        with open(path, "rb") as f:
            raw = f.read(_SNIFF_SIZE)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read source: {e.strerror}") from None

    if raw.startswith(GZIP_MAGIC):
        head = _decoded_head(path, SourceKind.TAR_GZIP)
        if looks_like_tar(head):
            return SourceKind.TAR_GZIP
        raise UnsupportedSourceError(
            f"{path}: gzip stream does not contain a tar archive "
            f"(first decoded bytes: {_hex(head)})"
        )
    if raw.startswith(ZSTD_MAGIC):
        head = _decoded_head(path, SourceKind.TAR_ZSTD)
        if looks_like_tar(head):
            return SourceKind.TAR_ZSTD
        if has_erofs_magic(head):
            return SourceKind.SEEKABLE_EROFS
        raise UnsupportedSourceError(
            f"{path}: zstd stream holds neither a tar archive nor an EROFS image "
            f"(first decoded bytes: {_hex(head)})"
        )
    if looks_like_tar(raw):
        return SourceKind.TAR
    if has_erofs_magic(raw):
        return SourceKind.EROFS_IMAGE
    raise UnsupportedSourceError(
        f"{path}: not a directory, tar (plain, gzip, zstd), EROFS image or seekable EROFS "
        f"blob (first bytes: {_hex(raw)})"
    )


def open_tar_stream(path: Path, kind: SourceKind | None = None) -> BinaryIO:
    """Open a tar source as a stream of uncompressed tar bytes; the caller closes it.

    Decompression is incremental (gzip module, zstandard `stream_reader` across frames), so
    memory stays bounded whatever the layer size. A zstd stream cut short is not reported by
    the decoder itself; the tar reader reports the missing end-of-archive marker instead.
    Raises UnsupportedSourceError when `path` is not a tar source.
    """
    if kind is None:
        kind = detect_source(path)
    if not kind.is_tar:
        raise UnsupportedSourceError(f"{path}: is a {kind.value} source, not a tar archive")
    try:
        raw = open(path, "rb")  # noqa: SIM115 - ownership passes to the returned stream
    except OSError as e:
        raise ConvertError(f"{path}: cannot read source: {e.strerror}") from None
    if kind is SourceKind.TAR:
        return raw
    if kind is SourceKind.TAR_GZIP:
        # GzipFile is a BufferedIOBase: it has every BinaryIO method the callers use, but
        # typeshed does not declare it a BinaryIO (nor the zstd reader below).
        return cast(BinaryIO, _ClosingGzip(raw))
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return cast(BinaryIO, reader)


# --- reading a tar stream --------------------------------------------------------------------


class _BrokenTarError(Exception):
    """Raised from inside tarfile, where its own lenient end-of-archive handling would hide
    truncation or a corrupt header as a normal end of the archive."""


# tarfile's header exceptions are private, so typeshed does not declare them.
_EOFHeaderError: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EmptyHeaderError: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TruncatedHeaderError: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]
_InvalidHeaderError: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]


class _StrictTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        offset = tarfile_.offset
        try:
            return super().fromtarfile(tarfile_)
        except _EOFHeaderError:
            raise  # a zero block: the regular end of the archive
        except _EmptyHeaderError:
            raise _BrokenTarError(
                f"archive ends at offset {offset} without an end-of-archive marker (truncated?)"
            ) from None
        except (_TruncatedHeaderError, _InvalidHeaderError) as e:
            raise _BrokenTarError(f"bad tar header at offset {offset}: {e}") from None

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > _MAX_META_HEADER_BYTES:
            raise _BrokenTarError(
                f"metadata header of {self.size} bytes at offset {self.offset} is larger than "
                f"the {_MAX_META_HEADER_BYTES} byte limit"
            )
        # A private tarfile hook (the one place every header passes), absent from typeshed.
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member


def iter_layer(stream: BinaryIO) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Yield (archive, member) for each entry of an uncompressed tar stream, in order.

    A member's data can be read with `read_member` until the next one is requested. After the
    end-of-archive marker the rest of the stream is read, so a compressed stream's trailing
    checksum is verified. Raises ConvertError for a truncated or corrupt archive.
    """
    last = "(start of archive)"
    try:
        archive = tarfile.open(  # noqa: SIM115 - closed by the `with` below
            fileobj=stream,
            mode="r|",
            tarinfo=_StrictTarInfo,
            encoding="utf-8",
            errors="surrogateescape",
        )
    except (*_READ_ERRORS, _BrokenTarError) as e:
        raise ConvertError(f"layer is not a readable tar archive: {e}") from None
    with archive:
        while True:
            try:
                member = archive.next()
            except (*_READ_ERRORS, _BrokenTarError) as e:
                raise ConvertError(f"layer tar is corrupt after entry {last!r}: {e}") from None
            if member is None:
                break
            # tarfile keeps every member it has read; a stream needs none of them.
            # `members` is undocumented, so typeshed omits it; getmembers() would read ahead.
            archive.members.clear()  # type: ignore[attr-defined]
            yield archive, member
            last = member.name
    try:
        while stream.read(CHUNK_SIZE):
            pass
    except _READ_ERRORS as e:
        raise ConvertError(f"layer stream is corrupt after the end of the tar: {e}") from None


def read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    """Yield a regular file member's content in pieces of at most CHUNK_SIZE bytes (nothing
    for other members)."""
    if not member.isreg():
        return
    data = archive.extractfile(member)
    if data is None:
        return
    while True:
        try:
            piece = data.read(CHUNK_SIZE)
        except (*_READ_ERRORS, _BrokenTarError) as e:
            raise ConvertError(
                f"tar entry {member.name!r}: content truncated or corrupt: {e}"
            ) from None
        if not piece:
            return
        yield piece


class _ClosingGzip(gzip.GzipFile):
    """A GzipFile that also closes the file it reads from."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def _decoded_head(path: Path, kind: SourceKind) -> bytes:
    """The first decoded bytes of a compressed source (fewer if the stream is shorter)."""
    try:
        with open_tar_stream(path, kind) as stream:
            return read_up_to(stream, _SNIFF_SIZE)
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
        raise UnsupportedSourceError(
            f"{path}: {kind.value} stream is corrupt or truncated at its start: {e}"
        ) from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read source: {e}") from None


def read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes of `stream`, fewer only at its end (a read may return less)."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        piece = stream.read(remaining)
        if not piece:
            break
        parts.append(piece)
        remaining -= len(piece)
    return b"".join(parts)


def _hex(data: bytes, count: int = 16) -> str:
    if not data:
        return "none, the stream is empty"
    return data[:count].hex(" ")


__all__ = [
    "SourceKind",
    "detect_source",
    "has_erofs_magic",
    "iter_layer",
    "looks_like_tar",
    "open_tar_stream",
    "read_member",
]
