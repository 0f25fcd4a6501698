"""The container process: its environment, and the exit statuses of the init script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.container.process import DEFAULT_PATH, INIT_SCRIPT, container_env


def test_the_environment_comes_from_the_image_with_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("SECRET", "not passed on")
    assert container_env([]) == {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm"}
    env = container_env(["PATH=/opt/bin", "EQ=a=b", "EMPTY=", "junk", "=x"])
    assert env["PATH"] == "/opt/bin" and env["EQ"] == "a=b" and env["EMPTY"] == ""
    assert "SECRET" not in env and "junk" not in env and "" not in env



@pytest.mark.root
def test_the_init_script_reports_setup_and_exec_failures(tmp_path: Path) -> None:
    def init(root: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
        spec = json.dumps({"root": str(root), "argv": argv, "env": {}, "cwd": "/"})
        return subprocess.run(
            [sys.executable, "-I", "-S", str(INIT_SCRIPT), spec],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    failed = init(not_a_directory, ["/bin/sh"])
    assert failed.returncode == 125
    assert failed.stderr.startswith("lazyfs run: cannot set up the container:")
    empty = tmp_path / "root"
    empty.mkdir()
    missing = init(empty, ["/no/such/command"])
    assert missing.returncode == 127
    assert missing.stderr == "lazyfs run: /no/such/command: No such file or directory\n"
    # /proc, /dev and /dev/shm were mounted in the command's mount namespace only.
    assert sorted(os.listdir(empty)) == ["dev", "proc", "tmp"]
    assert os.listdir(empty / "dev") == [] and os.listdir(empty / "proc") == []
