"""RemoteImage against forged frames that decode cleanly (tests/support/forge.py): zstd sees
nothing wrong, so only the frame's SHA-512 and the dm-verity tree stand between the forgery
and a reader. Each read either fails or returns exactly the image's bytes."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support.forge import Forgery, forge_layer

CHUNK = 64 * 1024
NOISE = random.Random(11).randbytes(3 * CHUNK)
# Compressible chunks around incompressible ones: the forged byte lies in chunk 4.
IMAGE = make_image_bytes(3 * CHUNK + 1000, seed=3) + NOISE + make_image_bytes(4 * CHUNK - 77)
TARGET = 3 * CHUNK + 1000 + CHUNK + 4321

# case: (dm-verity in the blob, chunk table and chunk_digest forged, what must catch it)
CASES = {
    "frame-hash": (True, False, "SHA-512 mismatch"),
    "verity-alone": (True, True, "dm-verity: data block"),
    "frame-hash-alone": (False, False, "SHA-512 mismatch"),
}


def forged_layer(directory: Path, case: str) -> tuple[Path, Forgery]:
    verity, table, _ = CASES[case]
    blob, _ = write_blob(directory, IMAGE, chunk_size=CHUNK, verity=verity)
    forgery = forge_layer(blob, blob.with_name("layer.descriptor.json"), TARGET, table=table)
    assert forgery.chunk_index == TARGET // CHUNK and forgery.image_offset == TARGET
    return blob, forgery


async def read_pieces(image: RemoteImage, piece: int) -> dict[int, bytes | None]:
    """Every piece of the image: its bytes, or None where the read failed."""
    out: dict[int, bytes | None] = {}
    for offset in range(0, image.size, piece):
        try:
            out[offset] = await image.read(offset, piece)
        except ImageReadError:
            out[offset] = None
    return out


@pytest.mark.parametrize("partial", [True, False], ids=["partial-frames", "whole-frames"])
@pytest.mark.parametrize("readahead", [0, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forged_frame_never_reaches_a_reader(
    tmp_path: Path, case: str, readahead: int, partial: bool, caplog: pytest.LogCaptureFixture
) -> None:
    blob, forgery = forged_layer(tmp_path, case)
    bad = forgery.chunk_index

    async def body(image: RemoteImage) -> object:
        pieces = await read_pieces(image, 4096)
        with pytest.raises(ImageReadError):  # a read across the chunk fails as a whole
            await image.read((bad - 1) * CHUNK, 3 * CHUNK)
        return pieces, image.stats_snapshot()

    with caplog.at_level(logging.ERROR):
        # No refetch: the path under test reports the chunk itself (a refetch goes whole).
        tuning = ImageTuning(readahead_chunks=readahead, partial_frames=partial, refetches=0)
        pieces, stats = run_with_layer(LayerSource(str(blob)), body, tuning=tuning)
    failed = [offset for offset, data in pieces.items() if data is None]
    assert failed == list(range(bad * CHUNK, (bad + 1) * CHUNK, 4096))
    for offset, data in pieces.items():
        if data is not None:
            assert data == IMAGE[offset:offset + 4096], offset
            assert forgery.forged_window not in data
    assert stats["bad_chunks"] == [bad] and stats["verify_failures"] == 1
    assert stats["chunks_fetched"] == stats["chunk_count"] - 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert f"chunk {bad} " in errors[0] and CASES[case][2] in errors[0]


@pytest.mark.parametrize("partial", [True, False], ids=["partial-frames", "whole-frames"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forged_frame_fails_a_read_of_just_its_byte(tmp_path: Path, case: str,
                                                    partial: bool) -> None:
    blob, _ = forged_layer(tmp_path, case)

    async def body(image: RemoteImage) -> object:
        with pytest.raises(ImageReadError):
            await image.read(TARGET, 1)
        before, after = TARGET - TARGET % CHUNK - 1, TARGET - TARGET % CHUNK + CHUNK
        return await image.read(before, 1), await image.read(after, 1)

    tuning = ImageTuning(readahead_chunks=0, partial_frames=partial, refetches=0)
    assert run_with_layer(LayerSource(str(blob)), body, tuning=tuning) == (
        IMAGE[TARGET - TARGET % CHUNK - 1:TARGET - TARGET % CHUNK],
        IMAGE[TARGET - TARGET % CHUNK + CHUNK:TARGET - TARGET % CHUNK + CHUNK + 1],
    )
