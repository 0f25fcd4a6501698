"""parse_metadata: both metadata orders accepted; offsets, overlaps and mismatches rejected."""

from __future__ import annotations

import re
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.format.chunk_table import verify_frame
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.errors import FormatError, IntegrityError, LayoutError, TruncatedError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE, decode_chunk_frame
from lazyfs.format.layout import VERITY_HEAD_SIZE, BlobMetadata, parse_metadata
from lazyfs.format.verity_tree import split_tree, verify_data_blocks, verify_hash_blocks
from tests.format import BuiltBlob, build_blob, flip, make_superblock, pattern

IMAGE = pattern(300 * 1024 + 123, seed=4)
CHUNK_SIZE = 64 * 1024


def _built(verity: bool = True, verity_first: bool = False, image: bytes = IMAGE) -> BuiltBlob:
    superblock = make_superblock(len(image)) if verity else None
    return build_blob(image, CHUNK_SIZE, verity=superblock, verity_first=verity_first)


TABLE_FIRST = _built()
VERITY_FIRST = _built(verity_first=True)
NO_VERITY = _built(verity=False)
ORDERS = {"table-first": TABLE_FIRST, "verity-first": VERITY_FIRST}


def _parse(blob: bytes, annotations: SeekableAnnotations, blob_size: int | None = None
           ) -> BlobMetadata:
    size = len(blob) if blob_size is None else blob_size
    verity_head = None
    if annotations.verity_offset is not None:
        verity_head = blob[annotations.verity_offset:size]
    return parse_metadata(annotations, size, blob[annotations.chunk_table_offset:size],
                          verity_head)


def _check_whole_image(built: BuiltBlob, metadata: BlobMetadata) -> None:
    """Every chunk verifies and decodes, and every data block verifies against the root."""
    image = b""
    for index in range(metadata.table.chunk_count):
        start, end = metadata.frame_range(index)
        frame = built.blob[start:end]
        verify_frame(metadata.table, index, frame, start)
        image += decode_chunk_frame(frame, metadata.table.decoded_size(index), index, start)
    assert image == built.image
    if metadata.verity is not None:
        assert metadata.root is not None
        payload_start = metadata.verity_payload_offset
        payload = built.blob[payload_start:payload_start + metadata.verity_payload_size]
        blocks = split_tree(metadata.verity, payload)
        verify_hash_blocks(metadata.verity, blocks, metadata.root, set())
        verify_data_blocks(metadata.verity, 0, image, blocks, metadata.root)


@pytest.mark.parametrize("built", [TABLE_FIRST, VERITY_FIRST, NO_VERITY],
                         ids=["table-then-verity", "verity-then-table", "no-verity"])
