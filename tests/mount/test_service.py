"""The mount service's public calls, used the way a program other than the CLI would: mount a
layer blob, read through the mount, read its statistics, unmount; and the mountpoint checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.mount import service
from lazyfs.mount.service import (
    MountpointError,
    NotMountedError,
    check_mountpoint,
    find_mount,
    log_path,
    unmount,
)
from lazyfs.mount.state import MountRecord, process_start_ticks, remove_record, write_record
from tests.layer.helpers import write_blob
from tests.support.lazyfs_cli import REPO, pid_gone
from tests.support.mounts import cleanup, mounts_below

# Run in a process of its own: the daemon is forked, which must happen before trio runs.
SCRIPT = """
import json, os, sys
from lazyfs.startup.open import LayerSource
from lazyfs.mount.service import (
    MountOptions, check_mountpoint, find_mount, layer_config, read_stats, start, unmount)

blob, mountpoint = sys.argv[1:3]
record = start(layer_config(LayerSource(blob=blob), check_mountpoint(mountpoint),
                            options=MountOptions(8 << 20)))
print(json.dumps({"pid": record.pid}), flush=True)
with open(os.path.join(mountpoint, "hello.txt")) as stream:
    text = stream.read()
stats = read_stats(find_mount(mountpoint))
unmount(mountpoint)
print(json.dumps({"text": text, "layers": sorted(stats["layers"]), "ready": record.ready}))
"""


@pytest.mark.root
def test_mount_layer_read_stats_and_unmount(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello from the service\n")
    raw = tmp_path / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "--all-root", str(raw), str(src)], check=True)
    blob, _ = write_blob(tmp_path, raw.read_bytes(), name="layer")
    mountpoint, state = tmp_path / "mnt", tmp_path / "state"
    mountpoint.mkdir()
    env = {**os.environ, "LAZYFS_STATE_DIR": str(state)}
    pid = None
    try:
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(blob), str(mountpoint)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        lines = result.stdout.splitlines()
        pid = json.loads(lines[0])["pid"] if lines else None
        assert result.returncode == 0, result.stderr
        assert json.loads(lines[1]) == {
            "text": "hello from the service\n",
            "layers": ["layer.blob"],
            "ready": True,
        }
        assert mounts_below(tmp_path) == []
        assert list(state.glob("*.json")) == []
        assert list(state.glob("*.log")) == []  # nothing in it worth keeping
        assert pid is not None and pid_gone(pid)
    finally:
        cleanup(mountpoints=[mountpoint], backing_prefixes=[state], pids=[pid])


def test_check_mountpoint_wants_an_empty_unmounted_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAZYFS_STATE_DIR", str(tmp_path / "state"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_mountpoint(str(empty)) == str(empty.resolve())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("")
    with pytest.raises(MountpointError, match="is not empty"):
        check_mountpoint(str(tmp_path / "full"))
    with pytest.raises(MountpointError, match="must be an existing empty directory"):
        check_mountpoint(str(tmp_path / "missing"))
    with pytest.raises(NotMountedError, match="no lazyfs mount here"):
        find_mount(str(empty))


def test_unmount_removes_the_log_of_a_clean_stop_and_keeps_a_dead_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log goes with the mount only when its daemon ran until it was stopped and has
    exited; a process stands in for the daemon, `stop_mount` for the teardown."""
    monkeypatch.setenv("LAZYFS_STATE_DIR", str(tmp_path / "state"))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    daemon = subprocess.Popen(["sleep", "60"])

    async def stop_mount(record: MountRecord, *, lazy: bool = False) -> None:
        daemon.kill()
        daemon.wait()
        remove_record(record.mountpoint)

    monkeypatch.setattr(service, "stop_mount", stop_mount)
    log_file = Path(log_path(str(mountpoint)))
    record = MountRecord(mountpoint=str(mountpoint), pid=daemon.pid,
                         pid_start_ticks=process_start_ticks(daemon.pid),
                         fuse_dir=str(tmp_path / "fuse"), log_file=str(log_file))
    try:
        for stopped_running, kept in ((True, None), (False, log_file)):
            log_file.write_text("2024-05-01 12:00:00,123 lazyfs[1] INFO x: ready\n")
            write_record(record)  # the second time, of a daemon that has died
            assert unmount(str(mountpoint)) == kept
            assert log_file.exists() is not stopped_running
    finally:
        daemon.kill()
        daemon.wait()
    assert unmount(str(mountpoint), missing_ok=True) is None
