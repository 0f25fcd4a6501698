"""Whether the disk cache's directory is safe to use, and the private modes of what the cache
creates.

The disk cache holds one thing no digest authenticates: the manifest a tag pointed to last,
which `lazyfs run IMAGE:TAG` and `lazyfs mount` use without asking the registry
(`lazyfs.oci.image_memory`). Whoever can write the directory, or one of its parents (and so
rename the directory away and put another in its place), can plant such a pointer and its
manifest, and root then mounts and runs the planted image. Root also writes in the directory
(the index and sqlite's -wal and -shm files beside it, entries renamed into place, old
temporary files swept away): a symbolic link planted there would turn those writes and
unlinks onto any file of the machine. So a directory is used only when no other user can
change what its path leads to, judged as OpenSSH judges a user's files and their parents
(`safe_path`, StrictModes):

- the directory and each directory above it, up to /, belong to us (the effective uid) or to
  root;
- none can be written by its group or by others, with one exception: a parent with the
  sticky bit (/tmp, mode 1777). There only the owner of an entry (or of the directory, which
  must be us or root) may rename or remove that entry, so other users can add names beside
  ours but cannot replace ours: such a parent is safe when the entry below it on the way is
  ours or root's. The directory itself gets no such exception: other users could create in it
  whatever the cache has not created yet.

The path is walked twice, with its symbolic links resolved and as given: the first covers
the directories the links lead to, the second the directories each link was found in (a link
in a directory another user can write could be pointed elsewhere after the check). A part of
the path that does not exist yet is skipped, and the deepest part that exists is judged as
the directory itself, without the sticky exception (another user could create the missing
part first): that is why a cache is created before it is judged (`prepare_directory`). What
lies inside a safe directory is not walked: only its owner and root can have put it there,
unless the directory was open to others before (`lazyfs cache clear` empties it).

What the cache creates is private to its owner: directories 0700, files 0600 (the index and
its -wal and -shm files, the entries: they name layers' URLs and images). A directory that an
older lazyfs created 0755 is tightened when it is ours; one that other users could write is
refused rather than tightened, since they may have planted something in it already.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

PRIVATE_DIRECTORY_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
# What can be wrong with a directory.
FOREIGN = "belongs to another user"
WORLD_WRITABLE = "can be written by other users"
GROUP_WRITABLE = "can be written by its group"


@dataclass(frozen=True)
class UnsafeDirectory:
    """A directory on the way to the cache that another user could change: its path, its
    owner's uid, its permission bits (with the sticky bit) and what is wrong with it."""

    path: str
    uid: int
    mode: int
    problem: str

    @property
    def owner(self) -> str:
        """The owner's name and uid ("uid N" alone for a uid without a name)."""
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"
        return f"{name} (uid {self.uid})"

    def __str__(self) -> str:
        return f"{self.path} (owner {self.owner}, mode {self.mode:04o}) {self.problem}"


def find_unsafe(path: str | os.PathLike[str], *, uid: int | None = None,
                ) -> UnsafeDirectory | None:
    """The first directory, from `path` up to /, that a user other than `uid` (default: the
    effective uid) or root could change (see the module docstring), or None when there is
    none."""
    owners = {0, os.geteuid() if uid is None else uid}
    given = os.path.abspath(path)
    for way in dict.fromkeys((os.path.realpath(given), given)):
        found = _walk(way, owners)
        if found is not None:
            return found
    return None


def untrusted_message(directory: str | os.PathLike[str], unsafe: UnsafeDirectory) -> str:
    """The one-line refusal of the cache in `directory`, which `unsafe` makes unsafe."""
    fix = (f"make {unsafe.path} yours or root's" if unsafe.problem == FOREIGN
           else f"chmod go-w {unsafe.path}")
    return (f"disk cache {directory} refused: {unsafe}: they could plant the image that "
            f"lazyfs mounts and runs; {fix}, or give another --cache-dir")


def prepare_directory(path: str | os.PathLike[str]) -> UnsafeDirectory | None:
    """Make `path` ready to hold a cache: created if missing (mode 0700; missing parents as
    `mkdir -p` makes them), judged (`find_unsafe`), and, when safe and ours, made private.
    Returns what makes it unsafe (it is then left as it is), else None. Raises OSError when
    it cannot be created or changed."""
    directory = Path(path)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=PRIVATE_DIRECTORY_MODE)
    found = find_unsafe(directory)
    if found is None and directory.is_dir():
        _make_private(directory)
    return found


def private_opener(path: str, flags: int) -> int:
    """An `open(..., opener=)` that creates files with mode 0600."""
    return os.open(path, flags, PRIVATE_FILE_MODE)


def prepare_database(path: str | os.PathLike[str]) -> None:
    """Before sqlite opens the database `path`: create it empty with mode 0600 (sqlite gives
    the -wal and -shm files it creates the database's mode), or make private an existing one
    of ours and the companions sqlite left beside it. Raises OSError."""
    database = Path(path)
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     PRIVATE_FILE_MODE))
    for name in (database, *(database.with_name(database.name + suffix)
                             for suffix in SQLITE_COMPANIONS)):
        _make_private(name)


def _make_private(path: Path) -> None:
    """Take group and others' access away from `path` when it is ours (missing: nothing)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    if status.st_uid == os.geteuid() and stat.S_IMODE(status.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(status.st_mode) & ~0o077)


def _walk(path: str, owners: set[int]) -> UnsafeDirectory | None:
    """Judge `path` and every directory above it; the first unsafe one, or None."""
    below: os.stat_result | None = None  # the entry on the way, as its parent holds it
    current = path
    while True:
        try:
            entry = os.lstat(current)
            target = os.stat(current) if stat.S_ISLNK(entry.st_mode) else entry
        except OSError:  # not there yet, or not ours to look at: judged by what is above
            below = None
        else:
            found = _judge(current, target, below, owners)
            if found is not None:
                return found
            below = entry
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def _judge(path: str, status: os.stat_result, below: os.stat_result | None,
           owners: set[int]) -> UnsafeDirectory | None:
    mode = stat.S_IMODE(status.st_mode)
    if status.st_uid not in owners:
        problem = FOREIGN
    elif not mode & _OTHERS_WRITE:
        return None
    elif mode & stat.S_ISVTX and below is not None and below.st_uid in owners:
        return None  # sticky: only we (or root) may rename or remove the entry below
    elif mode & stat.S_IWOTH:
        problem = WORLD_WRITABLE
    else:
        problem = GROUP_WRITABLE
    return UnsafeDirectory(path, status.st_uid, mode, problem)
