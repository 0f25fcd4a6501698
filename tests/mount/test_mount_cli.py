"""`lazyfs mount`, `stats`, `mounts` and `umount` run as subprocesses against real FUSE,
EROFS and loop mounts. Every test tears down mounts, loop devices and daemons in `finally`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from lazyfs.format.chunk_table import parse_chunk_table
from lazyfs.format.descriptor import parse_descriptor
from lazyfs.format.frames import parse_skippable_frame
from tests.layer.helpers import write_blob
from tests.support.lazyfs_cli import WAIT_S, Lazyfs, killed_if_left, pid_gone, wait_until
from tests.support.mounts import mounts_below

pytestmark = pytest.mark.root

VECTORS = ["basic-verity-64k", "basic-noverity"]


def check_tree(root: Path, files_json: Path) -> None:
    """Every file of a vector's listing has its mode, size and content (or link target)."""
    listing = json.loads(files_json.read_text())
    for entry in listing["files"]:
        path = root / entry["path"]
        info = path.lstat()
        assert oct(info.st_mode) == entry["mode"], entry["path"]
        if stat.S_ISREG(info.st_mode):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], path
        elif stat.S_ISLNK(info.st_mode):
            assert os.readlink(path) == entry["target"]


@pytest.fixture(scope="module")
def tree_blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """An encoder-written blob of a mkfs.erofs image, chunked at 64 KiB, and its files."""
    work = tmp_path_factory.mktemp("tree")
    files = {
        "small.txt": b"hello from lazyfs\n",
        "big.bin": os.urandom(1536 * 1024),
        "dir/nested.txt": b"nested\n" * 1000,
    }
    for name, data in files.items():
        (work / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "src" / name).write_bytes(data)
    raw = work / "image.erofs"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-T0", "--all-root", str(raw), str(work / "src")], check=True
    )
    blob, _ = write_blob(work, raw.read_bytes(), name="tree", chunk_size=65536)
    return blob, files


