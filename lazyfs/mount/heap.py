"""The daemon's heap, held to what it uses: what it frees goes back to the kernel in time.

A daemon's large buffers (chunks, frames, the pieces of frames streaming in, replies) are
made and freed all the time, in the trio thread and the decode threads. glibc's malloc keeps
freed memory for reuse, in an arena per thread and as holes among small objects, so that a
daemon's RSS grew well past what it held (up to twice the chunk cache). Giving each large
buffer a mapping of its own (a fixed mmap threshold) bounded that, but every buffer then
cost page faults on first touch and an unmap when freed: in a bulk read, over half the
daemon's CPU went to the kernel (reading 1 GiB, 9.8 s of system time against 3.5 s). Instead,
ARENAS arenas serve the few threads that allocate, freed buffers are reused, and
`keep_heap_trimmed` hands the free memory back (glibc's malloc_trim: free pages inside the
heap too, not only at its top) once the RSS has grown past what the daemon means to hold,
its chunk cache, by HEAP_SLACK_BYTES; it looks every HEAP_TRIM_PERIOD_S.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import trio

log = logging.getLogger(__name__)

ARENAS = 2
HEAP_TRIM_PERIOD_S = 0.1
HEAP_SLACK_BYTES = 16 * 1024 * 1024
_M_ARENA_MAX = -8
_trimming = False


def _libc() -> Any:
    """glibc, or None where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def bound_heap() -> bool:
    """Limit glibc's arenas as the module docstring says; False where it is not glibc's."""
    libc = _libc()
    done = libc is not None and bool(libc.mallopt(_M_ARENA_MAX, ARENAS))
    if not done:
        log.debug("malloc keeps its own arenas")
    return done


def resident_bytes() -> int:
    """This process's RSS (0 where /proc does not say)."""
    try:
        with open("/proc/self/statm", "rb") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def keep_heap_trimmed(held_bytes: int, period_s: float = HEAP_TRIM_PERIOD_S,
                            slack_bytes: int = HEAP_SLACK_BYTES) -> None:
    """Until cancelled (the host's nursery: unmount), every `period_s` hand the heap's free
    memory back to the kernel if the RSS has grown by more than `held_bytes` (the chunk
    cache's cap) and `slack_bytes` since this started. One trimmer a process, however many
    hosts it runs; returns at once where malloc is not glibc's."""
    global _trimming
    libc = _libc()
    if libc is None or _trimming:
        return
    _trimming = True
    limit = resident_bytes() + held_bytes + slack_bytes
    try:
        while True:
            await trio.sleep(period_s)
            if resident_bytes() > limit:
                await trio.to_thread.run_sync(libc.malloc_trim, 0)
    finally:
        _trimming = False
