"""The start of every timed run of the start-up benchmarks: caches dropped, programs loaded.

The kernel's caches are dropped, so no layer data is left from an earlier run, and then the
programs of both sides are read in again (lazyfs's modules and the libraries its daemon
imports; the binaries of the eager path), as on a machine that has run them before. What
differs between a lazy and an eager start is then what each fetches, verifies and decodes,
not whose program files the disk must read first (a cold Python start reads some 300 modules
from disk; `zstd` and `mount` are one file each).
"""

from __future__ import annotations

import compileall
import contextlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROGRAMS = (
    [sys.executable, "-c", "import lazyfs.cli.run, lazyfs.cli.mount, lazyfs.mount.service, "
     "lazyfs.fetch.local, lazyfs.eager.check, httpcore, zstandard, encodings.idna"],
    [sys.executable, "-m", "lazyfs", "--version"],  # runpy, as `python -m lazyfs` starts
    ["zstd", "--version"],
    ["mount", "--version"],
    ["umount", "--version"],
)


def compile_lazyfs() -> None:
    """Write lazyfs's bytecode before the timed runs, as its first run would: with
    PYTHONDONTWRITEBYTECODE set, every run (of both sides) would compile the modules it
    imports from source again."""
    compileall.compile_dir(REPO / "lazyfs", quiet=1)


def drop_caches() -> None:
    """Drop the page cache, dentries and inodes, then load the programs again."""
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as stream:
        stream.write("3\n")
    for argv in PROGRAMS:
        subprocess.run(argv, capture_output=True, check=False)
