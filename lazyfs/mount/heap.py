"""The daemon's heap, held to what it uses: its buffers come from the kernel and go back.

A daemon's large buffers (chunks, frames, the pieces of frames streaming in) are made and
freed all the time, in the trio thread and the decode threads. glibc's malloc serves them
from the heap once a large buffer has been freed (its threshold for asking the kernel
directly rises to the largest freed, up to 32 MiB), and from an arena per thread: freed, they
stay in the process as holes among small objects, so that its RSS grew well past what it
held (up to twice the chunk cache). A fixed threshold of MMAP_THRESHOLD_BYTES (which also
fixes the trim threshold) gives each large buffer its own mapping, unmapped when freed, and
ARENAS arenas are enough for the few threads that allocate.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 128 * 1024
ARENAS = 2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def bound_heap() -> bool:
    """Set glibc's malloc as the module docstring says; False where it is not glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_ARENA_MAX, ARENAS))
    if not done:
        log.debug("malloc keeps its own thresholds")
    return done
