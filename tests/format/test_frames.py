"""Skippable frames, walking zstd frames by their headers, and bounded decoding of chunk frames."""

from __future__ import annotations

import itertools
import random
import struct
import tracemalloc

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.format.chunk_table import HASH_SHA512, ChunkTable, frame_digest, verify_frame
from lazyfs.format.errors import (
    BadMagicError,
    FieldError,
    FormatError,
    FrameDecodeError,
    IntegrityError,
    TruncatedError,
)
from lazyfs.format.frames import (
    SKIPPABLE_HEADER_SIZE,
    SKIPPABLE_MAGIC_MAX,
    SKIPPABLE_MAGIC_MIN,
    ZSTD_MAGIC_BYTES,
    FrameStreamDecoder,
    decode_chunk_frame,
    parse_skippable_frame,
    parse_skippable_header,
    serialize_skippable_frame,
    walk_zstd_frame,
)
from tests.format import compress, flip, pattern

MiB = 1024 * 1024

# --- skippable frames --------------------------------------------------------------------------

magics = st.integers(SKIPPABLE_MAGIC_MIN, SKIPPABLE_MAGIC_MAX)


@settings(max_examples=100, deadline=None)
@given(magics, st.binary(max_size=2000), st.binary(max_size=20))
def test_skippable_frame_round_trips(magic, payload, trailing):
    frame = serialize_skippable_frame(payload, magic)
    assert len(frame) == SKIPPABLE_HEADER_SIZE + len(payload)
    parsed = parse_skippable_frame(frame + trailing)
    assert parsed.magic == magic
    assert parsed.payload == payload
    assert parsed.size == len(frame)
    assert parse_skippable_header(frame) == len(payload)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_any_truncated_skippable_frame_raises_truncated(payload, data):
    frame = serialize_skippable_frame(payload)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(TruncatedError) as caught:
        parse_skippable_frame(frame[:cut], offset=1000)
    assert 0 <= caught.value.available < caught.value.needed


def test_skippable_truncation_messages_name_the_offset():
    frame = serialize_skippable_frame(b"x" * 10)
    with pytest.raises(TruncatedError, match="header at offset 500 is truncated: needs 8"):
        parse_skippable_frame(frame[:5], offset=500)
    with pytest.raises(TruncatedError, match=r"payload at offset 508 .* needs 10 bytes, only 3"):
        parse_skippable_frame(frame[:11], offset=500)


@pytest.mark.parametrize("magic", [0, SKIPPABLE_MAGIC_MIN - 1, SKIPPABLE_MAGIC_MAX + 1,
                                   0xFD2FB528])
def test_skippable_frame_with_another_magic_is_rejected(magic):
    frame = struct.pack("<II", magic, 0)
    with pytest.raises(BadMagicError, match=f"field magic at offset 77: .* found 0x{magic:08X}"):
        parse_skippable_frame(frame, offset=77, what="chunk table frame")
    with pytest.raises(ValueError):
        serialize_skippable_frame(b"", magic)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_skippable_frame_raises_only_format_errors(garbage):
    try:
        frame = parse_skippable_frame(garbage)
    except FormatError:
        return
    assert frame.size <= len(garbage)


# --- walking zstd frames -----------------------------------------------------------------------

INPUTS = {
    "empty": b"",
    "one-byte": b"x",
    "small": pattern(1000),
    "multi-block": pattern(300_000, seed=5),
    "incompressible": random.Random(1).randbytes(200_000),  # raw blocks
    "zeros": bytes(MiB),  # RLE blocks
}


@pytest.mark.parametrize("name", sorted(INPUTS))
@pytest.mark.parametrize("level", [-5, 1, 3, 12])
@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no-checksum"])
@pytest.mark.parametrize("content_size", [True, False], ids=["size", "no-size"])
def test_walk_finds_the_real_compressed_length(name, level, checksum, content_size):
    data = INPUTS[name]
    frame = compress(data, level=level, checksum=checksum, content_size=content_size)
    info = walk_zstd_frame(frame + b"trailing bytes" + frame)
    assert info.compressed_size == len(frame)
    assert info.has_checksum == checksum
    assert info.block_count >= 1
    if content_size:
        assert info.content_size == len(data)
    else:
        assert info.content_size is None
    assert decode_chunk_frame(frame, len(data), 0, 0) == data


