"""The disk cache directory a mount starts with, checked before anything is read from it (the
warm start and the early requests look there first). Light to import: every command that uses
the disk cache prepares its directory, not only those that mount."""

from __future__ import annotations

from pathlib import Path

from lazyfs.cache.trust import prepare_directory, untrusted_message
from lazyfs.errors import LazyfsError


class StartupError(LazyfsError):
    """A setting the mount starts with cannot be used (a disk cache directory another user
    could change)."""


def prepare_cache_directory(directory: str) -> Path:
    """`directory`, created if missing and made private, for a disk cache
    (`lazyfs.cache.trust.prepare_directory`). Raises StartupError for one that cannot be used
    or that another user could change."""
    try:
        unsafe = prepare_directory(directory)
    except OSError as exc:
        raise StartupError(
            f"cannot use the cache directory {directory}: {exc.strerror}") from None
    if unsafe is not None:
        raise StartupError(untrusted_message(directory, unsafe))
    return Path(directory)
