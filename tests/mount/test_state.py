"""Mount records: atomic JSON files in the state directory, found by mountpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lazyfs.mount.state import (
    STATE_DIR_ENV,
    ErofsMountRecord,
    MountRecord,
    StateError,
    daemon_alive,
    iter_records,
    load_record,
    mount_key,
    process_start_ticks,
    record_path,
    remove_record,
    write_record,
)


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv(STATE_DIR_ENV, str(path))
    return path


def make_record(mountpoint: str, pid: int = 1) -> MountRecord:
    return MountRecord(
        mountpoint=mountpoint,
        pid=pid,
        fuse_dir="/state/x.fuse",
        sources=["http://example.test/layer.blob"],
        block_files=["/state/x.fuse/layer.blob"],
        erofs_mounts=[ErofsMountRecord("/state/x.fuse/layer.blob", mountpoint, "/dev/loop7")],
        loop_devices=["/dev/loop7"],
    )


def test_a_record_round_trips_and_leaves_no_temporary_file(state_dir: Path) -> None:
    record = make_record("/mnt/a")
    path = write_record(record)
    assert path == record_path("/mnt/a")
    assert load_record("/mnt/a") == record
    assert sorted(p.name for p in state_dir.iterdir()) == [path.name]
    assert oct(state_dir.stat().st_mode & 0o777) == "0o700"
    record.ready = True
    write_record(record)
    assert load_record("/mnt/a") == record
    remove_record("/mnt/a")
    assert load_record("/mnt/a") is None
    remove_record("/mnt/a")  # already gone is fine


def test_keys_tell_apart_mountpoints_with_the_same_name() -> None:
    assert mount_key("/a/mnt") != mount_key("/b/mnt")
    assert mount_key("/a/mnt") == mount_key("/a/mnt/")
    assert mount_key("/a/mnt").startswith("mnt-")
    assert "/" not in mount_key("/weird/na me:*")


def test_listing_shows_broken_records_instead_of_failing(state_dir: Path) -> None:
    write_record(make_record("/mnt/b"))
    write_record(make_record("/mnt/a"))
    (state_dir / "broken.json").write_text("{not json")
    (state_dir / "wrong.json").write_text('{"unexpected": 1}')
    items = list(iter_records())
    records = [item for item in items if isinstance(item, MountRecord)]
    errors = [item for item in items if isinstance(item, StateError)]
    assert [r.mountpoint for r in records] == ["/mnt/a", "/mnt/b"]
    assert len(errors) == 2 and all("not a lazyfs mount record" in str(e) for e in errors)


def test_an_unreadable_record_is_a_state_error(state_dir: Path) -> None:
    write_record(make_record("/mnt/c"))
    record_path("/mnt/c").write_text("[]")
    with pytest.raises(StateError, match="not a lazyfs mount record"):
        load_record("/mnt/c")


def test_a_recycled_pid_is_not_the_daemon() -> None:
    record = make_record("/mnt/d", pid=os.getpid())
    record.pid_start_ticks = process_start_ticks(os.getpid())
    assert daemon_alive(record)
    record.pid_start_ticks = (record.pid_start_ticks or 0) + 1
    assert not daemon_alive(record)
    assert not daemon_alive(make_record("/mnt/d", pid=0))
    beyond_max = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    assert not daemon_alive(make_record("/mnt/d", pid=beyond_max))


def test_image_records_round_trip_and_are_found_by_any_mountpoint(state_dir: Path) -> None:
    from lazyfs.mount.state import ImageRecord, find_record

    record = make_record("/mnt/first")
    record.layers_dir = "/state/first.layers"
    record.images = [
        ImageRecord("reg/app:v1", "sha256:" + "1" * 64, "linux/amd64", "/mnt/first", ["a", "b"]),
        ImageRecord(
            "reg/app:v2",
            "sha256:" + "2" * 64,
            "linux/amd64",
            "/mnt/second",
            ["a"],
            upperdir="/w/upper",
            workdir="/w/work",
        ),
    ]
    write_record(record)
    assert load_record("/mnt/first") == record
    assert record.mountpoints == ["/mnt/first", "/mnt/second"]
    assert find_record("/mnt/second") == record
    assert find_record("/mnt/first/") == record
    assert find_record("/mnt/third") is None
    assert load_record("/mnt/second") is None  # one record, under the first mountpoint


def test_a_record_from_before_images_still_loads(state_dir: Path) -> None:
    record = make_record("/mnt/old")
    path = write_record(record)
    text = path.read_text()
    for key in ("images", "layers_dir", "temp_dir"):
        assert f'"{key}"' in text
    old = {
        k: v for k, v in json.loads(text).items() if k not in ("images", "layers_dir", "temp_dir")
    }
    path.write_text(json.dumps(old))
    assert load_record("/mnt/old") == record
