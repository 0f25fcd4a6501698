"""The caches' defaults, in a module of their own: the command line names them in its help
without importing the caches (and trio with them)."""

from __future__ import annotations

import os

# The chunk cache of one daemon: decoded, verified chunks in memory.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# The variable that moves the disk cache shared by every mount of the machine.
CACHE_DIR_ENV = "LAZYFS_CACHE_DIR"
ROOT_CACHE_DIR = "/var/cache/lazyfs"


def default_cache_dir() -> str:
    """`$LAZYFS_CACHE_DIR`, else /var/cache/lazyfs for root and `$XDG_CACHE_HOME/lazyfs`
    (~/.cache/lazyfs) for other users."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return os.path.abspath(configured)
    if os.geteuid() == 0:
        return ROOT_CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazyfs")
