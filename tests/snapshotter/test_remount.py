"""The background remount policy: bounded, growing delays; bad knobs refused at the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.snapshotter.remount import RemountPolicy

REPO = Path(__file__).resolve().parents[2]


def test_delays_start_at_a_second_double_and_stop() -> None:
    assert list(RemountPolicy().delays()) == [1, 2, 4, 8, 16, 32, 60, 60]
    assert list(RemountPolicy(attempts=3, max_delay_s=0.3).delays()) == [0.3, 0.3, 0.3]
    assert list(RemountPolicy(attempts=0).delays()) == []


@pytest.mark.parametrize("attempts, max_delay_s", [(-1, 60.0), (8, 0.0), (8, -1.0)])
def test_bad_policies_are_refused(attempts: int, max_delay_s: float) -> None:
    with pytest.raises(ValueError, match="remount"):
        RemountPolicy(attempts=attempts, max_delay_s=max_delay_s)


@pytest.mark.root
def test_the_cli_refuses_bad_remount_knobs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "snapshotter", "--address", str(tmp_path / "s.sock"),
         "--root", str(tmp_path / "root"), "--remount-retries", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--remount-retries -1" in result.stderr
    assert not (tmp_path / "root").exists()
