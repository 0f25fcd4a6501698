"""Deterministic sample trees of realistic files, for the demo and the benchmarks.

A tree mixes many small text-like files (configs, scripts, sources), mid-size binaries that
compress somewhat, a few large files, symlinks and empty dirs, like a distribution layer.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

_WORDS = (b"the of and to in is for on that with as by this be are from at or an it not "
          b"config value path user lib bin share usr etc return if else def class import "
          b"error warning info debug function int char void struct static const").split()


def _text(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        out += line + b"\n"
    return bytes(out[:size])


def _binary(rng: random.Random, size: int) -> bytes:
    """Half random, half repetitive: compresses about 2:1 like typical executables."""
    out = bytearray()
    while len(out) < size:
        block = rng.randbytes(2048)
        out += block + block[: rng.randint(512, 2048)]
    return bytes(out[:size])


def make_sample_tree(root: Path, total_bytes: int = 64 * 1024 * 1024, seed: int = 42) -> Path:
    """Write a tree of about `total_bytes` under `root` (created); return `root`.

    Reuses an existing tree made with the same size and seed (a stamp file says so).
    """
    stamp = root / ".sample-tree"
    wanted = f"{total_bytes} {seed}\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return root
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = 0
    # A few large files: about a third of the bytes.
    large_dir = root / "usr" / "lib" / "data"
    large_dir.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        size = total_bytes // 9
        (large_dir / f"blob{index}.bin").write_bytes(_binary(rng, size))
        written += size
    packages = 0
    while written < total_bytes:
        package = root / "usr" / "share" / f"pkg{packages:04d}"
        bin_dir = root / "usr" / "bin"
        package.mkdir(parents=True, exist_ok=True)
        bin_dir.mkdir(parents=True, exist_ok=True)
        for index in range(rng.randint(5, 30)):
            size = int(rng.lognormvariate(8.5, 1.5))
            size = min(size, 2 * 1024 * 1024)
            (package / f"file{index:03d}.txt").write_bytes(_text(rng, size))
            written += size
        size = int(rng.lognormvariate(11, 1.0))
        executable = bin_dir / f"tool{packages:04d}"
        executable.write_bytes(_binary(rng, size))
        executable.chmod(0o755)
        written += size
        link = package / "tool"
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(executable, package))
        packages += 1
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "hostname").write_text("lazyfs-sample\n")
    (etc / "os-release").write_text('NAME="lazyfs sample"\nID=sample\n')
    (root / "var" / "empty").mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    make_sample_tree(args.root, args.size_mib * 1024 * 1024, args.seed)


if __name__ == "__main__":
    main()
