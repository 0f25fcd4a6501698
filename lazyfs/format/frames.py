"""Zstd frames: skippable frames (metadata carriers) and walking standard frames.

Walking a frame's block headers gives its exact compressed length without decoding it, which
lets a reader check that a chunk's bytes are exactly one frame, and bound what it decodes.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyfs.format.errors import BadMagicError, FieldError, FrameDecodeError, TruncatedError

if TYPE_CHECKING:
    import zstandard

ZSTD_MAGIC = 0xFD2FB528
ZSTD_MAGIC_BYTES = struct.pack("<I", ZSTD_MAGIC)
SKIPPABLE_MAGIC_MIN = 0x184D2A50
SKIPPABLE_MAGIC_MAX = 0x184D2A5F
SKIPPABLE_HEADER_SIZE = 8
_MAX_SKIPPABLE_PAYLOAD = 0xFFFFFFFF


@dataclass(frozen=True)
class SkippableFrame:
    """A zstd skippable frame: `magic | payload length | payload`."""

    magic: int
    payload: bytes

    @property
    def size(self) -> int:
        return SKIPPABLE_HEADER_SIZE + len(self.payload)


def is_skippable_magic(magic: int) -> bool:
    return SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX


def parse_skippable_header(buf: bytes, offset: int = 0, what: str = "skippable frame") -> int:
    """Check the 8-byte header at the start of `buf`; return the payload length.

    `offset` is where `buf` sits in the blob, used only in messages.
    Raises TruncatedError or BadMagicError.
    """
    if len(buf) < SKIPPABLE_HEADER_SIZE:
        raise TruncatedError(f"{what} header", offset, SKIPPABLE_HEADER_SIZE, len(buf))
    magic, payload_size = struct.unpack_from("<II", buf, 0)
    if not is_skippable_magic(magic):
        raise BadMagicError(
            what, "magic", offset, "0x184D2A50..0x184D2A5F (zstd skippable frame)", f"0x{magic:08X}"
        )
    return int(payload_size)


def parse_skippable_frame(
    buf: bytes, offset: int = 0, what: str = "skippable frame"
) -> SkippableFrame:
    """Parse a whole skippable frame at the start of `buf` (trailing bytes are ignored)."""
    payload_size = parse_skippable_header(buf, offset, what)
    end = SKIPPABLE_HEADER_SIZE + payload_size
    if len(buf) < end:
        raise TruncatedError(f"{what} payload", offset + SKIPPABLE_HEADER_SIZE, payload_size,
                             len(buf) - SKIPPABLE_HEADER_SIZE)
    magic = struct.unpack_from("<I", buf, 0)[0]
    return SkippableFrame(magic=magic, payload=bytes(buf[SKIPPABLE_HEADER_SIZE:end]))


def serialize_skippable_frame(payload: bytes, magic: int = SKIPPABLE_MAGIC_MIN) -> bytes:
    if not is_skippable_magic(magic):
        raise ValueError(f"0x{magic:08X} is not a skippable frame magic")
    if len(payload) > _MAX_SKIPPABLE_PAYLOAD:
        raise ValueError(f"skippable payload of {len(payload)} bytes exceeds 4 GiB")
    return struct.pack("<II", magic, len(payload)) + payload


@dataclass(frozen=True)
class ZstdFrameInfo:
    """What a standard zstd frame's headers say, found without decoding it."""

    compressed_size: int
    content_size: int | None
    block_count: int
    has_checksum: bool


_FCS_FIELD_SIZES = (0, 2, 4, 8)
_DICT_ID_FIELD_SIZES = (0, 1, 2, 4)
_BLOCK_RAW, _BLOCK_RLE, _BLOCK_COMPRESSED = 0, 1, 2


def walk_zstd_frame(buf: bytes | memoryview, offset: int = 0) -> ZstdFrameInfo:
    """Walk the standard zstd frame at the start of `buf` by its headers.

    Returns its exact compressed size (as ZSTD_findFrameCompressedSize would) and declared
    content size. Raises BadMagicError, FieldError or TruncatedError naming blob `offset`s.
    """
    view = memoryview(buf)
    if len(view) < 5:
        raise TruncatedError("zstd frame header", offset, 5, len(view))
    magic = struct.unpack_from("<I", view, 0)[0]
    if magic != ZSTD_MAGIC:
        raise BadMagicError("zstd frame", "magic", offset, "0xFD2FB528", f"0x{magic:08X}")
    descriptor = view[4]
    fcs_flag = descriptor >> 6
    single_segment = bool(descriptor & 0x20)
    if descriptor & 0x08:
        raise FieldError("zstd frame", "frame header descriptor", offset + 4,
                         "reserved bit 3 clear", f"0x{descriptor:02X}")
    has_checksum = bool(descriptor & 0x04)
    dict_id_size = _DICT_ID_FIELD_SIZES[descriptor & 0x03]
    fcs_size = _FCS_FIELD_SIZES[fcs_flag] if (fcs_flag or not single_segment) else 1
    position = 5 + (0 if single_segment else 1) + dict_id_size
    if len(view) < position + fcs_size:
        raise TruncatedError("zstd frame header", offset, position + fcs_size, len(view))
    content_size: int | None = None
    if fcs_size:
        content_size = int.from_bytes(view[position:position + fcs_size], "little")
        if fcs_size == 2:
            content_size += 256
    position += fcs_size
    block_count = 0
    while True:
        if len(view) < position + 3:
            raise TruncatedError("zstd block header", offset + position, 3, len(view) - position)
        header = int.from_bytes(view[position:position + 3], "little")
        last = header & 1
        block_type = (header >> 1) & 3
        block_size = header >> 3
        if block_type == 3:
            raise FieldError("zstd frame", "block type", offset + position, "0, 1 or 2",
                             "3 (reserved)")
        block_end = position + 3 + (1 if block_type == _BLOCK_RLE else block_size)
        if len(view) < block_end:
            raise TruncatedError("zstd block", offset + position, block_end - position,
                                 len(view) - position)
        position = block_end
        block_count += 1
        if last:
            break
    if has_checksum:
        if len(view) < position + 4:
            raise TruncatedError("zstd frame checksum", offset + position, 4,
                                 len(view) - position)
        position += 4
    return ZstdFrameInfo(position, content_size, block_count, has_checksum)


_thread_state = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """One decompressor per thread: zstandard contexts are not safe to share across threads."""
    import zstandard  # imported on first use: `lazyfs --version` and the like never decode

    dctx = getattr(_thread_state, "dctx", None)
    if dctx is None:
        dctx = _thread_state.dctx = zstandard.ZstdDecompressor()
    return dctx


def decode_chunk_frame(frame: bytes, expected_size: int, chunk_index: int, offset: int) -> bytes:
    """Decode one data frame that must be exactly one zstd frame of exactly `expected_size` bytes.

    Output is bounded by `expected_size`, so a hostile frame cannot expand without limit.
    Raises FrameDecodeError naming the chunk, its blob offset, expected and found sizes.
    """
    where = f"chunk {chunk_index} (frame at offset {offset})"
    try:
        info = walk_zstd_frame(frame, offset)
    except (FieldError, TruncatedError) as exc:
        raise FrameDecodeError(f"{where}: not a valid zstd frame: {exc}") from None
    if info.compressed_size != len(frame):
        raise FrameDecodeError(
            f"{where}: zstd frame is {info.compressed_size} bytes but the chunk table gives it "
            f"{len(frame)} bytes"
        )
    if info.content_size is not None and info.content_size != expected_size:
        raise FrameDecodeError(
            f"{where}: frame declares {info.content_size} decoded bytes, expected {expected_size}"
        )
    import zstandard

    try:
        data = _decompressor().decompress(frame, max_output_size=max(expected_size, 1))
    except zstandard.ZstdError as exc:
        raise FrameDecodeError(
            f"{where}: does not decode to {expected_size} bytes ({exc}): corrupt, or larger "
            "than a chunk"
        ) from None
    if len(data) != expected_size:
        raise FrameDecodeError(
            f"{where}: decoded to {len(data)} bytes, expected exactly {expected_size}"
        )
    return data


# The most a zstd block decodes to (the format's Block_Maximum_Size).
BLOCK_MAX_DECODED = 128 * 1024


