"""The chunk table: round trips, every SPEC §3 rule with its error, frame and table digests."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.format.chunk_table import (
    HASH_NONE,
    HASH_SHA512,
    HEADER_SIZE,
    ChunkTable,
    chunk_table_digest,
    parse_chunk_table,
    serialize_chunk_table,
    validate_chunk_layout,
    verify_chunk_table_digest,
    verify_frame,
)
from lazyfs.format.errors import (
    BadMagicError,
    FieldError,
    FormatError,
    IntegrityError,
    LayoutError,
    TruncatedError,
)
from lazyfs.format.frames import serialize_skippable_frame
from tests.format import build_blob, flip, pattern


@st.composite
def chunk_tables(draw: st.DrawFn) -> ChunkTable:
    algorithm = draw(st.sampled_from([HASH_NONE, HASH_SHA512]))
    chunk_size = draw(st.one_of(st.integers(1, 64), st.integers(1, 2**32 - 1)))
    count = draw(st.integers(0, 24))
    size = draw(st.integers((count - 1) * chunk_size + 1, count * chunk_size)) if count else 0
    offsets = sorted(draw(st.lists(st.integers(0, 2**64 - 1), min_size=count, max_size=count)))
    digest_size = 64 if algorithm == HASH_SHA512 else 0
    digests = draw(st.lists(st.binary(min_size=digest_size, max_size=digest_size),
                            min_size=count, max_size=count))
    return ChunkTable(size, chunk_size, algorithm, tuple(offsets), tuple(digests))


@settings(max_examples=100, deadline=None)
@given(chunk_tables(), st.integers(0, 2**40))
def test_chunk_table_round_trips(table, payload_offset):
    payload = serialize_chunk_table(table)
    assert len(payload) == HEADER_SIZE + table.chunk_count * (8 + table.digest_size)
    assert parse_chunk_table(payload, payload_offset) == table


@settings(max_examples=50, deadline=None)
@given(chunk_tables(), st.data())
def test_any_truncation_is_a_truncated_or_payload_length_error(table, data):
    payload = serialize_chunk_table(table)
    cut = data.draw(st.integers(0, len(payload) - 1))
    if cut < HEADER_SIZE:
        with pytest.raises(TruncatedError, match="chunk table header at offset 100"):
            parse_chunk_table(payload[:cut], 100)
    else:
        with pytest.raises(FieldError, match="field payload length at offset 96") as caught:
            parse_chunk_table(payload[:cut], 100)
        assert caught.value.found == cut


def test_extra_bytes_are_a_payload_length_error():
    table = build_blob(pattern(10_000), chunk_size=4096).table
    payload = serialize_chunk_table(table)
    with pytest.raises(FieldError, match=(
            f"field payload length at offset 4: expected {len(payload)} .*"
            f"found {len(payload) + 1}")):
        parse_chunk_table(payload + b"\x00", 8)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda tail: struct.pack("<II", 0xCDE4EC67, 1)
                                             + tail)))
def test_garbage_raises_only_format_errors(garbage):
    try:
        table = parse_chunk_table(garbage)
    except FormatError:
        return
    assert serialize_chunk_table(table) == garbage  # what is accepted is exactly understood


VALID = build_blob(pattern(300_000, seed=2), chunk_size=65536)
PAYLOAD_OFFSET = VALID.annotations.chunk_table_offset + 8


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(VALID.table_payload) - 1), st.integers(0, 7))
def test_a_flipped_bit_raises_only_format_errors_and_fails_the_digest(position, bit):
    corrupted = flip(VALID.table_payload, position, 1 << bit)
    try:
        table = parse_chunk_table(corrupted, PAYLOAD_OFFSET)
    except FormatError:
        pass
    else:
        assert table != VALID.table
    with pytest.raises(IntegrityError, match="chunk table digest mismatch"):
        verify_chunk_table_digest(corrupted, VALID.annotations.chunk_digest)


def _patched(fmt: str, at: int, value: int) -> bytes:
    payload = bytearray(VALID.table_payload)
    struct.pack_into(fmt, payload, at, value)
    return bytes(payload)


ENTRY = 8 + 64


@pytest.mark.parametrize(("payload", "error", "field", "offset"), [
    (_patched("<I", 0, 0xCDE4EC68), BadMagicError, "magic", 0),
    (_patched("<I", 0, 0xFD2FB528), BadMagicError, "magic", 0),
    (_patched("<I", 4, 2), FieldError, "version", 4),
    (_patched("<I", 4, 0), FieldError, "version", 4),
    (_patched("<H", 21, 1), FieldError, "reserved", 21),
    (_patched("<H", 21, 0x100), FieldError, "reserved", 21),
    (_patched("<I", 16, 0), FieldError, "chunk size", 16),
    (_patched("<B", 20, 2), FieldError, "hash algorithm", 20),
    (_patched("<B", 20, 255), FieldError, "hash algorithm", 20),
    (_patched("<B", 20, 0), FieldError, "payload length", -4),  # entries lose their digests
    (_patched("<I", 16, 32768), FieldError, "payload length", -4),  # twice the entries
    (_patched("<Q", 8, 300_000 + 65536), FieldError, "payload length", -4),
    (VALID.table_payload[:-1], FieldError, "payload length", -4),
], ids=["magic", "zstd-magic", "version-2", "version-0", "reserved-1", "reserved-high",
        "chunk-size-0", "algorithm-2", "algorithm-255", "algorithm-none", "chunk-size-half",
        "size-one-more-chunk", "short-payload"])
def test_each_header_rule_is_rejected_naming_field_and_offset(payload, error, field, offset):
    with pytest.raises(error) as caught:
        parse_chunk_table(payload, PAYLOAD_OFFSET)
    assert type(caught.value) is error
    assert caught.value.field == field
    assert caught.value.offset == PAYLOAD_OFFSET + offset
    assert f"field {field} at offset {PAYLOAD_OFFSET + offset}:" in str(caught.value)


def test_decreasing_offsets_are_rejected_naming_the_entry():
    entry = 3
    previous = VALID.table.frame_offsets[entry - 1]
    payload = _patched("<Q", HEADER_SIZE + entry * ENTRY, previous - 1)
    at = PAYLOAD_OFFSET + HEADER_SIZE + entry * ENTRY
    with pytest.raises(LayoutError, match=(
            f"entry {entry} at offset {at}: frame offset {previous - 1} is below the previous "
            f"entry's {previous}")):
        parse_chunk_table(payload, PAYLOAD_OFFSET)


def _table(offsets: tuple[int, ...], chunk_size: int = 10) -> ChunkTable:
    return ChunkTable(len(offsets) * chunk_size, chunk_size, HASH_NONE, offsets,
                      (b"",) * len(offsets))


def test_a_valid_layout_passes():
    validate_chunk_layout(VALID.table, VALID.annotations.data_end)
    validate_chunk_layout(_table(()), 0)
    validate_chunk_layout(_table((0, 1, 2)), 3)


@pytest.mark.parametrize(("offsets", "data_end", "message"), [
    ((0, 50, 200), 100, "chunk 2 frame offset 200 is outside the data region (which ends at 100)"),
    ((0, 100), 100, "chunk 1 frame offset 100 is outside the data region (which ends at 100)"),
    ((0, 150, 160), 100, "chunk 1 frame offset 150 is outside the data region"),
    ((0, 40, 40, 60), 100, "chunk 1 frame at offset 40 is empty (next frame starts at 40)"),
    ((0, 0), 100, "chunk 0 frame at offset 0 is empty"),
    ((5, 40), 100, "chunk 0 frame starts at offset 5, expected 0"),
    ((), 64, "no chunks, but the data region is 64 bytes"),
], ids=["past-end", "at-end", "middle-outside", "empty-middle", "empty-first", "not-at-0",
        "no-chunks"])
def test_each_layout_rule_is_rejected_naming_chunk_and_offset(offsets, data_end, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        validate_chunk_layout(_table(offsets), data_end)


def test_a_frame_digest_mismatch_is_an_integrity_error():
    index = 2
    start, end = VALID.table.frame_range(index, VALID.annotations.data_end)
    frame = VALID.blob[start:end]
    verify_frame(VALID.table, index, frame, start)
    with pytest.raises(IntegrityError, match=(
            f"chunk {index} \\(frame at offset {start}, {len(frame)} bytes\\): SHA-512 mismatch")):
        verify_frame(VALID.table, index, flip(frame, len(frame) // 2), start)
    with pytest.raises(IntegrityError):
        verify_frame(VALID.table, index, VALID.frames[index + 1], start)


def test_a_table_without_digests_does_not_check_frames():
    blob = build_blob(pattern(5000), chunk_size=1000, hash_algorithm=HASH_NONE)
    assert blob.table.digest_size == 0
    verify_frame(blob.table, 0, b"anything", 0)


def test_the_chunk_digest_covers_the_payload_only():
    annotation = VALID.annotations.chunk_digest
    assert annotation == chunk_table_digest(VALID.table_payload)
    verify_chunk_table_digest(VALID.table_payload, annotation)
    verify_chunk_table_digest(VALID.table_payload, annotation.upper().replace("SHA512", "sha512"))
    with pytest.raises(IntegrityError, match=f"expected {annotation}"):
        verify_chunk_table_digest(serialize_skippable_frame(VALID.table_payload), annotation)
    with pytest.raises(IntegrityError, match="chunk table digest mismatch"):
        verify_chunk_table_digest(VALID.table_payload, "sha512:" + "0" * 128)


def test_chunk_arithmetic():
    table = VALID.table
    assert table.chunk_count == 5
    assert [table.decoded_size(i) for i in range(5)] == [65536] * 4 + [300_000 - 4 * 65536]
    assert table.chunks_for_range(0, 1) == range(0, 1)
    assert table.chunks_for_range(65535, 2) == range(0, 2)
    # Reads ending one byte before, exactly at and one byte after a chunk boundary.
    assert table.chunks_for_range(0, 65535) == range(0, 1)
    assert table.chunks_for_range(0, 65536) == range(0, 1)
    assert table.chunks_for_range(0, 65537) == range(0, 2)
    assert table.chunks_for_range(70_000, 2 * 65536 - 70_000 - 1) == range(1, 2)
    assert table.chunks_for_range(70_000, 2 * 65536 - 70_000) == range(1, 2)
    assert table.chunks_for_range(70_000, 2 * 65536 - 70_000 + 1) == range(1, 3)
    assert table.chunks_for_range(65536, 3 * 65536) == range(1, 4)
    assert table.chunks_for_range(4 * 65536 - 1, 1) == range(3, 4)
    assert table.chunks_for_range(4 * 65536, 300_000) == range(4, 5)
    assert table.chunks_for_range(299_999, 100) == range(4, 5)
    assert table.chunks_for_range(300_000, 10) == range(0)
    assert table.chunks_for_range(10, 0) == range(0)
    data_end = VALID.annotations.data_end
    assert table.frame_range(4, data_end) == (table.frame_offsets[4], data_end)
    assert table.frame_range(1, data_end) == table.frame_offsets[1:3]


@pytest.mark.parametrize("table", [
    ChunkTable(100, 10, HASH_NONE, (0,) * 9, (b"",) * 9),  # too few entries
    ChunkTable(100, 0, HASH_NONE, (), ()),
    ChunkTable(10, 10, 7, (0,), (b"",)),
    ChunkTable(10, 10, HASH_SHA512, (0,), (b"short",)),
    ChunkTable(20, 10, HASH_NONE, (5, 0), (b"", b"")),
    ChunkTable(10, 10, HASH_NONE, (2**64,), (b"",)),
    ChunkTable(2**64, 2**32 - 1, HASH_NONE, (), ()),
], ids=["count", "chunk-size-0", "algorithm", "digest-size", "decreasing", "offset-64-bit",
        "size-64-bit"])
def test_serializing_a_table_no_reader_accepts_raises_value_error(table):
    with pytest.raises(ValueError):
        serialize_chunk_table(table)