def test_each_metadata_order_is_accepted(built):
    metadata = _parse(built.blob, built.annotations)
    assert metadata.table == built.table
    assert metadata.table_payload == built.table_payload
    assert metadata.image_size == len(IMAGE)
    assert metadata.blob_size == len(built.blob)
    assert metadata.data_end == len(b"".join(built.frames))
    assert metadata.frame_range(0) == (0, len(built.frames[0]))
    last = metadata.table.chunk_count - 1
    assert metadata.frame_range(last)[1] == metadata.data_end
    if built.verity_payload is None:
        assert metadata.verity is None and metadata.root is None
        with pytest.raises(ValueError):
            _ = metadata.verity_payload_offset
    else:
        assert metadata.root == built.root
        assert metadata.verity_payload_size == len(built.verity_payload)
        assert metadata.verity is not None
        assert metadata.verity.superblock.data_blocks == -(-len(IMAGE) // 4096)
    _check_whole_image(built, metadata)


def test_verity_first_layout_is_what_the_proposal_describes():
    annotations = VERITY_FIRST.annotations
    assert annotations.verity_offset is not None
    assert annotations.verity_offset < annotations.chunk_table_offset
    assert annotations.data_end == annotations.verity_offset
    verity_end = (annotations.verity_offset + SKIPPABLE_HEADER_SIZE
                  + len(VERITY_FIRST.verity_payload or b""))
    assert verity_end == annotations.chunk_table_offset
    assert annotations.chunk_table_offset + 8 + len(VERITY_FIRST.table_payload) == len(
        VERITY_FIRST.blob)


def test_only_the_head_of_the_verity_frame_is_needed():
    annotations = TABLE_FIRST.annotations
    assert annotations.verity_offset is not None
    head = TABLE_FIRST.blob[annotations.verity_offset:][:VERITY_HEAD_SIZE]
    table_frame = TABLE_FIRST.blob[annotations.chunk_table_offset:annotations.verity_offset]
    metadata = parse_metadata(annotations, len(TABLE_FIRST.blob), table_frame, head)
    assert metadata.root == TABLE_FIRST.root


def test_an_empty_image_has_only_a_chunk_table():
    built = build_blob(b"", CHUNK_SIZE)
    assert built.annotations.chunk_table_offset == 0
    metadata = _parse(built.blob, built.annotations)
    assert metadata.table.chunk_count == 0
    assert metadata.image_size == 0
    moved = replace(built.annotations, chunk_table_offset=4)
    with pytest.raises(LayoutError):
        _parse(bytes(4) + built.blob, moved)


# --- offsets past EOF and overlapping frames --------------------------------------------------

def test_annotations_pointing_past_eof_are_rejected():
    blob, annotations = TABLE_FIRST.blob, TABLE_FIRST.annotations
    size = len(blob)
    for offset in (size, size - 7, size + 10**9):
        moved = replace(annotations, chunk_table_offset=offset)
        with pytest.raises(LayoutError, match=(
                f"chunk table frame offset {offset} is beyond the blob \\({size} bytes\\)")):
            parse_metadata(moved, size, b"", blob[annotations.verity_offset:])
        moved = replace(annotations, verity_offset=offset)
        with pytest.raises(LayoutError, match=f"dm-verity frame offset {offset} is beyond"):
            parse_metadata(moved, size, blob[annotations.chunk_table_offset:], b"")


@pytest.mark.parametrize("built", [TABLE_FIRST, VERITY_FIRST, NO_VERITY],
                         ids=["table-then-verity", "verity-then-table", "no-verity"])
def test_a_truncated_blob_is_rejected(built):
    blob, annotations = built.blob, built.annotations
    last_offset = max(annotations.metadata_offsets)
    name = "chunk table" if last_offset == annotations.chunk_table_offset else "dm-verity"
    for cut in (1, 100, len(blob) - last_offset - SKIPPABLE_HEADER_SIZE):
        size = len(blob) - cut
        with pytest.raises(LayoutError, match=(
                f"{name} frame at offset {last_offset} claims .*running to {len(blob)}, "
                f"past {size} \\(next frame or end of blob\\)")):
            _parse(blob, annotations, size)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([*sorted(ORDERS), "no-verity"]), st.data())
def test_any_truncation_of_the_blob_raises_a_format_error(order, data):
    built = ORDERS.get(order, NO_VERITY)
    size = data.draw(st.integers(0, len(built.blob) - 1))
    with pytest.raises(FormatError):
        _parse(built.blob, built.annotations, size)


def test_table_frame_bytes_shorter_than_the_frame_are_rejected():
    annotations = TABLE_FIRST.annotations
    table_frame = TABLE_FIRST.table_frame[:SKIPPABLE_HEADER_SIZE + 10]
    with pytest.raises(LayoutError, match=r"chunk table frame at offset .*: got 18 bytes, need"):
        parse_metadata(annotations, len(TABLE_FIRST.blob), table_frame, TABLE_FIRST.verity_head)
    with pytest.raises(TruncatedError):
        parse_metadata(annotations, len(TABLE_FIRST.blob), TABLE_FIRST.table_frame[:5],
                       TABLE_FIRST.verity_head)
    with pytest.raises(TruncatedError, match="dm-verity superblock"):
        parse_metadata(annotations, len(TABLE_FIRST.blob), TABLE_FIRST.table_frame,
                       (TABLE_FIRST.verity_head or b"")[:100])


def test_a_chunk_table_running_into_the_verity_frame_is_rejected():
    annotations = TABLE_FIRST.annotations
    assert annotations.verity_offset is not None
    moved = replace(annotations, verity_offset=annotations.verity_offset - 1)
    blob = TABLE_FIRST.blob[:moved.verity_offset] + TABLE_FIRST.blob[annotations.verity_offset:]
    with pytest.raises(LayoutError, match=(
            f"chunk table frame at offset {annotations.chunk_table_offset} claims .* past "
            f"{moved.verity_offset}")):
        _parse(blob, moved)


def test_a_verity_frame_running_into_the_chunk_table_is_rejected():
    annotations = VERITY_FIRST.annotations
    assert annotations.verity_offset is not None
    length_at = annotations.verity_offset + 4
    (length,) = struct.unpack_from("<I", VERITY_FIRST.blob, length_at)
    blob = bytearray(VERITY_FIRST.blob)
    struct.pack_into("<I", blob, length_at, length + 1)
    with pytest.raises(LayoutError, match=(
            f"dm-verity frame at offset {annotations.verity_offset} claims {length + 1} payload "
            f"bytes, running to {annotations.chunk_table_offset + 1}, past "
            f"{annotations.chunk_table_offset}")):
        _parse(bytes(blob), annotations)


