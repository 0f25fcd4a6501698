"""`lazyfs snapshotter --config FILE` starts with the file's settings, an option in the place
of its key, and tells systemd when it is ready (a unit of Type=notify)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from lazyfs.cache.disk_store import DiskStore
from lazyfs.mount.fuse_connection import CONTROL_DIR, connection_id
from lazyfs.mount.host import MIN_FUSE_WORKERS
from tests.support.registry import free_port
from tests.support.snapshotter_images import scrape

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0

pytestmark = pytest.mark.root


def test_the_snapshotter_starts_with_its_file(tmp_path: Path) -> None:
    file_port, option_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[snapshotter]
address = "{tmp_path}/run/snapshotter.sock"
root = "{tmp_path}/root"

[cache]
size = "64M"
dir = "{tmp_path}/cache"
disk_size = "64M"

[timeouts]
remount_retries = 0

[metrics]
address = "127.0.0.1:{file_port}"
""")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(READY_TIMEOUT_S)
    log = tmp_path / "snapshotter.log"
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazyfs", "-v", "snapshotter", "--config", str(config),
             "--metrics-address", f"127.0.0.1:{option_port}"],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        try:
            message = notify.recv(4096)
        except TimeoutError:
            pytest.fail(f"no READY=1 within {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        assert message == b"READY=1"
        # Ready means serving: the socket of the file, the metrics of the option.
        assert (tmp_path / "run" / "snapshotter.sock").is_socket()
        assert "lazyfs_layers_mounted 0.0" in scrape(option_port)
        with pytest.raises(urllib.error.URLError):
            scrape(file_port)
        assert (tmp_path / "cache").is_dir() and (tmp_path / "root" / "fuse").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
        notify.close()
    assert status == 0, log.read_text()[-3000:]
    assert f"snapshotter ready on {tmp_path}/run/snapshotter.sock" in log.read_text()


def test_a_disk_cache_that_cannot_be_used_stops_nothing(tmp_path: Path) -> None:
    """The snapshotter's layers are hosted as a mount's are: a disk cache whose index cannot
    be opened is turned off with one warning, and the kernel may send its FUSE file system as
    many requests at a time as it has workers."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    DiskStore(cache, 1 << 20).close()
    sqlite3.connect(cache / "index.sqlite").execute("PRAGMA user_version = 99")  # too new
    address, root = tmp_path / "snapshotter.sock", tmp_path / "root"
    log = tmp_path / "snapshotter.log"
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazyfs", "-v", "snapshotter", "--address", str(address),
             "--root", str(root), "--cache-dir", str(cache), "--remount-retries", "0"],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "snapshotter ready on" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        assert address.is_socket()
        number = connection_id(str(root / "fuse"))
        limit = Path(CONTROL_DIR, str(number), "max_background")
        if not limit.parent.is_dir():
            pytest.skip(f"fusectl is not mounted at {CONTROL_DIR}")
        while int(limit.read_text()) < MIN_FUSE_WORKERS:  # raised in the background
            assert time.monotonic() < deadline, limit.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    text = log.read_text()
    assert status == 0, text[-3000:]
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert str(cache) in warnings[0] and "going on without the disk cache" in warnings[0]
