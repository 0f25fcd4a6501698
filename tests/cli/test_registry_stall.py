"""A registry that stalls on an image's manifest (or on the token it needs) fails `lazyfs mount`,
`lazyfs run` and `lazyfs pull` within --read-timeout, whatever their retries, with one line
naming the registry, the path asked for and what stalled.

The server (tests/support/stalling_registry.py) answers `/v2/` and then either sends a
manifest's headers and no body, or nothing at all. Each command is timed from outside, so its
own start-up counts: the bound is READ_TIMEOUT_S + MARGIN_S, the margin being Python's start
and lazyfs's imports before the first request (about half a second here, more on a busy
machine) and the exit after the error; one more attempt of the registry client's own
(30 s each) would be far beyond it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.lazyfs_cli import REPO
from tests.support.mounts import cleanup
from tests.support.stalling_registry import PROMISED_BYTES, StallingRegistry

READ_TIMEOUT_S = 2.0
MARGIN_S = 1.5
STALLS = {
    "headers": f"GET /v2/app/manifests/v1 answered HTTP 200, then its body stalled after 0 of "
               f"{PROMISED_BYTES} bytes (gave up at the read timeout, 2 s)",
    "silent": "no answer to GET /v2/app/manifests/v1 (gave up at the read timeout, 2 s)",
}


def lazyfs(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "LAZYFS_STATE_DIR": str(tmp_path / "state")}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lazyfs", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    return result, time.monotonic() - began


def command(name: str, image: str, tmp_path: Path) -> list[str]:
    options = ["--insecure-registry", "--read-timeout", str(READ_TIMEOUT_S)]
    if name == "mount":
        return ["mount", image, str(tmp_path / "mnt"), "--no-disk-cache", *options]
    if name == "run":
        return ["run", "--no-disk-cache", *options, image, "true"]
    return ["pull", "--containerd", str(tmp_path / "no-containerd.sock"), *options, image]


def check_fails_in_time(name: str, mode: str, tmp_path: Path, *, token: bool = False) -> str:
    """Run the command against a stalling registry; return its error line."""
    if name in ("mount", "run") and os.geteuid() != 0:
        pytest.skip(f"lazyfs {name} needs root")
    (tmp_path / "mnt").mkdir()
    with StallingRegistry(mode, token=token) as registry:
        try:
            result, took = lazyfs(tmp_path, *command(name, f"{registry.host}/app:v1", tmp_path))
        finally:
            cleanup(mountpoints=[tmp_path / "mnt"])
    print(f"\n[registry stall] lazyfs {name}, {mode}{', token' if token else ''}: "
          f"{took:.2f} s: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert took <= READ_TIMEOUT_S + MARGIN_S, (took, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"registry {registry.host}: manifest app:v1: " in lines[0]
    return lines[0]


@pytest.mark.parametrize("mode", ["headers", "silent"])
@pytest.mark.parametrize("name", ["mount", "run", "pull"])
def test_a_stalled_manifest_fails_the_command_within_the_read_timeout(
    name: str, mode: str, tmp_path: Path
) -> None:
    line = check_fails_in_time(name, mode, tmp_path)
    assert line.endswith(STALLS[mode]), line


def test_a_stalled_token_fails_the_mount_within_the_read_timeout(tmp_path: Path) -> None:
    line = check_fails_in_time("mount", "silent", tmp_path, token=True)
    assert line.endswith("no answer to GET /token (gave up at the read timeout, 2 s)"), line
