"""Image mounts (`lazyfs mount REF`) against a registry that serves a forged frame which
decodes cleanly (tests/support/forged_images.py): reads of the forged chunk fail with EIO
through overlayfs and EROFS; every other byte of every layer is the image's own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support import forged_images
from tests.support.forge import read_pages
from tests.support.forged_images import (
    AFTER,
    CHUNK,
    NOISE,
    TARGET_IN_FILE,
    forged_image,
)
from tests.support.images import busybox_bytes
from tests.support.lazyfs_cli import Lazyfs
from tests.support.registry import Registry

pytestmark = [pytest.mark.root, pytest.mark.network]

# The shared module-scoped fixtures, made this module's own by name.
registry = forged_images.registry
images = forged_images.images

# case: (dm-verity, chunk table and chunk_digest forged, what the daemon logs)
CASES = {
    "frame-hash": (True, False, "SHA-512 mismatch"),
    "verity-alone": (True, True, "dm-verity: data block"),
    "frame-hash-alone": (False, False, "SHA-512 mismatch"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forged_frame_in_a_registry_is_eio_in_the_image(
    lazyfs: Lazyfs, registry: Registry, images: dict[bool, str], tmp_path: Path, case: str
) -> None:
    verity, table, message = CASES[case]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))
    with forged_image(registry, images[verity], table=table) as forged:
        lazyfs.mountpoints.append(mountpoint)
        result = lazyfs.run("mount", forged.reference, str(mountpoint), "--insecure-registry",
                            "--readahead", "0")
        assert result.returncode == 0, result.stderr
        record = lazyfs.record(mountpoint)
        assert record is not None
        lazyfs.pids.append(record["pid"])
        assert (mountpoint / "bin" / "busybox").read_bytes() == busybox_bytes()
        assert (mountpoint / "etc" / "hostname").read_bytes() == b"noisy\n"
        assert (mountpoint / "data" / "after.txt").read_bytes() == AFTER
        pages = read_pages(mountpoint / "data" / "noise.bin")
        for offset, page in pages.items():
            if page is not None:
                assert page == NOISE[offset:offset + 4096], offset
                assert forged.forgery.forged_window not in page
        assert pages[TARGET_IN_FILE - TARGET_IN_FILE % 4096] is None
        assert pages[0] == NOISE[:4096] and pages[len(NOISE) - 4096] == NOISE[-4096:]
        failed = [offset for offset, page in pages.items() if page is None]
        assert max(failed) - min(failed) < 2 * CHUNK, failed
        stats = lazyfs.run("stats", str(mountpoint), "--json")
        assert stats.returncode == 0, stats.stderr
        layers = json.loads(stats.stdout)["layers"]
        bad = {name: layer["bad_chunks"] for name, layer in layers.items() if layer["bad_chunks"]}
        assert list(bad.values()) == [[forged.forgery.chunk_index]], layers
        assert sum(layer["verify_failures"] for layer in layers.values()) == 1
        result = lazyfs.run("umount", str(mountpoint))
        assert result.returncode == 0, result.stderr
    logs = lazyfs.logs()
    assert f"chunk {forged.forgery.chunk_index} " in logs and message in logs
    assert not os.path.ismount(mountpoint)