def _hand_built_frame(fcs_flag: int, single_segment: bool, dict_flag: int, checksum: bool,
                      content: bytes) -> bytes:
    """A frame of one raw and one RLE block, with every header field size the format allows."""
    descriptor = fcs_flag << 6 | int(single_segment) << 5 | int(checksum) << 2 | dict_flag
    header = ZSTD_MAGIC_BYTES + bytes([descriptor])
    if not single_segment:
        header += bytes([11 << 3])  # window 2 MiB
    header += bytes(range(1, 1 + (0, 1, 2, 4)[dict_flag]))
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    fcs_value = len(content) - 256 if fcs_flag == 1 else len(content)
    header += fcs_value.to_bytes(fcs_size, "little") if fcs_size else b""
    raw, rle = content[:-10], content[-10:]
    assert set(rle) == {rle[0]}
    blocks = (len(raw) << 3 | 0 << 1 | 0).to_bytes(3, "little") + raw
    blocks += (len(rle) << 3 | 1 << 1 | 1).to_bytes(3, "little") + rle[:1]
    return header + blocks + (b"\xde\xad\xbe\xef" if checksum else b"")


@pytest.mark.parametrize("fcs_flag", [0, 1, 2, 3])
@pytest.mark.parametrize("single_segment", [False, True], ids=["window", "single-segment"])
@pytest.mark.parametrize("dict_flag", [0, 1, 2, 3])
@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
def test_walk_every_header_layout(fcs_flag, single_segment, dict_flag, checksum):
    size = 200 if (fcs_flag == 0 and single_segment) else 300
    content = pattern(size - 10) + b"z" * 10
    frame = _hand_built_frame(fcs_flag, single_segment, dict_flag, checksum, content)
    info = walk_zstd_frame(frame + b"\x00" * 9)
    assert info.compressed_size == len(frame)
    assert info.block_count == 2
    assert info.has_checksum == checksum
    declared = fcs_flag or single_segment
    assert info.content_size == (len(content) if declared else None)
    if dict_flag == 0 and not checksum:
        # The hand-built frame is a real one: zstd decodes it to the content.
        assert decode_chunk_frame(frame, len(content), 0, 0) == content
    for cut in range(len(frame)):
        with pytest.raises(TruncatedError):
            walk_zstd_frame(frame[:cut])


def test_walk_rejects_reserved_bits_and_block_type():
    frame = compress(b"hello" * 50)
    with pytest.raises(FieldError, match="frame header descriptor at offset 104"):
        walk_zstd_frame(frame[:4] + bytes([frame[4] | 0x08]) + frame[5:], offset=100)
    reserved_block = ZSTD_MAGIC_BYTES + b"\x20\x05" + (0b111).to_bytes(3, "little")
    with pytest.raises(FieldError, match=r"block type at offset 6: .*3 \(reserved\)"):
        walk_zstd_frame(reserved_block)
    with pytest.raises(BadMagicError, match="zstd frame: field magic at offset 9"):
        walk_zstd_frame(serialize_skippable_frame(b"abc"), offset=9)


SAMPLE_FRAME = compress(pattern(300_000, seed=9), level=1)  # three blocks


def test_every_truncation_of_a_real_frame_raises_truncated():
    for cut in range(len(SAMPLE_FRAME)):
        with pytest.raises(TruncatedError) as caught:
            walk_zstd_frame(SAMPLE_FRAME[:cut], offset=4096)
        assert 0 <= caught.value.available < caught.value.needed
        assert caught.value.offset >= 4096


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(ZSTD_MAGIC_BYTES.__add__)))
def test_walking_garbage_raises_only_format_errors(garbage):
    try:
        info = walk_zstd_frame(garbage)
    except FormatError:
        return
    assert info.compressed_size <= len(garbage)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(ZSTD_MAGIC_BYTES.__add__)),
       st.integers(1, 4096))
def test_decoding_garbage_raises_only_frame_decode_errors(garbage, expected_size):
    try:
        data = decode_chunk_frame(garbage, expected_size, 3, 99)
    except FrameDecodeError as exc:
        assert "chunk 3 (frame at offset 99)" in str(exc)
        return
    assert len(data) == expected_size


# --- decoding chunk frames ---------------------------------------------------------------------

CHUNK = pattern(5000, seed=1)


@pytest.mark.parametrize("content_size", [True, False], ids=["size", "no-size"])
def test_a_frame_that_decodes_to_fewer_bytes_is_rejected(content_size):
    frame = compress(CHUNK[:4000], content_size=content_size)
    expected = "frame declares 4000 decoded bytes" if content_size else "decoded to 4000 bytes"
    with pytest.raises(FrameDecodeError, match=f"chunk 2 \\(frame at offset 777\\): {expected}"):
        decode_chunk_frame(frame, 5000, 2, 777)


@pytest.mark.parametrize("content_size", [True, False], ids=["size", "no-size"])
def test_a_frame_that_decodes_to_more_bytes_is_rejected(content_size):
    frame = compress(CHUNK, content_size=content_size)
    with pytest.raises(FrameDecodeError, match="chunk 2 \\(frame at offset 777\\)"):
        decode_chunk_frame(frame, 4999, 2, 777)


def test_a_bomb_fails_fast_without_allocating_its_size():
    compressor = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    zeros = bytes(MiB)
    frame = b"".join(compressor.compress(zeros) for _ in range(64)) + compressor.flush()
    assert walk_zstd_frame(frame).content_size is None
    tracemalloc.start()
    try:
        with pytest.raises(FrameDecodeError, match="does not decode to 4194304 bytes"):
            decode_chunk_frame(frame, 4 * MiB, 0, 0)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * MiB, f"decoding the 64 MiB bomb peaked at {peak} bytes"


def test_a_bomb_declaring_its_size_is_rejected_before_decoding():
    frame = compress(bytes(64 * MiB), level=1, content_size=True)
    tracemalloc.start()
    try:
        with pytest.raises(FrameDecodeError, match="declares 67108864 decoded bytes"):
            decode_chunk_frame(frame, 4 * MiB, 0, 0)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB


@pytest.mark.parametrize("extra", [b"\x00", b"garbage", compress(b"second frame")],
                         ids=["one-byte", "garbage", "second-frame"])
def test_bytes_after_the_frame_are_rejected(extra):
    frame = compress(CHUNK)
    with pytest.raises(FrameDecodeError, match=(
            f"zstd frame is {len(frame)} bytes but the chunk table gives it "
            f"{len(frame) + len(extra)} bytes")):
        decode_chunk_frame(frame + extra, len(CHUNK), 1, 10)


def test_a_truncated_frame_is_rejected():
    frame = compress(CHUNK)
    for cut in (0, 3, 10, len(frame) // 2, len(frame) - 1):
        with pytest.raises(FrameDecodeError, match=r"not a valid zstd frame: .*truncated"):
            decode_chunk_frame(frame[:cut], len(CHUNK), 1, 10)


def test_a_skippable_frame_is_not_a_chunk():
    with pytest.raises(FrameDecodeError, match=r"not a valid zstd frame: .*magic"):
        decode_chunk_frame(serialize_skippable_frame(b"x" * 20), 20, 0, 0)


def test_a_corrupted_byte_is_rejected():
    frame = compress(CHUNK)
    # A byte in the middle of the compressed block and a byte of the content checksum.
    for position in (len(frame) // 2, len(frame) - 1):
        with pytest.raises(FrameDecodeError, match="chunk 4"):
            decode_chunk_frame(flip(frame, position, 0x10), len(CHUNK), 4, 0)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_flipped_bit_never_decodes_to_wrong_data_and_never_verifies(data):
    frame = compress(CHUNK)
    position = data.draw(st.integers(0, len(frame) - 1))
    corrupted = flip(frame, position, 1 << data.draw(st.integers(0, 7)))
    try:
        decoded = decode_chunk_frame(corrupted, len(CHUNK), 0, 0)
    except FrameDecodeError:
        pass
    else:  # the flip hit a field that does not change the output (e.g. the window size)
        assert decoded == CHUNK
    table = ChunkTable(len(CHUNK), len(CHUNK), HASH_SHA512, (0,), (frame_digest(frame),))
    verify_frame(table, 0, frame, 0)
    with pytest.raises(IntegrityError, match="chunk 0 \\(frame at offset 0"):
        verify_frame(table, 0, corrupted, 0)


def test_frame_decode_error_is_an_integrity_error():
    # The reader maps every integrity failure, decode errors included, to EIO.
    assert issubclass(FrameDecodeError, IntegrityError)


# --- decoding a frame as it arrives ------------------------------------------------------------

STREAMED = pattern(300 * 1024, seed=4) + bytes(200 * 1024) + random.Random(4).randbytes(150_000)


def stream_decode(frame: bytes, cuts: list[int], expected: int, offset: int = 0) -> list[bytes]:
    """Feed `frame` cut at `cuts`; each feed's output (the decoder finished at the end)."""
    decoder = FrameStreamDecoder(expected, 7, offset, len(frame))
    bounds = [0, *sorted(cuts), len(frame)]
    outputs = [decoder.feed(frame[start:end]) for start, end in itertools.pairwise(bounds)]
    decoder.finish()
    return outputs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1 << 20), max_size=12), st.booleans(), st.booleans())