# -- mount, read, stats, umount -----------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS)
def test_mount_reads_verified_files_then_umount(
    lazyfs: Lazyfs, vectors_dir: Path, mountpoint: Path, vector: str
) -> None:
    record = lazyfs.mount(
        str(vectors_dir / f"{vector}.blob"), str(mountpoint), mountpoint=mountpoint
    )
    wait_until(lambda: os.path.ismount(mountpoint), "the EROFS mount")
    check_tree(mountpoint, vectors_dir / f"{vector}.files.json")

    listed = lazyfs.run("mounts")
    assert listed.returncode == 0
    assert str(mountpoint) in listed.stdout and "mounted" in listed.stdout

    result = lazyfs.run("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert not os.path.ismount(mountpoint)
    assert mounts_below(record["fuse_dir"]) == []
    assert lazyfs.records() == []
    assert list(lazyfs.state_dir.glob("*.log")) == []  # it logged nothing worth keeping
    wait_until(lambda: pid_gone(record["pid"]), "the daemon to exit")
    assert lazyfs.run("mounts").stdout == ""


def test_stats_count_fetches_cache_and_reads(
    lazyfs: Lazyfs, vectors_dir: Path, mountpoint: Path
) -> None:
    began = time.monotonic()
    lazyfs.mount(str(vectors_dir / "basic-verity-64k.blob"), str(mountpoint), mountpoint=mountpoint)
    (mountpoint / "usr" / "share.txt").read_bytes()

    result = lazyfs.run("stats", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    layer = stats["layers"]["basic-verity-64k.blob"]
    assert 0 < layer["chunks_fetched"] <= layer["chunk_count"] == 11
    assert layer["bytes_fetched"] > 0 and layer["requests"] > 0
    assert layer["verify_failures"] == 0
    assert stats["daemon"]["reads"] > 0 and stats["daemon"]["read_errors"] == 0
    wall_s = time.monotonic() - began  # the daemon started and every read ended within it
    assert 0 < stats["daemon"]["first_read_after_s"] < wall_s
    assert 0 < stats["daemon"]["read_latency"]["p99_ms"] < wall_s * 1000
    cache = stats["cache"]
    assert cache["capacity_bytes"] == 256 << 20  # the default --cache-size
    # Entries: the chunks fetched, and the lowest-level dm-verity hash blocks that verified
    # them (kept in the same cache, within its cap), one 4 KiB block per 64 chunks or fewer.
    assert layer["chunks_fetched"] <= cache["entries"] <= 2 * layer["chunks_fetched"]
    assert 0 < cache["size_bytes"] <= cache["capacity_bytes"]
    assert cache["misses"] > 0 and cache["evictions"] == 0
    # Counted once, by the cache; the one layer's share is all of it.
    assert (layer["cache_hits"], layer["cache_misses"]) == (cache["hits"], cache["misses"])

    text = lazyfs.run("stats", str(mountpoint))
    assert text.returncode == 0, text.stderr
    for label in (
        "read latency",
        "chunks fetched",
        "chunk cache",
        f"in {cache['entries']} entries",
        "hits / misses",
        "evictions",
        "verification failures",
        "first read after",
    ):
        assert label in text.stdout
    assert f"of {layer['chunk_count']}" in text.stdout


def test_sigterm_to_the_daemon_tears_everything_down(
    lazyfs: Lazyfs, tree_blob: tuple[Path, dict[str, bytes]], mountpoint: Path
) -> None:
    blob, files = tree_blob
    record = lazyfs.mount(str(blob), str(mountpoint), mountpoint=mountpoint)
    for name, data in files.items():
        assert (mountpoint / name).read_bytes() == data

    os.kill(record["pid"], signal.SIGTERM)
    wait_until(lambda: pid_gone(record["pid"]), "the daemon to exit")
    assert not os.path.ismount(mountpoint)
    assert mounts_below(record["fuse_dir"]) == []
    assert not os.path.exists(record["fuse_dir"])
    assert lazyfs.records() == []
    assert "SIGTERM received" in lazyfs.logs()


def test_umount_cleans_up_after_a_killed_daemon(
    lazyfs: Lazyfs, tree_blob: tuple[Path, dict[str, bytes]], mountpoint: Path
) -> None:
    blob, _ = tree_blob
    record = lazyfs.mount(str(blob), str(mountpoint), mountpoint=mountpoint)
    os.kill(record["pid"], signal.SIGKILL)
    wait_until(lambda: pid_gone(record["pid"]), "the daemon to die")
    assert "dead" in lazyfs.run("mounts").stdout

    result = lazyfs.run("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert mounts_below(mountpoint) == [] and mounts_below(record["fuse_dir"]) == []
    assert lazyfs.records() == []
    assert "daemon's log is kept" in result.stderr and record["log_file"] in result.stderr
    assert "ready after" in Path(record["log_file"]).read_text()  # what it logged before


def test_busy_mount_is_not_unmounted_until_released(
    lazyfs: Lazyfs, tree_blob: tuple[Path, dict[str, bytes]], mountpoint: Path
) -> None:
    blob, files = tree_blob
    lazyfs.mount(str(blob), str(mountpoint), mountpoint=mountpoint)
    with open(mountpoint / "small.txt", "rb") as busy:
        result = lazyfs.run("umount", str(mountpoint))
        assert result.returncode == 2
        assert "busy" in result.stderr and len(result.stderr.splitlines()) == 1
        assert busy.read() == files["small.txt"]  # still served
    result = lazyfs.run("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)


# -- refusals and failures ----------------------------------------------------------------------


def test_mountpoint_must_be_an_empty_unmounted_directory(
    lazyfs: Lazyfs, vectors_dir: Path, tmp_path: Path, mountpoint: Path
) -> None:
    blob = str(vectors_dir / "basic-verity-64k.blob")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    (tmp_path / "plain").write_text("x")
    for target, message in (
        (tmp_path / "full", "not empty"),
        (tmp_path / "missing", "existing empty directory"),
        (tmp_path / "plain", "existing empty directory"),
    ):
        result = lazyfs.run("mount", blob, str(target))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.splitlines()) == 1

    lazyfs.mount(blob, str(mountpoint), mountpoint=mountpoint)
    again = lazyfs.run("mount", blob, str(mountpoint))
    assert again.returncode == 2 and "already a lazyfs mount" in again.stderr

    other = tmp_path / "tmpfs"
    other.mkdir()
    lazyfs.mountpoints.append(other)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    result = lazyfs.run("mount", blob, str(other))
    assert result.returncode == 2 and "already mounted" in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cache-size", "12Q"], "--cache-size '12Q': not a size"),
        (["--cache-size", "0"], "--cache-size must be positive"),
        (["--header", "no colon"], "expected 'Name: value'"),
        (["--readahead", "-1"], "--readahead must be 0 or more"),
        (["--block-only", "/tmp"], "replaces MOUNTPOINT"),
    ],
)
def test_bad_options_are_one_line_errors(
    lazyfs: Lazyfs, vectors_dir: Path, mountpoint: Path, options: list[str], message: str
) -> None:
    result = lazyfs.run(
        "mount", str(vectors_dir / "basic-verity-64k.blob"), str(mountpoint), *options
    )
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert lazyfs.records() == [] and not os.path.ismount(mountpoint)


def test_start_failure_is_reported_in_one_line_and_leaves_nothing(
    lazyfs: Lazyfs, tmp_path: Path, mountpoint: Path
) -> None:
    lazyfs.mountpoints.append(mountpoint)
    lazyfs.expected_log_levels.add("ERROR")  # the reason, also in the daemon log
    result = lazyfs.run("mount", str(tmp_path / "absent.blob"), str(mountpoint))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "absent.blob" in result.stderr
    assert lazyfs.records() == []
    assert mounts_below(mountpoint) == [] and mounts_below(lazyfs.state_dir) == []


def test_layer_without_digests_needs_insecure(
    lazyfs: Lazyfs, vectors_dir: Path, mountpoint: Path
) -> None:
    descriptor = parse_descriptor((vectors_dir / "basic-noverity.descriptor.json").read_text())
    offset = descriptor.seekable().chunk_table_offset
    args = [
        str(vectors_dir / "basic-noverity.blob"),
        str(mountpoint),
        "--chunk-table-offset",
        str(offset),
    ]
    lazyfs.mountpoints.append(mountpoint)
    lazyfs.expected_log_levels.add("ERROR")  # the refusal, also in the daemon log
    refused = lazyfs.run("mount", *args)
    assert refused.returncode == 2 and "--insecure" in refused.stderr
    assert not os.path.ismount(mountpoint) and lazyfs.records() == []

    lazyfs.expected_log_levels.add("WARNING")  # "NOT authenticated"
    lazyfs.mount(*args, "--insecure", mountpoint=mountpoint)
    check_tree(mountpoint, vectors_dir / "basic-noverity.files.json")


def test_corrupted_frame_fails_reads_with_eio_only_there(
    lazyfs: Lazyfs, tree_blob: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    blob, _ = tree_blob
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(blob, bad / "tree.blob")
    shutil.copy(blob.with_name("tree.descriptor.json"), bad / "tree.descriptor.json")
    descriptor = parse_descriptor((bad / "tree.descriptor.json").read_text())
    table_offset = descriptor.seekable().chunk_table_offset
    data = bytearray((bad / "tree.blob").read_bytes())
    table = parse_chunk_table(parse_skippable_frame(bytes(data[table_offset:])).payload)
    # Flip one byte in the middle of chunk 10's frame.
    start = table.frame_offsets[10]
    end = table.frame_offsets[11]
    data[(start + end) // 2] ^= 0x40
    (bad / "tree.blob").write_bytes(bytes(data))

    block_dir = tmp_path / "block"
    block_dir.mkdir()
    lazyfs.expected_log_levels.update(("WARNING", "ERROR"))  # the integrity failure, once
    lazyfs.mount(str(bad / "tree.blob"), "--block-only", str(block_dir), mountpoint=block_dir)
    with open(block_dir / "tree.blob", "rb") as block:
        assert len(block.read(65536)) == 65536  # chunk 0 is fine
        block.seek(10 * 65536)
        with pytest.raises(OSError) as info:
            block.read(4096)
        assert info.value.errno == errno.EIO
    stats = json.loads(lazyfs.run("stats", str(block_dir), "--json").stdout)
    assert stats["layers"]["tree.blob"]["verify_failures"] == 1
    assert stats["layers"]["tree.blob"]["bad_chunks"] == [10]
    assert stats["daemon"]["read_errors"] >= 1

    result = lazyfs.run("umount", str(block_dir))
    assert result.returncode == 0, result.stderr
    kept = list(lazyfs.state_dir.glob("*.log"))  # the user may want to read why
    assert len(kept) == 1 and str(kept[0]) in result.stderr
    assert "verification failed" in kept[0].read_text()


# -- block-only, foreground, HTTP -----------------------------------------------------------------


def test_block_only_exposes_the_verified_raw_image(
    lazyfs: Lazyfs, vectors_dir: Path, tmp_path: Path
) -> None:
    block_dir = tmp_path / "block"
    block_dir.mkdir()
    lazyfs.mount(
        str(vectors_dir / "basic-verity-64k.blob"),
        "--block-only",
        str(block_dir),
        mountpoint=block_dir,
    )
    assert sorted(os.listdir(block_dir)) == [".lazyfs-stats.json", "basic-verity-64k.blob"]
    block = block_dir / "basic-verity-64k.blob"
    expected = json.loads((vectors_dir / "basic-verity-64k.files.json").read_text())
    info = block.stat()
    assert info.st_size == expected["raw_erofs_size"]
    assert stat.S_IMODE(info.st_mode) == 0o444
    assert hashlib.sha256(block.read_bytes()).hexdigest() == expected["raw_erofs_sha256"]
    subprocess.run(["fsck.erofs", str(block)], check=True, capture_output=True)
    with pytest.raises(OSError) as info_write:
        open(block, "r+b")  # noqa: SIM115 - must fail before there is anything to close
    assert info_write.value.errno in (errno.EROFS, errno.EACCES)
    assert json.loads((block_dir / ".lazyfs-stats.json").read_bytes())["daemon"]["reads"] > 0
    assert "block-only" in lazyfs.run("mounts").stdout

    result = lazyfs.run("umount", str(block_dir))
    assert result.returncode == 0, result.stderr
    assert mounts_below(block_dir) == [] and os.listdir(block_dir) == []


def test_foreground_mount_stops_on_sigint(
    lazyfs: Lazyfs, vectors_dir: Path, mountpoint: Path
) -> None:
    lazyfs.mountpoints.append(mountpoint)
    process = lazyfs.popen(
        "mount", "--foreground", str(vectors_dir / "basic-noverity.blob"), str(mountpoint)
    )
    with killed_if_left(process):
        # Ready, not merely mounted: a signal before readiness is a failed start (exit 2).
        wait_until(
            lambda: bool((lazyfs.record(mountpoint) or {}).get("ready"))
            or process.poll() is not None,
            "the foreground mount",
        )
        assert process.poll() is None, process.communicate()
        check_tree(mountpoint, vectors_dir / "basic-noverity.files.json")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=WAIT_S)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert not os.path.ismount(mountpoint) and lazyfs.records() == []


@pytest.mark.network
def test_mount_over_http_with_headers(
    lazyfs: Lazyfs, vectors_dir: Path, tmp_path: Path, mountpoint: Path
) -> None:
    from tests.support.nginx import serve_directory

    served = tmp_path / "served"
    served.mkdir()
    for name in ("basic-verity-64k.blob", "basic-verity-64k.descriptor.json"):
        shutil.copy(vectors_dir / name, served / name)
    with serve_directory(served) as server:
        lazyfs.mount(
            server.url + "basic-verity-64k.blob",
            str(mountpoint),
            "--header",
            "X-Lazyfs-Test: 1",
            mountpoint=mountpoint,
        )
        try:
            check_tree(mountpoint, vectors_dir / "basic-verity-64k.files.json")
            stats = json.loads(lazyfs.run("stats", str(mountpoint), "--json").stdout)
            layer = stats["layers"]["basic-verity-64k.blob"]
            assert layer["source"].startswith("http://127.0.0.1:")
            assert layer["requests"] > 0 and layer["verify_failures"] == 0
        finally:
            result = lazyfs.run("umount", str(mountpoint))
        assert result.returncode == 0, result.stderr


@pytest.mark.network
def test_umount_stops_a_mount_that_is_still_starting(lazyfs: Lazyfs, mountpoint: Path) -> None:
    """A server that accepts and never answers keeps the daemon opening the layer."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        lazyfs.mountpoints.append(mountpoint)
        process = lazyfs.popen("mount", f"http://127.0.0.1:{port}/layer.blob", str(mountpoint))
        with killed_if_left(process):
            wait_until(lambda: lazyfs.record(mountpoint) is not None, "the starting record")
            record = lazyfs.record(mountpoint)
            assert record is not None and not record["ready"]
            assert "starting" in lazyfs.run("mounts").stdout

            result = lazyfs.run("umount", str(mountpoint))
            assert result.returncode == 0, result.stderr
            _, stderr = process.communicate(timeout=WAIT_S)
    assert process.returncode == 2
    assert stderr.strip().endswith("stopped by a signal before the mount was ready")
    assert lazyfs.records() == [] and not os.path.ismount(mountpoint)
    wait_until(lambda: pid_gone(record["pid"]), "the daemon to exit")
