"""An OCI image layout of a realistic multi-layer image made from this machine's own files.

Four large layers (shared libraries with what the Python interpreter needs to start, the
Python standard library and site packages, /usr/share data with many small files, compiler
binaries) and a small application layer that modifies a file and deletes one below it (a
whiteout), each a gzip tar, like an ordinary image. Nothing is downloaded. Used by
tools/bench_run; `build_layout(layout, size_mib, command)` writes the layout tagged `bench`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class LayerRecipe:
    """Host paths (files, directories, symlinks) for one layer, up to `budget` bytes of files
    beyond those in `required`."""

    name: str
    roots: tuple[str, ...]
    budget: int
    required: tuple[str, ...] = ()


def _below_real_parent(path: str) -> str:
    """`path` with its directory's symlinks resolved (/lib64/x -> /usr/lib64/x under usrmerge),
    so that no layer entry lies below a symlink."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def python_closure() -> list[str]:
    """The Python interpreter, its shared libraries and those of its extension modules (ldd;
    e.g. libsqlite3 for `import sqlite3`) and the loader, the links that lead to them, and the
    top-level usrmerge links (/bin -> usr/bin, ...)."""
    python = os.path.realpath("/usr/bin/python3")
    paths = ["/bin", "/lib", "/lib64", "/sbin", "/usr/bin/python3", python]
    dynload = f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/lib-dynload"
    modules = sorted(str(p) for p in Path(dynload).glob("*.so")) if os.path.isdir(dynload) else []
    ldd = subprocess.run(["ldd", python, *modules], capture_output=True, text=True,
                         check=False).stdout
    for line in ldd.splitlines():
        for word in line.split():
            if word.startswith("/"):
                paths += [_below_real_parent(word), os.path.realpath(word)]
    return [p for p in dict.fromkeys(paths) if os.path.lexists(p)]


def recipes(size_mib: int) -> list[LayerRecipe]:
    """Four big layers from the host and a budget shared between three of them."""
    rest = max(60, size_mib - 110) * MIB
    stdlib = f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    return [
        LayerRecipe(
            "base",
            ("/usr/lib/x86_64-linux-gnu", "/etc/ssl"),
            rest * 3 // 10,
            tuple(python_closure()),
        ),
        LayerRecipe("python", (stdlib, "/usr/lib/python3/dist-packages"), 110 * MIB),
        LayerRecipe(
            "share",
            (
                "/usr/share/perl",
                "/usr/share/perl5",
                "/usr/share/locale",
                "/usr/share/doc",
                "/usr/share/man",
                "/usr/share/zoneinfo",
                "/usr/share/i18n",
                "/usr/share/mime",
            ),
            rest * 4 // 10,
        ),
        LayerRecipe("tools", ("/usr/lib/gcc", "/usr/lib/llvm-14", "/usr/libexec"), rest * 3 // 10),
    ]


def walk(root: str) -> Iterator[str]:
    """`root` and everything below it, parents first, sorted, never following symlinks."""
    if not os.path.lexists(root):
        return
    yield root
    if os.path.isdir(root) and not os.path.islink(root):
        for name in sorted(os.listdir(root)):
            yield from walk(os.path.join(root, name))


def select_paths(recipe: LayerRecipe) -> list[str]:
    """The recipe's required paths, then files of its roots in order until the budget is
    spent; with every parent directory."""
    chosen: dict[str, None] = dict.fromkeys(recipe.required)
    spent = 0
    for root in recipe.roots:
        for path in walk(root):
            if path in chosen:
                continue
            if os.path.isfile(path) and not os.path.islink(path):
                size = os.lstat(path).st_size
                if spent + size > recipe.budget:
                    continue
                spent += size
            chosen[path] = None
    with_parents: dict[str, None] = {}
    for path in chosen:
        parts = Path(path).parts
        for depth in range(2, len(parts)):
            with_parents[str(Path(*parts[:depth]))] = None
        with_parents[path] = None
    return list(with_parents)


def write_tar(paths: list[str], out: Path) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            tar.add(path, arcname=path.lstrip("/"), recursive=False)


def app_layer(out: Path) -> None:
    """A small top layer: an application, a changed /etc file, a deleted file (whiteout)."""
    directories: set[str] = set()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("app/main.py", b"import json\nprint(json.dumps({'ok': True}))\n"),
            ("etc/hostname", b"bench\n"),
            ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
            ("usr/share/doc/.wh.README", b""),
        ):
            for parent in reversed(Path(name).parents[:-1]):
                if str(parent) not in directories:
                    directories.add(str(parent))
                    info = tarfile.TarInfo(str(parent))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(MIB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def gzip_file(source: Path, out: Path) -> None:
    with open(source, "rb") as plain, gzip.GzipFile(out, "wb", compresslevel=3, mtime=0) as gz:
        shutil.copyfileobj(plain, gz, MIB)


def put_blob(layout: Path, data_or_path: bytes | Path) -> tuple[str, int]:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data_or_path, bytes):
        digest = "sha256:" + hashlib.sha256(data_or_path).hexdigest()
        (blobs / digest[7:]).write_bytes(data_or_path)
        return digest, len(data_or_path)
    digest = sha256_file(data_or_path)
    size = data_or_path.stat().st_size
    data_or_path.replace(blobs / digest[7:])
    return digest, size


def build_layout(layout: Path, size_mib: int, command: list[str]) -> None:
    """An OCI layout tagged `bench` holding the image; rebuilt from scratch."""
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-layers-", dir=layout.parent))
    layers, diff_ids = [], []
    try:
        steps = [(recipe.name, select_paths(recipe)) for recipe in recipes(size_mib)]
        steps.append(("app", []))
        for name, paths in steps:
            started = time.monotonic()
            tar = scratch / f"{name}.tar"
            if name == "app":
                app_layer(tar)
            else:
                write_tar(paths, tar)
            diff_ids.append(sha256_file(tar))
            gz = scratch / f"{name}.tar.gz"
            gzip_file(tar, gz)
            digest, size = put_blob(layout, gz)
            layers.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest,
                    "size": size,
                }
            )
            print(
                f"bench: layer {name}: {len(paths)} entries, {tar.stat().st_size / MIB:.0f} "
                f"MiB tar, {size / MIB:.0f} MiB gzip ({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
            )
            tar.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "Cmd": command,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"bench_run layer {i}"} for i in range(len(layers))],
        }
    ).encode()
    config_digest, config_size = put_blob(layout, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": layers,
        }
    ).encode()
    manifest_digest, manifest_size = put_blob(layout, manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": "bench"},
                    }
                ],
            }
        )
    )
