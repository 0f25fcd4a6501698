"""A lazy kernel mount (`lazyfs mount` over nginx, EROFS on the verified FUSE file) against
forged frames that decode cleanly (tests/support/forge.py). Reads of the forged chunk fail
with EIO; every other byte read through the kernel is the file's own."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from tests.support.forge import forge_layer, image_offset_of, read_pages
from tests.support.lazyfs_cli import REPO, Lazyfs
from tests.support.nginx import serve_directory

pytestmark = [pytest.mark.root, pytest.mark.network]

CHUNK = 64 * 1024
NOISE = random.Random(17).randbytes(4 * CHUNK)  # incompressible: stored in raw zstd blocks
FILES = {
    "etc/hostname": b"forged-test\n",
    "etc/motd": b"welcome\n" * 300,
    "data/noise.bin": NOISE,
    "data/after.txt": b"".join(b"line %d of a compressible file\n" % i for i in range(6000)),
    "usr/share/doc/readme": b"read me\n" * 2000,
}
TARGET_IN_FILE = 2 * CHUNK + 777

# case: (dm-verity, chunk table and chunk_digest forged, what the daemon logs)
CASES = {
    "frame-hash": (True, False, "SHA-512 mismatch"),
    "verity-alone": (True, True, "dm-verity: data block"),
    "frame-hash-alone": (False, False, "SHA-512 mismatch"),
}


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Converted layers of FILES, with and without dm-verity: {verity: dir with layer.blob}."""
    work = tmp_path_factory.mktemp("forged-layers")
    tree = work / "tree"
    for name, data in FILES.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    out = {}
    for verity in (True, False):
        served = work / f"served-{verity}"
        served.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "lazyfs", "convert", str(tree), "-o",
             str(served / "layer.blob"), "--chunk-size", "64K",
             *([] if verity else ["--no-verity"])],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        out[verity] = served
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_forged_frame_is_eio_through_the_kernel(
    lazyfs: Lazyfs, mountpoint: Path, layers: dict[bool, Path], tmp_path: Path, case: str
) -> None:
    verity, table, message = CASES[case]
    served = tmp_path / "served"
    shutil.copytree(layers[verity], served)
    blob = served / "layer.blob"
    reader = zstandard.ZstdDecompressor().stream_reader(blob.read_bytes(),
                                                        read_across_frames=True)
    file_start = image_offset_of(reader.read(), NOISE)
    forgery = forge_layer(blob, served / "layer.descriptor.json", file_start + TARGET_IN_FILE,
                          table=table)
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))
    with serve_directory(served) as server:
        lazyfs.mount(server.url + "layer.blob", str(mountpoint), "--readahead", "0",
                     mountpoint=mountpoint)
        for name, data in FILES.items():
            if name != "data/noise.bin":
                assert (mountpoint / name).read_bytes() == data, name
        pages = read_pages(mountpoint / "data/noise.bin")
        for offset, page in pages.items():
            if page is not None:
                assert page == NOISE[offset:offset + 4096], offset
                assert forgery.forged_window not in page
        forged_page = TARGET_IN_FILE - TARGET_IN_FILE % 4096
        assert pages[forged_page] is None
        bad_start = forgery.chunk_index * CHUNK - file_start  # the bad chunk, in the file
        failed = {offset for offset, page in pages.items() if page is None}
        # Every page of the bad chunk fails; the kernel's block reads may take a few
        # neighbours with them, never pages a chunk away, which read exactly.
        assert {offset for offset in pages if bad_start - 4096 < offset < bad_start + CHUNK} <= (
            failed)
        assert all(bad_start - CHUNK < offset < bad_start + 2 * CHUNK for offset in failed)
        assert pages[0] == NOISE[:4096] and pages[len(NOISE) - 4096] == NOISE[-4096:]
        with pytest.raises(OSError) as whole:
            (mountpoint / "data/noise.bin").read_bytes()
        assert whole.value.errno == errno.EIO
        stats = lazyfs.run("stats", str(mountpoint), "--json")
        assert stats.returncode == 0, stats.stderr
        (layer,) = json.loads(stats.stdout)["layers"].values()
        assert layer["bad_chunks"] == [forgery.chunk_index] and layer["verify_failures"] == 1
        result = lazyfs.run("umount", str(mountpoint))
        assert result.returncode == 0, result.stderr
    logs = lazyfs.logs()
    assert f"chunk {forgery.chunk_index} " in logs and message in logs
    assert not os.path.ismount(mountpoint)
