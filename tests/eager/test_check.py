"""Eager whole-blob checks: every altered byte is caught, by the check that owns it."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.encoder import EncodeOptions, encode_image
from lazyfs.eager.check import BlobCheckError, check_blob, unpack_blob
from lazyfs.eager.locate import find_descriptor, sibling_descriptor_path
from lazyfs.format.descriptor import Descriptor, serialize_descriptor
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from tests.layer.helpers import flip_byte, make_image_bytes, write_blob

IMAGE_SIZE = 300_000  # 74 data blocks of 4096: tree levels of 2 and 1 hash blocks (sha512)
CHUNK_SIZE = 65536  # 5 chunks, the last one short
UUID = bytes(range(16))


@pytest.fixture
def image() -> bytes:
    return make_image_bytes(IMAGE_SIZE, seed=11)


@pytest.fixture
def blob(tmp_path: Path, image: bytes) -> Path:
    path, _ = write_blob(tmp_path, image, chunk_size=CHUNK_SIZE, verity_uuid=UUID)
    return path


def _check(blob: Path, **kwargs: object) -> list[str]:
    descriptor, _ = find_descriptor(blob, None)
    assert descriptor is not None
    return check_blob(blob, descriptor, **kwargs).problems  # type: ignore[arg-type]


def test_intact_blob_passes_and_decodes(blob: Path, image: bytes) -> None:
    descriptor, _ = find_descriptor(blob, None)
    out = io.BytesIO()
    report = check_blob(blob, descriptor, output=out)
    assert report.ok, report.problems
    assert report.authenticated
    assert report.verity_checked
    assert report.chunks_checked == 5
    assert out.getvalue() == image
    assert report.image_digest == "sha256:" + hashlib.sha256(image).hexdigest()
    assert report.blob_digest == descriptor.digest  # type: ignore[union-attr]


# Each case: where to alter a byte (from the descriptor's offsets) and what must be reported
# besides the blob digest. Payload offsets of the verity frame: superblock 0..512, padding
# to 4096, level 1 (one block) at 4096, level 0 (two blocks) at 8192.
# Arguments: frame offsets, chunk table offset, verity offset.
Where = Callable[[tuple[int, ...], int, int], int]
CASES: dict[str, tuple[Where, str]] = {
    "frame 0 middle": (lambda fr, t, v: 30_000, "chunk 0"),
    "frame 2 magic": (lambda fr, t, v: fr[2], "chunk 2"),
    "last frame checksum": (lambda fr, t, v: t - 1, "chunk 4"),
    "chunk table frame header": (lambda fr, t, v: t + 5, "chunk table frame"),
    "chunk table magic": (lambda fr, t, v: t + SKIPPABLE_HEADER_SIZE, "chunk table"),
    "chunk table entry digest": (lambda fr, t, v: t + SKIPPABLE_HEADER_SIZE + 23 + 8,
                                 "chunk table digest mismatch"),
    "verity frame header": (lambda fr, t, v: v + 4, "dm-verity"),
    "verity signature": (lambda fr, t, v: v + 8, "dm-verity superblock"),
    "verity data block size": (lambda fr, t, v: v + 8 + 65, "dm-verity"),
    "superblock padding": (lambda fr, t, v: v + 8 + 400, "superblock padding"),
    "unused salt": (lambda fr, t, v: v + 8 + 100, "unused salt"),
    "padding after superblock": (lambda fr, t, v: v + 8 + 2000,
                                 "padding after the superblock"),
    "top hash block": (lambda fr, t, v: v + 8 + 4096 + 7,
                       "hash block 0 of level 1"),
    "level 0 hash block": (lambda fr, t, v: v + 8 + 8192 + 4096 + 5,
                           "hash block 1 of level 0"),
    "hash block zero padding": (lambda fr, t, v: v + 8 + 8192 + 4096 + 3000,
                                "hash block 1 of level 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_altered_byte_is_caught(blob: Path, case: str) -> None:
    descriptor, _ = find_descriptor(blob, None)
    assert descriptor is not None
    metadata = check_blob(blob, descriptor).metadata
    assert metadata is not None
    seekable = descriptor.seekable()
    assert seekable.verity_offset is not None
    where, expected = CASES[case]
    flip_byte(blob, where(metadata.table.frame_offsets, seekable.chunk_table_offset,
                          seekable.verity_offset))
    problems = _check(blob)
    assert any("blob digest mismatch" in p for p in problems), problems
    assert any(expected in p for p in problems), problems


def test_uuid_is_covered_by_the_blob_digest_only(blob: Path) -> None:
    descriptor, _ = find_descriptor(blob, None)
    assert descriptor is not None
    verity_offset = descriptor.seekable().verity_offset
    assert verity_offset is not None
    flip_byte(blob, verity_offset + SKIPPABLE_HEADER_SIZE + 16)
    assert _check(blob) == [
        f"blob digest mismatch: the descriptor says {descriptor.digest}, the blob hashes to "
        f"sha256:{hashlib.sha256(blob.read_bytes()).hexdigest()}"
    ]


def test_every_problem_is_listed_unless_stopping_at_the_first(blob: Path) -> None:
    descriptor, _ = find_descriptor(blob, None)
    metadata = check_blob(blob, descriptor).metadata
    assert metadata is not None
    for index in (1, 3):
        flip_byte(blob, metadata.table.frame_offsets[index] + 100)
    problems = _check(blob)
    assert [p.split(" ")[:2] for p in problems if p.startswith("chunk")] == [
        ["chunk", "1"], ["chunk", "3"]]
    with pytest.raises(BlobCheckError, match="chunk 1 "):
        check_blob(blob, descriptor, stop_at_first=True)


def test_without_descriptor_checks_consistency(blob: Path) -> None:
    sibling_descriptor_path(blob).unlink()
    descriptor, path = find_descriptor(blob, None)
    assert descriptor is None and path is None
    report = check_blob(blob)
    assert report.ok and not report.authenticated
    assert report.root_digest is not None  # computed from the top hash block
    flip_byte(blob, 100)
    assert any("chunk 0" in p for p in check_blob(blob).problems)


@pytest.mark.parametrize("chunk_size", [65536, 5000])
def test_data_blocks_checked_against_the_tree(tmp_path: Path, image: bytes,
                                              chunk_size: int) -> None:
    """A chunk table that is right for its frames, with the tree of a slightly different
    image: only the dm-verity data check can tell (aligned and unaligned chunks)."""
    other = bytearray(image)
    other[123_456] ^= 1
    encoded: list[tuple[bytes, object]] = []
    for data in (image, bytes(other)):
        out = io.BytesIO()
        result = encode_image(io.BytesIO(data), len(data), out,
                              EncodeOptions(chunk_size=chunk_size, verity_uuid=UUID))
        encoded.append((out.getvalue(), result))
    (blob_a, result_a), (blob_b, result_b) = encoded
    ours = result_a.annotations  # type: ignore[attr-defined]
    theirs = result_b.annotations  # type: ignore[attr-defined]
    mixed = blob_a[:ours.verity_offset] + blob_b[theirs.verity_offset:]
    annotations = ours.to_annotations()
    annotations["dev.containerd.erofs.dmverity.root_digest"] = theirs.root_digest
    path = tmp_path / "mixed.blob"
    path.write_bytes(mixed)
    descriptor = Descriptor(result_a.media_type,  # type: ignore[attr-defined]
                            "sha256:" + hashlib.sha256(mixed).hexdigest(), len(mixed),
                            annotations=annotations)
    problems = check_blob(path, descriptor).problems
    assert len(problems) == 1, problems
    assert f"data block {123_456 // 4096} (image offset {123_456 // 4096 * 4096})" in problems[0]


def test_dm_verity_frame_before_the_chunk_table(tmp_path: Path, blob: Path,
                                                image: bytes) -> None:
    """The proposed order of the format: offsets come from the annotations (or the scan)."""
    descriptor, _ = find_descriptor(blob, None)
    assert descriptor is not None
    seekable = descriptor.seekable()
    table_offset, verity_offset = seekable.chunk_table_offset, seekable.verity_offset
    assert verity_offset is not None
    data = blob.read_bytes()
    verity_frame = data[verity_offset:]
    swapped = data[:table_offset] + verity_frame + data[table_offset:verity_offset]
    path = tmp_path / "swapped.blob"
    path.write_bytes(swapped)
    annotations = dict(descriptor.annotations)
    annotations["dev.containerd.erofs.dmverity.offset"] = str(table_offset)
    annotations["dev.containerd.erofs.zstd.chunk_table_offset"] = str(
        table_offset + len(verity_frame))
    reordered = Descriptor(descriptor.media_type,
                           "sha256:" + hashlib.sha256(swapped).hexdigest(), len(swapped),
                           annotations=annotations)
    out = io.BytesIO()
    report = check_blob(path, reordered, output=out)
    assert report.ok, report.problems
    assert out.getvalue() == image
    scanned = check_blob(path)
    assert scanned.ok, scanned.problems
    assert scanned.annotations.chunk_table_offset == table_offset + len(verity_frame)
    assert scanned.annotations.verity_offset == table_offset


def test_bytes_after_the_metadata_are_reported(tmp_path: Path, blob: Path) -> None:
    descriptor, _ = find_descriptor(blob, None)
    assert descriptor is not None
    data = blob.read_bytes() + b"trailing"
    blob.write_bytes(data)
    longer = Descriptor(descriptor.media_type, "sha256:" + hashlib.sha256(data).hexdigest(),
                        len(data), annotations=descriptor.annotations)
    problems = check_blob(blob, longer).problems
    assert len(problems) == 1 and "8 unaccounted bytes" in problems[0], problems


def test_truncated_blob(blob: Path) -> None:
    descriptor, _ = find_descriptor(blob, None)
    data = blob.read_bytes()
    blob.write_bytes(data[:-100])
    problems = check_blob(blob, descriptor).problems
    assert problems[0].startswith(f"blob size mismatch: the descriptor says {len(data)} bytes")
    assert len(problems) >= 2  # the verity frame no longer fits, nor does the digest


@pytest.mark.parametrize(("size", "verity"), [(0, False), (4096, True), (1000, True)])
def test_tiny_images(tmp_path: Path, size: int, verity: bool) -> None:
    image = make_image_bytes(size, seed=2)
    path, _ = write_blob(tmp_path, image, verity=verity)
    descriptor, _ = find_descriptor(path, None)
    out = io.BytesIO()
    report = check_blob(path, descriptor, output=out)
    assert report.ok, report.problems
    assert out.getvalue() == image


def test_unpack_writes_only_a_verified_image(tmp_path: Path, blob: Path, image: bytes) -> None:
    descriptor, _ = find_descriptor(blob, None)
    raw = tmp_path / "out" / "image.raw"
    raw.parent.mkdir()
    unpack_blob(blob, raw, descriptor)
    assert raw.read_bytes() == image
    with pytest.raises(FileExistsError):
        unpack_blob(blob, raw, descriptor)
    raw.write_bytes(b"old")
    unpack_blob(blob, raw, descriptor, force=True)
    assert raw.read_bytes() == image

    raw.unlink()
    flip_byte(blob, IMAGE_SIZE // 5)  # in a middle frame: earlier chunks were written
    with pytest.raises(BlobCheckError, match="chunk"):
        unpack_blob(blob, raw, descriptor)
    assert list(raw.parent.iterdir()) == []


def test_descriptor_file_beside_the_blob(tmp_path: Path) -> None:
    assert sibling_descriptor_path(tmp_path / "x.blob") == tmp_path / "x.descriptor.json"
    assert sibling_descriptor_path(tmp_path / "x.zst") == tmp_path / "x.zst.descriptor.json"
    descriptor = Descriptor("application/vnd.erofs.layer.v1+zstd", "sha256:" + "0" * 64, 1,
                            annotations={"dev.containerd.erofs.zstd.chunk_table_offset": "0"})
    explicit = tmp_path / "elsewhere.json"
    explicit.write_text(serialize_descriptor(descriptor))
    assert find_descriptor(tmp_path / "x.blob", explicit) == (descriptor, explicit)
