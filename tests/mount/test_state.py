"""Mount records: atomic JSON files in the state directory, found by mountpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lazyfs.mount.state import (
    KEPT_LOGS,
    STATE_DIR_ENV,
    ErofsMountRecord,
    MountRecord,
    StateError,
    daemon_alive,
    iter_records,
    load_record,
    log_is_quiet,
    mount_key,
    private_dir,
    process_start_ticks,
    prune_logs,
    record_path,
    remove_record,
    retire_log,
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


# -- daemon logs ----------------------------------------------------------------------------------

INFO_LINE = "2024-05-01 12:00:00,123 lazyfs[4242] INFO lazyfs.mount.daemon: /mnt/l: ready\n"
WARNING_LINE = "2024-05-01 12:00:01,456 lazyfs[4242] WARNING lazyfs.fetch.http: retrying\n"


def logged_record(mountpoint: str, text: str, *, running: bool = False) -> MountRecord:
    """A taken-down mount (no record file) whose daemon wrote `text` to its own log; its pid
    is this process, named as a different one unless `running`."""
    record = make_record(mountpoint, pid=os.getpid())
    ticks = process_start_ticks(os.getpid()) or 0
    record.pid_start_ticks = ticks if running else ticks + 1
    log_file = private_dir(mountpoint, ".log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(text)
    record.log_file = str(log_file)
    return record


def test_a_log_is_quiet_when_every_line_is_info_or_below(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    for text, quiet in (
        ("", True),
        (INFO_LINE * 3, True),
        (INFO_LINE.replace(" INFO ", " DEBUG "), True),
        (INFO_LINE + WARNING_LINE, False),
        (INFO_LINE.replace(" INFO ", " ERROR "), False),
        (INFO_LINE + "Traceback (most recent call last):\n", False),
        (INFO_LINE + "  File \"x.py\", line 1, in <module>\n", False),  # not a log record
        # What `lazyfs run` passes on to its user, even in an INFO line:
        (INFO_LINE.replace("ready", "ERROR reading"), False),
        (INFO_LINE.replace("ready", "a Traceback"), False),
    ):
        log.write_text(text)
        assert log_is_quiet(log) is quiet, text
    assert not log_is_quiet(tmp_path / "missing.log")


def test_a_quiet_log_of_a_clean_stop_goes_with_the_mount(state_dir: Path) -> None:
    record = logged_record("/mnt/quiet", INFO_LINE * 2)
    assert retire_log(record, stopped_cleanly=True) is None
    assert not Path(record.log_file or "").exists()
    assert retire_log(record, stopped_cleanly=True) is None  # already gone is fine


def test_a_log_the_user_may_need_is_kept(state_dir: Path) -> None:
    noisy = logged_record("/mnt/noisy", INFO_LINE + WARNING_LINE)
    assert retire_log(noisy, stopped_cleanly=True) == private_dir("/mnt/noisy", ".log")
    died = logged_record("/mnt/died", INFO_LINE)
    assert retire_log(died, stopped_cleanly=False) == private_dir("/mnt/died", ".log")
    for record in (noisy, died):
        assert Path(record.log_file or "").exists()


def test_a_log_is_never_removed_while_something_may_write_to_it(state_dir: Path) -> None:
    running = logged_record("/mnt/running", INFO_LINE, running=True)
    assert retire_log(running, stopped_cleanly=True) == private_dir("/mnt/running", ".log")
    remounted = logged_record("/mnt/again", INFO_LINE)
    write_record(make_record("/mnt/again"))  # a new mount there appends to the same log
    assert retire_log(remounted, stopped_cleanly=True) == private_dir("/mnt/again", ".log")


def test_only_the_mounts_own_log_is_ever_removed(state_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "mine.log"
    elsewhere.write_text(INFO_LINE)
    record = logged_record("/mnt/own", INFO_LINE)
    record.log_file = str(elsewhere)
    assert retire_log(record, stopped_cleanly=True) is None
    other = private_dir("/mnt/other", ".log")
    other.write_text(INFO_LINE)
    record.log_file = str(other)  # in the state directory, but another mount's
    assert retire_log(record, stopped_cleanly=True) is None
    linked = private_dir("/mnt/own", ".log")
    linked.unlink()
    linked.symlink_to(elsewhere)
    record.log_file = str(linked)
    assert retire_log(record, stopped_cleanly=True) is None
    assert elsewhere.read_text() == INFO_LINE and other.exists() and linked.is_symlink()


def test_kept_logs_of_gone_mounts_are_pruned_to_the_most_recent(state_dir: Path) -> None:
    state_dir.mkdir()
    logs = [private_dir(f"/mnt/gone{i}", ".log") for i in range(KEPT_LOGS + 3)]
    for age, log in enumerate(logs):  # logs[0] the most recent
        log.write_text(WARNING_LINE)
        os.utime(log, (1e9 - age * 60, 1e9 - age * 60))
    live = make_record("/mnt/live")
    live.log_file = str(private_dir("/mnt/live", ".log"))
    write_record(live)
    (state_dir / "broken.json").write_text("{not json")  # its mount's log is left alone too
    old = {Path(live.log_file), state_dir / "broken.log", state_dir / "notes.txt"}
    for path in old:
        path.write_text(INFO_LINE)
        os.utime(path, (1, 1))
    (state_dir / "link.log").symlink_to(state_dir / "notes.txt")
    os.utime(state_dir / "link.log", (1, 1), follow_symlinks=False)

    assert sorted(prune_logs()) == sorted(logs[KEPT_LOGS:])
    left = {path for path in state_dir.iterdir() if path.suffix == ".log"}
    assert left == {*logs[:KEPT_LOGS], *old - {state_dir / "notes.txt"}, state_dir / "link.log"}
    assert prune_logs() == []
