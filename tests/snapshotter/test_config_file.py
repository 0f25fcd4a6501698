"""`lazyfs snapshotter --config FILE` starts with the file's settings, an option in the place
of its key, and tells systemd when it is ready (a unit of Type=notify)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

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
