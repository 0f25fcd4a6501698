"""`lazyfs run` (lazy) against a registry that serves a forged frame which decodes cleanly
(tests/support/forged_images.py): the command sees EIO for the forged chunk and the image's
own bytes everywhere else, and the trace records the chunk as bad."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import forged_images
from tests.support.forged_images import (
    AFTER,
    NOISE,
    TARGET_IN_FILE,
    forged_image,
)
from tests.support.mounts import cleanup
from tests.support.registry import Registry
from tests.support.registry_images import REPO, assert_nothing_left

pytestmark = [pytest.mark.root, pytest.mark.network]

# The shared module-scoped fixtures, made this module's own by name.
registry = forged_images.registry
images = forged_images.images

CASES = {  # case: (dm-verity, chunk table and chunk_digest forged)
    "frame-hash": (True, False),
    "verity-alone": (True, True),
    "frame-hash-alone": (False, False),
}
FORGED_PAGE = TARGET_IN_FILE // 4096
SCRIPT = (
    "cat /etc/hostname; /bin/busybox md5sum /data/after.txt; "
    "/bin/busybox dd if=/data/noise.bin bs=4096 count=1 2>/dev/null | /bin/busybox md5sum; "
    f"if /bin/busybox dd if=/data/noise.bin bs=4096 skip={FORGED_PAGE} count=1 "
    "of=/tmp/page 2>/dev/null; then echo forged-page-read; /bin/busybox md5sum /tmp/page; "
    "else echo forged-page-failed; fi"
)
EXPECTED = (
    f"noisy\n{hashlib.md5(AFTER).hexdigest()}  /data/after.txt\n"
    f"{hashlib.md5(NOISE[:4096]).hexdigest()}  -\nforged-page-failed\n"
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_sees_eio_for_a_forged_frame_and_true_bytes_elsewhere(
    registry: Registry, images: dict[bool, str], tmp_path: Path, case: str
) -> None:
    verity, table = CASES[case]
    state, scratch, trace = tmp_path / "state", tmp_path / "tmp", tmp_path / "trace.jsonl"
    scratch.mkdir()
    env = {**os.environ, "LAZYFS_STATE_DIR": str(state), "TMPDIR": str(scratch)}
    try:
        with forged_image(registry, images[verity], table=table) as forged:
            result = subprocess.run(
                [sys.executable, "-m", "lazyfs", "run", forged.reference, "--insecure-registry",
                 "--readahead", "0", "--trace", str(trace), "--", "/bin/busybox", "sh", "-c",
                 SCRIPT],
                cwd=REPO, env=env, capture_output=True, timeout=180, check=False,
            )  # fmt: skip
    finally:
        cleanup(backing_prefixes=[scratch, state])
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == EXPECTED
    assert forged.forgery.forged_window not in result.stdout
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    bad = [(event["layer"], event["chunk"]) for event in events if event["event"] == "bad"]
    assert len(bad) == 1 and bad[0][1] == forged.forgery.chunk_index, events
    assert_nothing_left(scratch, state)