def test_any_split_decodes_to_the_chunk(cuts, checksum, content_size):
    frame = compress(STREAMED, checksum=checksum, content_size=content_size)
    cuts = [cut % (len(frame) + 1) for cut in cuts]
    assert b"".join(stream_decode(frame, cuts, len(STREAMED))) == STREAMED


def test_output_comes_block_by_block_before_the_frame_ends():
    frame = compress(STREAMED)
    blocks = walk_zstd_frame(frame).block_count
    assert blocks > 4
    outputs = stream_decode(frame, list(range(4096, len(frame), 4096)), len(STREAMED))
    first = next(index for index, out in enumerate(outputs) if out)
    assert first < len(outputs) // 2 and sum(len(out) for out in outputs[:first + 1]) <= (
        128 * 1024)


@pytest.mark.parametrize("size", [4000, 5001], ids=["fewer", "more"])
def test_a_frame_of_another_size_is_rejected_when_streamed(size):
    frame = compress(CHUNK[:size] if size < len(CHUNK) else CHUNK + b"!")
    with pytest.raises(FrameDecodeError, match="chunk 7 \\(frame at offset 0\\)"):
        stream_decode(frame, [100], len(CHUNK))


def test_a_streamed_bomb_fails_after_one_block_too_many():
    compressor = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    frame = b"".join(compressor.compress(bytes(MiB)) for _ in range(64)) + compressor.flush()
    decoder = FrameStreamDecoder(4 * MiB, 0, 0, len(frame))
    tracemalloc.start()
    try:
        with pytest.raises(FrameDecodeError, match="the chunk's 4194304 bytes"):
            decoder.feed(frame)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.decoded <= 4 * MiB + 128 * 1024
    assert peak < 12 * MiB, f"streaming the 64 MiB bomb peaked at {peak} bytes"


@pytest.mark.parametrize("extra", [b"\x00", compress(b"second frame")], ids=["byte", "frame"])
def test_a_streamed_frame_must_end_where_the_table_says(extra):
    frame = compress(CHUNK)
    decoder = FrameStreamDecoder(len(CHUNK), 1, 10, len(frame) + len(extra))
    assert decoder.feed(frame + extra) == CHUNK
    with pytest.raises(FrameDecodeError, match="does not end at the"):
        decoder.finish()
    short = FrameStreamDecoder(len(CHUNK), 1, 10, len(frame))
    short.feed(frame[:-1])
    with pytest.raises(FrameDecodeError, match="does not end at the"):
        short.finish()
    with pytest.raises(FrameDecodeError, match="more than the frame"):
        FrameStreamDecoder(len(CHUNK), 1, 10, len(frame)).feed(frame + b"x")


@pytest.mark.parametrize(("position", "mask"), [(0, 0x10), (4, 0x08), (-1, 0x10), (-30, 0x01)],
                         ids=["magic", "reserved-bit", "checksum", "block"])
def test_a_corrupt_streamed_frame_raises_only_format_errors(position, mask):
    frame = flip(compress(CHUNK), position % len(compress(CHUNK)), mask)
    with pytest.raises(FormatError):
        stream_decode(frame, [5, 50], len(CHUNK))
