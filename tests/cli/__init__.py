"""Helpers for command-line tests: run `python -m lazyfs` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_SECONDS = 300


def lazyfs_env(**extra: str) -> dict[str, str]:
    """The environment for a lazyfs subprocess: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_lazyfs(*args: str | os.PathLike[str], cwd: Path | None = None,
               **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m lazyfs ARGS...` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "lazyfs", *map(os.fspath, args)],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, cwd=cwd,
        env=lazyfs_env(**env), check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A user error: exit status 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("lazyfs "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
