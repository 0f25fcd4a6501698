"""The root of lazyfs's user-facing errors.

Every error that describes bad input, an unreachable source or a failed mount (not a bug in
lazyfs) derives from `LazyfsError`, so the CLI has one handler that prints it as one line
without a traceback. Each layer keeps its own family below it (`FormatError`, `FetchError`,
`LayerOpenError`, `MountError`, `ConvertError`). This module imports nothing of lazyfs.
"""

from __future__ import annotations


class LazyfsError(Exception):
    """Something the user can act on; the message says what is wrong and where."""
