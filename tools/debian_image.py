"""A Debian bookworm minbase + python3 root file system for the start-up benchmarks.

Built once with `debootstrap --variant=minbase --include=python3 bookworm` from a Debian mirror
and kept as a tar in the benchmark cache (`$LAZYFS_BENCH_CACHE`, else
`$XDG_CACHE_HOME/lazyfs-bench`, else /var/cache/lazyfs-bench for root, ~/.cache/lazyfs-bench
otherwise), so reruns start at once. debootstrap's downloaded packages stay in the tree
(var/cache/apt/archives), as they do after a plain debootstrap: about 250 MB of files. When
debootstrap is missing or cannot reach the mirror, the same tar is made from this machine's
files instead (tools/host_image.py), and the caller is told so.

`rootfs_tar(cache)` returns (tar, description); `write_layout(layout, tar, command)` writes a
one-layer OCI layout (gzip tar) tagged `bench`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tools.host_image import MIB, gzip_file, put_blob, recipes, select_paths, sha256_file

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RECIPE = f"debian-{SUITE}-minbase-python3-v1"
HOST_RECIPE = "host-rootfs-v1"
DEBOOTSTRAP_TIMEOUT_S = 1800


def bench_cache_dir() -> Path:
    """Where benchmark inputs are kept between runs (created)."""
    explicit = os.environ.get("LAZYFS_BENCH_CACHE")
    if explicit:
        path = Path(explicit)
    elif os.environ.get("XDG_CACHE_HOME"):
        path = Path(os.environ["XDG_CACHE_HOME"]) / "lazyfs-bench"
    elif os.geteuid() == 0:
        path = Path("/var/cache/lazyfs-bench")
    else:
        path = Path.home() / ".cache" / "lazyfs-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _tar_directory(root: Path, out: Path) -> None:
    """A PAX tar of everything below `root` (names relative to it, owners numeric)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for directory, dirs, files in os.walk(root):
            dirs.sort()
            for name in [*sorted(dirs), *sorted(files)]:
                path = os.path.join(directory, name)
                tar.add(path, arcname=os.path.relpath(path, root), recursive=False)


def debootstrap(target: Path, mirror: str) -> bool:
    """Run debootstrap into `target`; False (with the reason printed) when it cannot."""
    binary = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(binary, os.X_OK):
        _say("debootstrap is not installed (tools/setup installs it)")
        return False
    if os.geteuid() != 0:
        _say("debootstrap needs root")
        return False
    log = target.with_suffix(".log")
    _say(f"building a Debian {SUITE} minbase + python3 tree with debootstrap from {mirror} "
         f"(log: {log})")
    started = time.monotonic()
    with open(log, "wb") as stream:
        try:
            result = subprocess.run(
                [binary, "--variant=minbase", "--include=python3", SUITE, str(target), mirror],
                stdout=stream, stderr=stream, timeout=DEBOOTSTRAP_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired:
            _say(f"debootstrap timed out after {DEBOOTSTRAP_TIMEOUT_S} s")
            return False
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        _say(f"debootstrap failed ({result.returncode}): {' | '.join(tail)}")
        return False
    _say(f"debootstrap done in {time.monotonic() - started:.0f} s")
    return True


def _host_tar(out: Path, size_mib: int) -> None:
    """One tar of this machine's files (the layers of tools/host_image.py, merged)."""
    paths: dict[str, None] = {}
    for recipe in recipes(size_mib):
        paths.update(dict.fromkeys(select_paths(recipe)))
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            tar.add(path, arcname=path.lstrip("/"), recursive=False)


def rootfs_tar(cache: Path, mirror: str = DEFAULT_MIRROR, *,
               host_size_mib: int = 300) -> tuple[Path, str]:
    """The cached root file system tar and what it holds; built on first use."""
    debian = cache / f"{RECIPE}.tar"
    if debian.exists():
        return debian, f"Debian {SUITE} minbase + python3"
    scratch = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    try:
        tree = scratch / "tree"
        if debootstrap(tree, mirror):
            partial = scratch / "rootfs.tar"
            _tar_directory(tree, partial)
            partial.replace(debian)
            return debian, f"Debian {SUITE} minbase + python3"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    host = cache / f"{HOST_RECIPE}-{host_size_mib}.tar"
    if not host.exists():
        _say(f"falling back to a {host_size_mib} MiB tree of this machine's files")
        partial = host.with_suffix(".partial")
        _host_tar(partial, host_size_mib)
        partial.replace(host)
    return host, "this machine's files (debootstrap unavailable)"


def write_layout(layout: Path, tar: Path, command: list[str]) -> None:
    """A one-layer OCI layout tagged `bench` from `tar` (gzip-compressed into the layout)."""
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    diff_id = sha256_file(tar)
    gz = layout / "layer.tar.gz"
    gzip_file(tar, gz)
    digest, size = put_blob(layout, gz)
    _say(f"one layer: {tar.stat().st_size / MIB:.0f} MiB tar, {size / MIB:.0f} MiB gzip")
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": command,
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "debootstrap --variant=minbase --include=python3"}],
    }).encode()
    config_digest, config_size = put_blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest, "size": size}],
    }).encode()
    manifest_digest, manifest_size = put_blob(layout, manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "bench"}}],
    }))