def test_metadata_annotated_inside_the_data_frames_is_rejected():
    # The data region ends at the first metadata frame: frames past it would overlap metadata.
    annotations = TABLE_FIRST.annotations
    assert annotations.verity_offset is not None
    inside = TABLE_FIRST.table.frame_offsets[2] + 5
    shift = annotations.chunk_table_offset - inside
    blob = TABLE_FIRST.blob[:inside] + TABLE_FIRST.blob[annotations.chunk_table_offset:]
    moved = replace(annotations, chunk_table_offset=inside,
                    verity_offset=annotations.verity_offset - shift)
    with pytest.raises(LayoutError, match=re.escape(
            f"chunk 3 frame offset {TABLE_FIRST.table.frame_offsets[3]} is outside the data "
            f"region (which ends at {inside})")):
        _parse(blob, moved)


def test_verity_annotated_inside_the_data_frames_is_rejected():
    inside = VERITY_FIRST.table.frame_offsets[4] - 1
    moved = replace(VERITY_FIRST.annotations, verity_offset=inside)
    with pytest.raises(LayoutError, match=re.escape(
            f"chunk 4 frame offset {VERITY_FIRST.table.frame_offsets[4]} is outside the data "
            f"region (which ends at {inside})")):
        _parse(VERITY_FIRST.blob, moved)


def test_a_verity_payload_too_short_for_its_tree_is_rejected():
    annotations = TABLE_FIRST.annotations
    assert annotations.verity_offset is not None and TABLE_FIRST.verity_payload is not None
    short = len(TABLE_FIRST.verity_payload) - 4096
    blob = bytearray(TABLE_FIRST.blob[:len(TABLE_FIRST.blob) - 4096])
    struct.pack_into("<I", blob, annotations.verity_offset + 4, short)
    with pytest.raises(LayoutError, match=f"dm-verity payload at offset "
                                          f"{annotations.verity_offset + 8} is {short} bytes"):
        _parse(bytes(blob), annotations)


# --- verity against the chunk table and annotations -------------------------------------------

def _patch_superblock(built: BuiltBlob, fmt: str, field_offset: int, value: object) -> bytes:
    assert built.annotations.verity_offset is not None
    blob = bytearray(built.blob)
    struct.pack_into(fmt, blob, built.annotations.verity_offset + 8 + field_offset, value)
    return bytes(blob)


@pytest.mark.parametrize("built", [TABLE_FIRST, VERITY_FIRST], ids=["table-first", "verity-first"])
@pytest.mark.parametrize(("fmt", "field_offset", "value", "blocks"), [
    ("<Q", 72, 77, 77), ("<Q", 72, 75, 75), ("<Q", 72, 0, 0),
    ("<I", 64, 512, 76),  # the same count of a smaller block size: the image has 601 blocks
], ids=["one-more", "one-fewer", "zero", "block-size"])
def test_a_verity_block_count_not_matching_the_chunk_table_is_rejected(
        built, fmt, field_offset, value, blocks):
    blob = _patch_superblock(built, fmt, field_offset, value)
    with pytest.raises(LayoutError, match=(
            f"dm-verity superblock at offset {(built.annotations.verity_offset or 0) + 8}: "
            f"{blocks} data blocks, but the image of {len(IMAGE)} bytes has")):
        _parse(blob, built.annotations)


@pytest.mark.parametrize("root_digest", ["sha256:" + "00" * 32, "sha1:" + "00" * 20])
def test_a_root_digest_of_another_algorithm_is_rejected(root_digest):
    annotations = replace(TABLE_FIRST.annotations, root_digest=root_digest)
    algorithm = root_digest.partition(":")[0]
    with pytest.raises(LayoutError, match=(
            f"root digest is {algorithm} but the dm-verity superblock says sha512")):
        _parse(TABLE_FIRST.blob, annotations)


def test_a_root_digest_of_the_wrong_size_is_rejected():
    annotations = replace(TABLE_FIRST.annotations, root_digest="sha512:" + "00" * 32)
    with pytest.raises(FormatError, match="root digest annotation"):
        _parse(TABLE_FIRST.blob, annotations)


def test_a_wrong_root_digest_fails_verification():
    annotations = replace(TABLE_FIRST.annotations, root_digest="sha512:" + "00" * 64)
    metadata = _parse(TABLE_FIRST.blob, annotations)
    with pytest.raises(IntegrityError, match="the root digest"):
        _check_whole_image(TABLE_FIRST, metadata)


