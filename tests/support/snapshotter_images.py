"""The image the snapshotter tests run, and what they ask containerd and the snapshotter.

`publish_app_image` pushes a two-layer image (the base layer; the change layer with
whiteouts, an opaque directory and a large file nobody reads) and its seekable EROFS
conversion. `SHOW` reads a file of each layer and looks for what the second removed;
`check_output` checks what it printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

from lazyfs.format.chain_id import chain_ids
from lazyfs.snapshotter.layers import layer_name
from tests.support.containerd import Containerd
from tests.support.images import base_layer, change_layer, skopeo_push, write_oci_image
from tests.support.mounts import mounts_below
from tests.support.registry import Registry
from tests.support.registry_images import PublishedImage, convert_push

BIG_FILE_BYTES = 8 * 1024 * 1024
CHUNK_SIZE = "64K"  # many chunks per layer, so that a fraction can be fetched
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json")
SHOW = (
    "cat /etc/hostname /etc/passwd; ls /var/cache/app; "
    "test -e /etc/os-release && echo os-release-visible; test -e /var/log && echo log-visible; "
    "echo end"
)


def change_layer_with_big_file() -> bytes:
    """The change layer (whiteouts, opaque directory) plus a large file nobody reads."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(change_layer())) as source, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        info = tarfile.TarInfo("opt/big.bin")
        info.size, info.mode, info.mtime = BIG_FILE_BYTES, 0o644, 1_700_000_000
        tar.addfile(info, io.BytesIO(os.urandom(BIG_FILE_BYTES)))
    return out.getvalue()


def publish_app_image(work: Path, registry: Registry) -> PublishedImage:
    """`test/app:v1` (gzip) and `test/app:v1-erofs` (seekable EROFS) in `registry`."""
    layers = [base_layer(), change_layer_with_big_file()]
    layout = write_oci_image(work / "images" / "app", "v1", layers)
    original = f"{registry.host}/test/app:v1"
    converted = f"{registry.host}/test/app:v1-erofs"
    skopeo_push(layout.layout, "v1", registry.host, "test/app:v1")
    convert_push(original, converted, "--chunk-size", CHUNK_SIZE)
    return PublishedImage(registry.host, original, converted, layers)


def check_output(stdout: str) -> None:
    """What SHOW prints in the app image: each layer's files, none that the top removed."""
    assert stdout.splitlines()[0] == "changed"  # the top layer's /etc/hostname
    assert "root:x:0:0" in stdout  # the base layer's /etc/passwd
    assert "fresh.txt" in stdout and "a.bin" not in stdout  # opaque directory
    assert "os-release-visible" not in stdout and "log-visible" not in stdout  # whiteouts
    assert stdout.rstrip().endswith("end")


def lazy_pull(containerd: Containerd, reference: str, namespace: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    return containerd.lazyfs("pull", "--containerd", str(containerd.socket), "--namespace",
                             namespace or containerd.namespace, "--insecure-registry",
                             reference)


def layer_stats(containerd: Containerd) -> dict[str, dict[str, Any]]:
    """The snapshotter's mounted layers (by file name) and their figures."""
    result = containerd.lazyfs("snapshotter-stats", "--root", str(containerd.snapshotter.root),
                               "--json")
    assert result.returncode == 0, result.stderr
    layers: dict[str, dict[str, Any]] = json.loads(result.stdout)["layers"]
    return layers


def erofs_mounts(containerd: Containerd) -> list[str]:
    return [m for m, kind in mounts_below(containerd.snapshotter.root) if kind == "erofs"]


def committed(containerd: Containerd, namespace: str | None = None) -> list[str]:
    """Names of the committed snapshots of the lazyfs snapshotter containerd lists."""
    listing = containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls",
                             namespace=namespace).stdout.splitlines()[1:]
    return [line.split()[0] for line in listing if line.split()[-1] == "Committed"]


def manifest_of(registry: Registry, repository: str, tag: str) -> tuple[str, dict[str, Any]]:
    """(digest, parsed manifest) of `repository:tag`."""
    with urllib.request.urlopen(urllib.request.Request(
            f"{registry.url}/v2/{repository}/manifests/{tag}",
            headers={"Accept": MANIFEST_TYPES}), timeout=30) as response:
        data = response.read()
    return "sha256:" + hashlib.sha256(data).hexdigest(), json.loads(data)


def chain_of(registry: Registry, repository: str, tag: str) -> list[str]:
    """The chain IDs of the layers of `repository:tag` (containerd's snapshot names)."""
    _, manifest = manifest_of(registry, repository, tag)
    with urllib.request.urlopen(
            f"{registry.url}/v2/{repository}/blobs/{manifest['config']['digest']}",
            timeout=30) as response:
        config = json.loads(response.read())
    return chain_ids(config["rootfs"]["diff_ids"])


def put_manifest(registry: Registry, repository: str, tag: str, manifest: dict[str, Any]
                 ) -> str:
    """Push `manifest` (its blobs must be in `repository` already); returns its digest."""
    data = json.dumps(manifest).encode()
    media_type = manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
    request = urllib.request.Request(f"{registry.url}/v2/{repository}/manifests/{tag}",
                                     data=data, method="PUT",
                                     headers={"Content-Type": media_type})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 201
    return "sha256:" + hashlib.sha256(data).hexdigest()


def database(containerd: Containerd) -> dict[str, str | None]:
    """The snapshotter's database, read-only: snapshot key -> its remote layer's digest (None
    for a snapshot of its own). Checks that no layer row outlived its last snapshot."""
    path = containerd.snapshotter.root / "metadata.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT s.key, l.digest FROM snapshots s"
                          " LEFT JOIN layers l ON l.id = s.layer_id").fetchall()
        orphans = db.execute("SELECT digest FROM layers WHERE id NOT IN"
                             " (SELECT layer_id FROM snapshots WHERE layer_id IS NOT NULL)"
                             ).fetchall()
    assert orphans == [], orphans
    return {key: digest for key, digest in rows}


def unchecked_layers(containerd: Containerd) -> list[str]:
    """The snapshotter's remote layers its content check has not measured yet (the check
    fetches each layer whole, in the background once reads pause)."""
    path = containerd.snapshotter.root / "metadata.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT digest FROM layers WHERE content_digest IS NULL").fetchall()
    return [digest for (digest,) in rows]


def assert_consistent(containerd: Containerd) -> dict[str, str | None]:
    """The database, its layers all mounted and nothing else mounted; returns it."""
    rows = database(containerd)
    digests = {digest for digest in rows.values() if digest is not None}
    assert sorted(layer_stats(containerd)) == sorted(layer_name(d) for d in digests)
    assert len(erofs_mounts(containerd)) == len(digests)
    return rows


def scrape(port: int) -> str:
    """The snapshotter's Prometheus metrics page on 127.0.0.1:`port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())
