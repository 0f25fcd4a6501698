"""The end-to-end demo behind `tools/demo`: convert, verify, serve, mount lazily, read, stats.

Every step runs the real `lazyfs` command as a user would type it, and prints it first.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.nginx_server import serve_directory
from tools.sample_tree import make_sample_tree

LAZYFS = [sys.executable, "-m", "lazyfs"]


def run(*args: str, capture: bool = False) -> str:
    print(f"\n$ lazyfs {shlex.join(args)}", flush=True)
    result = subprocess.run([*LAZYFS, *args], text=True, check=False,
                            stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise SystemExit(f"demo: `lazyfs {args[0]}` failed with exit code {result.returncode}")
    if capture:
        print(result.stdout, end="")
    return result.stdout or ""


def tree_digest(root: Path) -> dict[str, str]:
    """Path -> sha256 of content (files) or link target (symlinks)."""
    out: dict[str, str] = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = "link:" + os.readlink(path)
            else:
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64, help="size of the sample tree")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lazyfs-demo-"))
    sample, served, mountpoint = work / "sample", work / "served", work / "mnt"
    served.mkdir()
    mountpoint.mkdir()
    print(f"demo: work directory {work}")
    make_sample_tree(sample, args.size_mib * 1024 * 1024)
    blob = served / "sample.blob"
    run("convert", str(sample), "-o", str(blob))
    run("verify", str(blob), "--against", str(sample))
    mounted = False
    try:
        with serve_directory(served) as server:
            url = server.url + "sample.blob"
            print(f"\ndemo: nginx serves {served} at {server.url}")
            started = time.monotonic()
            run("mount", url, str(mountpoint), "--cache-dir", str(work / "disk-cache"))
            mounted = True
            mount_s = time.monotonic() - started
            small = mountpoint / "etc" / "os-release"
            started = time.monotonic()
            content = small.read_text()
            first_s = time.monotonic() - started
            print(f"\ndemo: mounted in {mount_s:.2f} s; read {small.relative_to(mountpoint)} "
                  f"({len(content)} bytes) in {first_s * 1000:.1f} ms:")
            print("    " + content.strip().replace("\n", "\n    "))
            run("stats", str(mountpoint), capture=True)
            started = time.monotonic()
            mounted_tree = tree_digest(mountpoint)
            all_s = time.monotonic() - started
            source_tree = tree_digest(sample)
            same = mounted_tree == source_tree
            print(f"\ndemo: read all {len(mounted_tree)} files in {all_s:.2f} s; "
                  f"{'identical to' if same else 'DIFFERENT FROM'} the source tree")
            run("stats", str(mountpoint), capture=True)
            run("umount", str(mountpoint))
            mounted = False
            if not same:
                raise SystemExit("demo: the mounted tree differs from the source")
    finally:
        if mounted:
            subprocess.run([*LAZYFS, "umount", str(mountpoint)], check=False)
        if args.keep:
            print(f"demo: kept {work}")
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    print("\ndemo: done")


if __name__ == "__main__":
    main()
