"""`lazyfs unpack` and `lazyfs verify` against forged frames that decode cleanly
(tests/support/forge.py): zstd sees nothing wrong, so the refusal must come from the frame's
SHA-512 or the dm-verity tree, and `unpack` must leave nothing behind."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, run_lazyfs
from tests.layer.helpers import make_image_bytes, write_blob
from tests.support.forge import Forgery, forge_layer

CHUNK = 64 * 1024
NOISE = random.Random(13).randbytes(2 * CHUNK)
IMAGE = make_image_bytes(2 * CHUNK + 500, seed=4) + NOISE + make_image_bytes(3 * CHUNK + 3)
TARGET = 2 * CHUNK + 500 + CHUNK + 1234  # in chunk 3

# case: (dm-verity, chunk table and digests forged, what unpack reports, what verify reports)
CASES = {
    # The authentic descriptor: the frame hash stops it (a frame that fails it is not even
    # decoded), and the blob digest agrees.
    "frame-hash": (True, False, "SHA-512 mismatch", ["SHA-512 mismatch", "blob digest mismatch"]),
    # Chunk table, chunk_digest and blob digest forged: only the verity root is authentic.
    "verity-alone": (True, True, "dm-verity: data block 48 ", ["dm-verity: data block 48 "]),
    # No dm-verity, the blob digest forged: only the frame hash is left.
    "frame-hash-alone": (False, False, "SHA-512 mismatch", ["SHA-512 mismatch"]),
}


def forged(directory: Path, case: str) -> tuple[Path, Forgery]:
    verity, table, _, _ = CASES[case]
    blob, _ = write_blob(directory, IMAGE, chunk_size=CHUNK, verity=verity)
    forgery = forge_layer(blob, blob.with_name("layer.descriptor.json"), TARGET, table=table,
                          blob_digest=table or not verity)
    assert forgery.chunk_index == 3
    return blob, forgery


@pytest.mark.parametrize("case", sorted(CASES))
def test_unpack_refuses_a_forged_frame_and_writes_nothing(tmp_path: Path, case: str) -> None:
    blob, _ = forged(tmp_path, case)
    out = tmp_path / "out" / "image.erofs"
    out.parent.mkdir()
    result = run_lazyfs("unpack", blob, "-o", out)
    assert_one_line_error(result, CASES[case][2])
    assert "chunk 3 " in result.stderr or "image offset 196608" in result.stderr
    assert list(out.parent.iterdir()) == []
    assert result.stdout == ""


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_reports_exactly_the_forged_frame(tmp_path: Path, case: str) -> None:
    blob, _ = forged(tmp_path, case)
    result = run_lazyfs("verify", blob)
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    expected = CASES[case][3]
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem, (fragment, problems)
    assert result.stdout.splitlines()[-1] == f"FAILED: {len(expected)} problem" + (
        "s" if len(expected) > 1 else "")
    assert "  image        not checked: the blob has problems" in result.stdout


def test_the_authentic_blob_unpacks_to_the_image(tmp_path: Path) -> None:
    """The control: without the forgery the same blob passes and unpacks byte for byte."""
    blob, _ = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    out = tmp_path / "image.erofs"
    result = run_lazyfs("unpack", blob, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE
