"""The encoder, checked by decoding everything it writes (`lazyfs.eager.check`), by cryptsetup's
own dm-verity implementation, and against the blobs containerd wrote."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from converter.encoder import EncodeOptions, EncodeResult, encode_image
from lazyfs.eager.check import check_blob
from lazyfs.eager.locate import find_descriptor
from lazyfs.format.descriptor import Descriptor
from tests.layer.helpers import make_image_bytes

VECTORS = ("basic-noverity", "basic-verity-64k")


def _encode(tmp_path: Path, image: bytes, **options: object) -> tuple[Path, Descriptor,
                                                                      EncodeResult]:
    path = tmp_path / "layer.blob"
    with open(path, "wb") as out:
        result = encode_image(io.BytesIO(image), len(image), out,
                              EncodeOptions(**options))  # type: ignore[arg-type]
    descriptor = Descriptor(result.media_type, result.blob_digest, result.blob_size,
                            annotations=result.annotations.to_annotations())
    return path, descriptor, result


def _round_trip(path: Path, descriptor: Descriptor) -> bytes:
    out = io.BytesIO()
    report = check_blob(path, descriptor, output=out)
    assert report.ok, report.problems
    return out.getvalue()


@pytest.mark.parametrize(
    ("image_size", "chunk_size"),
    [
        (1_000_000, 4 << 20),  # one short chunk
        (1_000_000, 65536),
        (1_000_000, 4096),
        (1_000_000, 12345),  # odd: chunks split data blocks
        (1_000_000, 4097),
        (300_000, 1 << 30),
        (5_000, 1),  # one byte per frame
        (65536 * 3, 65536),  # exact multiple: no short chunk
    ],
)
@pytest.mark.parametrize("verity", [True, False])
def test_round_trip(tmp_path: Path, image_size: int, chunk_size: int, verity: bool) -> None:
    image = make_image_bytes(image_size, seed=image_size + chunk_size)
    path, descriptor, result = _encode(tmp_path, image, chunk_size=chunk_size, verity=verity)
    assert _round_trip(path, descriptor) == image
    assert result.chunk_count == -(-image_size // chunk_size)
    assert (result.annotations.verity_offset is not None) == verity


def test_empty_image_without_verity(tmp_path: Path) -> None:
    path, descriptor, result = _encode(tmp_path, b"", verity=False)
    assert _round_trip(path, descriptor) == b""
    assert result.chunk_count == 0
    with pytest.raises(ValueError, match="empty"):
        _encode(tmp_path, b"", verity=True)


def test_output_does_not_depend_on_thread_count(tmp_path: Path) -> None:
    image = make_image_bytes(2_000_000, seed=4)
    blobs = []
    for threads in (1, 2, 5):
        path, _, _ = _encode(tmp_path, image, chunk_size=100_000, threads=threads,
                             verity_uuid=b"u" * 16)
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]


@pytest.mark.skipif(shutil.which("veritysetup") is None, reason="needs veritysetup")
@pytest.mark.parametrize(
    ("hash_name", "block_size", "salt", "chunk_size"),
    [("sha512", 4096, b"", 65536), ("sha256", 4096, bytes(range(32)), 65536),
     ("sha256", 1024, b"\x01\x02\x03", 5000), ("sha512", 512, b"", 4 << 20)],
)
def test_veritysetup_accepts_our_tree(tmp_path: Path, hash_name: str, block_size: int,
                                      salt: bytes, chunk_size: int) -> None:
    image = make_image_bytes(700_001, seed=block_size)
    path, descriptor, result = _encode(
        tmp_path, image, chunk_size=chunk_size, verity_hash=hash_name,
        verity_data_block_size=block_size, verity_hash_block_size=block_size, verity_salt=salt,
    )
    _round_trip(path, descriptor)
    verity_offset = result.annotations.verity_offset
    root = result.annotations.root_digest
    assert verity_offset is not None and root is not None
    data = tmp_path / "data"
    data.write_bytes(image + bytes(-len(image) % block_size))
    hash_device = tmp_path / "hash"
    hash_device.write_bytes(path.read_bytes()[verity_offset + 8:])
    verified = subprocess.run(
        ["veritysetup", "verify", str(data), str(hash_device), root.partition(":")[2]],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert verified.returncode == 0, verified.stderr
    assert root.startswith(f"{hash_name}:")


@pytest.mark.parametrize("name", VECTORS)
def test_containerd_vectors_re_encode_to_the_same_root(tmp_path: Path, vectors_dir: Path,
                                                       name: str) -> None:
    """The vectors' raw image is `zstd -d` of the blob; re-encoded with the same parameters
    it gets containerd's root digest, and the same chunk structure."""
    blob = vectors_dir / f"{name}.blob"
    listing = json.loads((vectors_dir / f"{name}.files.json").read_text())
    raw = tmp_path / "raw"
    subprocess.run(["zstd", "-d", "-q", "-f", str(blob), "-o", str(raw)], check=True,
                   timeout=60)
    image = raw.read_bytes()
    assert len(image) == listing["raw_erofs_size"]

    theirs, _ = find_descriptor(blob, None)
    assert theirs is not None
    report = check_blob(blob, theirs)
    assert report.ok, report.problems
    assert report.image_digest == "sha256:" + listing["raw_erofs_sha256"]
    metadata = report.metadata
    assert metadata is not None
    options: dict[str, object] = {"chunk_size": metadata.table.chunk_size,
                                  "verity": metadata.verity is not None}
    if metadata.verity is not None:
        superblock = metadata.verity.superblock
        options.update(verity_hash=superblock.hash_name, verity_salt=superblock.salt,
                       verity_data_block_size=superblock.data_block_size,
                       verity_hash_block_size=superblock.hash_block_size)
    path, ours, result = _encode(tmp_path, image, **options)
    assert _round_trip(path, ours) == image
    assert result.annotations.root_digest == theirs.seekable().root_digest
    assert result.chunk_count == metadata.table.chunk_count
    ours_metadata = check_blob(path, ours).metadata
    assert ours_metadata is not None
    assert ours_metadata.verity_payload_size == metadata.verity_payload_size
    # Same order of metadata frames: chunk table first, dm-verity last.
    ours_offsets = ours.seekable().metadata_offsets
    theirs_offsets = theirs.seekable().metadata_offsets
    assert ours_offsets[0] == result.annotations.chunk_table_offset
    assert theirs_offsets[0] == theirs.seekable().chunk_table_offset