def test_a_chunk_table_digest_mismatch_is_an_integrity_error():
    annotations = replace(TABLE_FIRST.annotations, chunk_digest="sha512:" + "00" * 64)
    with pytest.raises(IntegrityError, match="chunk table digest mismatch"):
        _parse(TABLE_FIRST.blob, annotations)


def test_without_digests_the_metadata_parses_untrusted():
    annotations = replace(TABLE_FIRST.annotations, chunk_digest=None, root_digest=None)
    metadata = _parse(TABLE_FIRST.blob, annotations)
    assert metadata.root is None
    assert not metadata.annotations.is_trusted


def test_the_blob_needs_its_verity_head_when_it_has_verity():
    annotations = TABLE_FIRST.annotations
    with pytest.raises(ValueError, match="head bytes are required"):
        parse_metadata(annotations, len(TABLE_FIRST.blob), TABLE_FIRST.table_frame, None)


# --- corruption --------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(ORDERS)), st.data())
def test_a_flipped_bit_in_the_chunk_table_frame_is_always_caught(order, data):
    built = ORDERS[order]
    start = built.annotations.chunk_table_offset
    position = data.draw(st.integers(start, start + 8 + len(built.table_payload) - 1))
    bit = data.draw(st.integers(0, 7))
    corrupted = flip(built.blob, position, 1 << bit)
    if position == start and bit < 4:  # another skippable magic 0x184D2A5x: the same frame
        assert _parse(corrupted, built.annotations).table == built.table
        return
    with pytest.raises(FormatError):
        _parse(corrupted, built.annotations)


def _unprotected(frame_position: int, bit: int, original: int) -> bool:
    """Bits of a verity frame head that no digest covers and that change nothing read."""
    superblock_position = frame_position - SKIPPABLE_HEADER_SIZE
    return (
        (frame_position == 0 and bit < 4)  # another skippable magic 0x184D2A5x
        or (superblock_position == 12 and bit == 0)  # hash type 0: same tree (no salt, sha512)
        or 16 <= superblock_position < 32  # uuid
        or (32 <= superblock_position < 64 and bit == 5 and chr(original).isalpha())  # "SHA512"
        or superblock_position >= 82  # padding and the unused salt field
    )


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(ORDERS)), st.data())
def test_a_flipped_bit_in_the_verity_frame_is_caught_unless_it_changes_nothing(order, data):
    built = ORDERS[order]
    start = built.annotations.verity_offset
    assert start is not None
    frame_position = data.draw(st.integers(0, VERITY_HEAD_SIZE - 1))
    bit = data.draw(st.integers(0, 7))
    corrupted = flip(built.blob, start + frame_position, 1 << bit)
    try:
        metadata = _parse(corrupted, built.annotations)
        _check_whole_image(replace(built, blob=corrupted), metadata)
    except FormatError:
        caught = True
    else:
        caught = False
    assert caught != _unprotected(frame_position, bit, built.blob[start + frame_position])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=700), st.binary(min_size=0, max_size=700),
       st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 3000))
def test_garbage_metadata_raises_only_format_errors(table_frame, verity_head, table_offset,
                                                    verity_offset, blob_size):
    if table_offset == verity_offset:
        verity_offset += 1
    annotations = SeekableAnnotations(table_offset, None, verity_offset, None)
    try:
        parse_metadata(annotations, blob_size, table_frame, verity_head)
    except FormatError:
        pass
    except ValueError as exc:  # the one caller error: not a property of the bytes
        raise AssertionError(exc) from exc


def test_messages_name_offsets_not_just_problems():
    with pytest.raises(LayoutError) as caught:
        _parse(TABLE_FIRST.blob, TABLE_FIRST.annotations, len(TABLE_FIRST.blob) - 1)
    assert re.search(r"at offset \d+", str(caught.value))


def test_frame_runs_group_adjacent_frames_up_to_the_cap():
    metadata = _parse(TABLE_FIRST.blob, TABLE_FIRST.annotations)
    sizes = [end - start for start, end in map(metadata.frame_range, range(5))]
    assert metadata.frame_runs([0, 1, 2, 4], 10 ** 9) == [[0, 1, 2], [4]]
    assert metadata.frame_runs([0, 1, 2], sizes[0] + sizes[1]) == [[0, 1], [2]]
    assert metadata.frame_runs([0, 1], 1) == [[0], [1]]  # one frame over the cap is a run
    assert metadata.frame_runs([], 1) == []
