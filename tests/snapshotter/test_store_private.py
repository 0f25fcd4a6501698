"""The snapshotter's metadata database names images and the URLs of their layers: it is
private to its owner, and so are the -wal and -shm files sqlite keeps beside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lazyfs.snapshotter.store import Kind, Store

DATABASE_FILES = ("metadata.db", "metadata.db-wal", "metadata.db-shm")


def modes(directory: Path) -> dict[str, int]:
    return {name: stat.S_IMODE(os.stat(directory / name).st_mode) for name in DATABASE_FILES}


def test_the_database_and_its_wal_and_shm_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        store = Store(str(tmp_path / "metadata.db"))
        try:
            store.create("extract-1", "", Kind.ACTIVE, {})
            assert modes(tmp_path) == dict.fromkeys(DATABASE_FILES, 0o600)
        finally:
            store.close()
        # One left readable by all by an older lazyfs is made private when opened again.
        (tmp_path / "metadata.db").chmod(0o644)
        store = Store(str(tmp_path / "metadata.db"))
        try:
            store.create("extract-2", "", Kind.ACTIVE, {})
            assert modes(tmp_path) == dict.fromkeys(DATABASE_FILES, 0o600)
        finally:
            store.close()
    finally:
        os.umask(old_umask)
