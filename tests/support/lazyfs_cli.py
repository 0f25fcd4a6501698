"""`lazyfs` run as a subprocess with a private state directory, for tests that mount through
the CLI, and the waits they share."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 30.0


@contextlib.contextmanager
def killed_if_left(process: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """A test's own process: killed and reaped if it still runs when the block ends (a failed
    assertion, a timeout), so that no test leaves it behind."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Lazyfs:
    """Runs the CLI with a private state directory and disk cache (`cache_dir`, beside the
    state directory unless given), and remembers what to clean up."""

    def __init__(self, state_dir: Path, cache_dir: Path | None = None) -> None:
        self.state_dir = state_dir
        self.cache_dir = cache_dir or state_dir.with_name(state_dir.name + "-disk-cache")
        self.env = {**os.environ, "LAZYFS_STATE_DIR": str(state_dir),
                    "LAZYFS_CACHE_DIR": str(self.cache_dir)}
        self.mountpoints: list[Path] = []
        self.pids: list[int] = []
        self.expected_log_levels: set[str] = set()

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lazyfs", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "lazyfs", *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pids.append(process.pid)
        return process

    def mount(self, *args: str, mountpoint: Path) -> dict[str, Any]:
        """Mount (the last argument is the mountpoint or --block-only DIR); return the record."""
        self.mountpoints.append(mountpoint)
        result = self.run("mount", *args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        record = self.record(mountpoint)
        assert record is not None and record["ready"]
        self.pids.append(record["pid"])
        return record

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(path.read_text()) for path in sorted(self.state_dir.glob("*.json"))]

    def record(self, mountpoint: Path) -> dict[str, Any] | None:
        found = [r for r in self.records() if r["mountpoint"] == str(mountpoint)]
        return found[0] if found else None

    def logs(self) -> str:
        return "".join(path.read_text() for path in self.state_dir.glob("*.log"))

    def unexpected_log_lines(self) -> list[str]:
        """Daemon log lines at WARNING or above that the test did not announce."""
        found = []
        for line in self.logs().splitlines():
            level = re.search(r"\] (WARNING|ERROR|CRITICAL) ", line)
            if "Traceback" in line or (level and level.group(1) not in self.expected_log_levels):
                found.append(line)
        return found
