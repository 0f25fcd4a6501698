"""Fixtures of the FUSE tests: a `lazyfs` CLI that cleans up after itself, and a mountpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lazyfs_cli import Lazyfs
from tests.support.mounts import cleanup


@pytest.fixture
def lazyfs(tmp_path: Path) -> Iterator[Lazyfs]:
    tool = Lazyfs(tmp_path / "state")
    try:
        yield tool
    finally:
        pids = tool.pids + [r["pid"] for r in tool.records() if r["pid"] not in tool.pids]
        try:
            for record in tool.records():  # the orderly way first, then by force
                tool.run("umount", record["mountpoint"], timeout=60)
        finally:  # also after an umount that hung
            cleanup(mountpoints=tool.mountpoints, backing_prefixes=[tool.state_dir], pids=pids)
    assert tool.unexpected_log_lines() == [], tool.logs()


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path