class FrameStreamDecoder:
    """Decodes one chunk's zstd frame from pieces as they arrive, to exactly `expected_size`.

    Only whole blocks reach zstd, and only as many as the chunk can still take: a raw or RLE
    block's decoded size is in its header, a compressed block's is at most 128 KiB. So a
    hostile frame is refused after at most one block more than its chunk, never after
    gigabytes. One decoder per frame, used by one thread at a time (it keeps zstd's state).
    """

    def __init__(self, expected_size: int, chunk_index: int, frame_offset: int,
                 frame_size: int) -> None:
        import zstandard

        self._zstd = zstandard.ZstdDecompressor().decompressobj()
        self._error = zstandard.ZstdError
        self._expected = expected_size
        self._where = f"chunk {chunk_index} (frame at offset {frame_offset})"
        self._frame_offset = frame_offset
        self._frame_size = frame_size
        self._pending = bytearray()
        self._consumed = 0  # frame bytes handed to zstd
        self._header_done = False
        self._has_checksum = False
        self._last_block_done = False
        self.decoded = 0

    def feed(self, data: bytes | memoryview) -> bytes:
        """Take the next bytes of the frame; return what every whole block so far decodes to.
        Raises FrameDecodeError (corrupt, or more than the chunk's size)."""
        if self._consumed + len(self._pending) + len(data) > self._frame_size:
            raise FrameDecodeError(f"{self._where}: more than the frame's {self._frame_size} "
                                   "bytes fed")
        self._pending += data
        out: list[bytes] = []
        while True:
            cut, bound = self._whole_units()
            if not cut:
                break
            try:
                decoded = self._zstd.decompress(bytes(self._pending[:cut]))
            except self._error as exc:
                raise FrameDecodeError(f"{self._where}: not a valid zstd frame ({exc})") from None
            del self._pending[:cut]
            self._consumed += cut
            self.decoded += len(decoded)
            if self.decoded > self._expected:
                raise FrameDecodeError(f"{self._where}: decodes to more than the chunk's "
                                       f"{self._expected} bytes")
            out.append(decoded)
            if bound == 0 and not self._pending:
                break
        return b"".join(out)

    def finish(self) -> None:
        """Check that the whole frame came and decoded to exactly the chunk's size. Raises
        FrameDecodeError."""
        if self._consumed != self._frame_size or not self._zstd.eof:
            raise FrameDecodeError(
                f"{self._where}: zstd frame does not end at the {self._frame_size} bytes the "
                "chunk table gives it"
            )
        if self.decoded != self._expected:
            raise FrameDecodeError(
                f"{self._where}: decoded to {self.decoded} bytes, expected exactly "
                f"{self._expected}"
            )

    def _whole_units(self) -> tuple[int, int]:
        """How many pending bytes form whole units (the header, blocks, the checksum) that may
        go to zstd now, and the most they decode to. (0, 0) while none is whole."""
        view = memoryview(self._pending)
        position = 0
        if not self._header_done:
            size = self._header_size(view)
            if size is None:
                return 0, 0
            self._header_done = True
            position = size
        room = self._expected - self.decoded
        exact = compressed = 0  # decoded bytes of the raw and RLE blocks taken, compressed ones
        while not self._last_block_done:
            if len(view) < position + 3:
                break
            header = int.from_bytes(view[position:position + 3], "little")
            block_type, block_size = (header >> 1) & 3, header >> 3
            at = self._frame_offset + self._consumed + position
            if block_type == 3:
                raise FieldError("zstd frame", "block type", at, "0, 1 or 2", "3 (reserved)")
            end = position + 3 + (1 if block_type == _BLOCK_RLE else block_size)
            last = bool(header & 1)
            if last and self._has_checksum:
                end += 4
            if len(view) < end:
                break
            if block_type == _BLOCK_COMPRESSED:
                most = BLOCK_MAX_DECODED
            elif exact + block_size > room:
                raise FrameDecodeError(f"{self._where}: a block at offset {at} decodes past "
                                       f"the chunk's {self._expected} bytes")
            else:
                most = block_size
            bound = exact + compressed * BLOCK_MAX_DECODED
            if bound and bound + most > room + BLOCK_MAX_DECODED:
                break  # decode what is there first: the chunk may be full before this block
            if block_type == _BLOCK_COMPRESSED:
                compressed += 1
            else:
                exact += block_size
            position = end
            self._last_block_done = last
        return position, exact + compressed * BLOCK_MAX_DECODED

    def _header_size(self, view: memoryview) -> int | None:
        """The frame header's size once it is all there (checked), else None."""
        if len(view) < 6:
            return None
        magic = struct.unpack_from("<I", view, 0)[0]
        if magic != ZSTD_MAGIC:
            raise BadMagicError("zstd frame", "magic", self._frame_offset, "0xFD2FB528",
                                f"0x{magic:08X}")
        descriptor = view[4]
        single_segment = bool(descriptor & 0x20)
        fcs_flag = descriptor >> 6
        fcs_size = _FCS_FIELD_SIZES[fcs_flag] if (fcs_flag or not single_segment) else 1
        size = 5 + (0 if single_segment else 1) + _DICT_ID_FIELD_SIZES[descriptor & 0x03]
        if len(view) < size + fcs_size:
            return None
        self._has_checksum = bool(descriptor & 0x04)
        if fcs_size:
            content_size = int.from_bytes(view[size:size + fcs_size], "little")
            content_size += 256 if fcs_size == 2 else 0
            if content_size != self._expected:
                raise FrameDecodeError(f"{self._where}: frame declares {content_size} decoded "
                                       f"bytes, expected {self._expected}")
        return size + fcs_size
