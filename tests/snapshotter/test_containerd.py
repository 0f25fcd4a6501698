"""The snapshotter under Debian's containerd, running real containers with runc: ordinary
gzip images, lazily mounted seekable EROFS images, restarts, concurrency and bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lazyfs.containerd.client import ContainerdClient, ContainerdError
from lazyfs.format.descriptor import ANNOTATION_CHUNK_TABLE_OFFSET
from lazyfs.snapshotter.remote import CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST
from tests.support.containerd import NAMESPACE, Containerd, running_containerd
from tests.support.images import base_layer, change_layer, skopeo_push, write_oci_image
from tests.support.lazyfs_cli import wait_until
from tests.support.mounts import mounts_below
from tests.support.registry import Registry, free_port, running_registry
from tests.support.registry_images import PublishedImage, convert_push

BIG_FILE_BYTES = 8 * 1024 * 1024
CHUNK_SIZE = "64K"  # many chunks per layer, so that a fraction can be fetched

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

# Reads a file of each layer, and files the second layer removed (whiteout, opaque dir).
SHOW = (
    "cat /etc/hostname /etc/passwd; ls /var/cache/app; "
    "test -e /etc/os-release && echo os-release-visible; test -e /var/log && echo log-visible; "
    "echo end"
)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    # Short: containerd's socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="lzc-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def registry(work: Path) -> Iterator[Registry]:
    with running_registry(work / "registry") as server:
        yield server


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


@pytest.fixture(scope="module")
def image(work: Path, registry: Registry) -> PublishedImage:
    layers = [base_layer(), change_layer_with_big_file()]
    layout = write_oci_image(work / "images" / "app", "v1", layers)
    original = f"{registry.host}/test/app:v1"
    converted = f"{registry.host}/test/app:v1-erofs"
    skopeo_push(layout.layout, "v1", registry.host, "test/app:v1")
    convert_push(original, converted, "--chunk-size", CHUNK_SIZE)
    return PublishedImage(registry.host, original, converted, layers)


def lazy_pull(containerd: Containerd, reference: str) -> subprocess.CompletedProcess[str]:
    return containerd.lazyfs("pull", "--containerd", str(containerd.socket), "--namespace",
                             NAMESPACE, "--insecure-registry", reference)


def layer_stats(containerd: Containerd) -> dict[str, dict[str, int]]:
    result = containerd.lazyfs("snapshotter-stats", "--root", str(containerd.snapshotter.root),
                               "--json")
    assert result.returncode == 0, result.stderr
    layers: dict[str, dict[str, int]] = json.loads(result.stdout)["layers"]
    return layers


@pytest.fixture
def containerd(work: Path, registry: Registry, request: pytest.FixtureRequest
               ) -> Iterator[Containerd]:
    with running_containerd(work / f"c{request.node.name[-12:]}") as running:
        yield running


def check_output(stdout: str) -> None:
    assert stdout.splitlines()[0] == "changed"  # the top layer's /etc/hostname
    assert "root:x:0:0" in stdout  # the base layer's /etc/passwd
    assert "fresh.txt" in stdout and "a.bin" not in stdout  # opaque directory
    assert "os-release-visible" not in stdout and "log-visible" not in stdout  # whiteouts
    assert stdout.rstrip().endswith("end")


def test_ordinary_gzip_image_runs(containerd: Containerd, image: PublishedImage) -> None:
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "lazyfs", image.original)
    result = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.original, "gz1",
                            "/bin/sh", "-c", SHOW)
    check_output(result.stdout)
    # Its two layers are ordinary committed snapshots of ours.
    listing = containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout
    assert listing.count("Committed") == 2


def test_lazy_pull_survives_a_restart_and_runs_four_containers(
    containerd: Containerd, image: PublishedImage
) -> None:
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    assert "2 layers, lazy" in result.stdout
    # Nothing but the superblocks was read so far.
    assert all(s["chunks_fetched"] <= 2 for s in layer_stats(containerd).values())

    port = free_port()
    containerd.snapshotter.extra = ["--metrics-address", f"127.0.0.1:{port}"]
    containerd.snapshotter.restart()  # between pull and run: the layers are mounted again
    assert len(layer_stats(containerd)) == 2
    # containerd's connection to the old socket broke; it reconnects on the next calls.
    wait_until(lambda: containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls",
                                      check=False).returncode == 0, "containerd reconnecting")

    runs = [
        subprocess.Popen(
            ["ctr", "--address", str(containerd.socket), "--namespace", NAMESPACE, "run",
             "--rm", "--snapshotter", "lazyfs", image.converted, f"lazy{n}", "/bin/sh", "-c",
             SHOW], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr + containerd.snapshotter.log.read_text()[-3000:]
        check_output(stdout)

    stats = layer_stats(containerd)
    fetched = sum(s["bytes_fetched"] for s in stats.values())
    total = sum(s["blob_size"] for s in stats.values())
    assert fetched < total / 2, (fetched, total)  # the big file was never read
    for values in stats.values():
        # One cache and one single flight for all four: no chunk fetched twice.
        assert values["chunk_fetches"] <= values["chunks_fetched"]
        assert values["bytes_fetched"] <= values["blob_size"]
        assert values["verify_failures"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    for name, values in stats.items():  # file names: the digests' first hex digits
        assert values["bytes_fetched"] > 0
        assert f'lazyfs_layer_fetched_bytes_total{{layer="sha256:{name}' in metrics
        assert f'lazyfs_layer_fetch_latency_seconds_count{{layer="sha256:{name}' in metrics
    assert "lazyfs_layer_verification_failures_total" in metrics
    # containerd knows the layers as committed snapshots of ours.
    listing = containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout
    assert listing.count("Committed") == 2

    # Removing the image and collecting garbage unmounts the layers.
    containerd.ctr("images", "rm", "--sync", image.converted)
    assert containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout.count(
        "Committed") == 0
    assert layer_stats(containerd) == {}
    assert [m for m, kind in mounts_below(containerd.snapshotter.root) if kind == "erofs"] == []


def test_sigterm_unmounts_everything(containerd: Containerd, image: PublishedImage) -> None:
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    root = containerd.snapshotter.root
    assert len([m for m, kind in mounts_below(root) if kind == "erofs"]) == 2
    assert containerd.snapshotter.stop() == 0
    assert mounts_below(root) == []
    assert "Traceback" not in containerd.snapshotter.log.read_text()


def cri_labels(image: PublishedImage, manifest_digest: str, layer_digest: str
               ) -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": "sha256:" + "1" * 64,
        CRI_IMAGE_REF: image.converted,
        CRI_MANIFEST_DIGEST: manifest_digest,
        CRI_LAYER_DIGEST: layer_digest,
    }


def manifest_of(registry: Registry, repository: str, tag: str) -> tuple[str, dict[str, object]]:
    result = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false",
         f"docker://{registry.host}/{repository}:{tag}"],
        capture_output=True, check=True)
    return "sha256:" + hashlib.sha256(result.stdout).hexdigest(), json.loads(result.stdout)


def test_cri_labels_and_bad_inputs(containerd: Containerd, image: PublishedImage,
                                   registry: Registry) -> None:
    manifest_digest, manifest = manifest_of(registry, "test/app", "v1-erofs")
    layers = manifest["layers"]
    assert isinstance(layers, list)
    bottom = layers[0]["digest"]
    root = containerd.snapshotter.root
    with ContainerdClient(str(containerd.snapshotter.socket), "ignored") as client:
        # A CRI-style Prepare straight to the snapshotter mounts the layer.
        labels = cri_labels(image, manifest_digest, bottom)
        with pytest.raises(ContainerdError) as caught:
            client.prepare("", "k8s-extract-1", "", labels)
        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert client.snapshot_exists("", labels["containerd.io/snapshot.ref"])
        assert len([m for m, kind in mounts_below(root) if kind == "erofs"]) == 1

        def refused(labels: dict[str, str], message: str) -> None:
            with pytest.raises(ContainerdError, match=message) as caught:
                client.prepare("", "k8s-extract-2", "", labels)
            assert caught.value.code == grpc.StatusCode.UNKNOWN
            assert "\n" not in str(caught.value)
            assert not client.snapshot_exists("", "k8s-extract-2")
            assert not client.snapshot_exists("", labels["containerd.io/snapshot.ref"])

        unknown = "sha256:" + "2" * 64
        fresh = {"containerd.io/snapshot.ref": "sha256:" + "3" * 64}
        refused({**cri_labels(image, unknown, bottom), **fresh}, f"layer {bottom}.*not found")
        refused({**cri_labels(image, manifest_digest, unknown), **fresh},
                f"layer {unknown}.*no such layer")
        down = {**cri_labels(image, manifest_digest, bottom), **fresh,
                CRI_IMAGE_REF: "127.0.0.1:9/test/app:v1-erofs"}
        refused(down, f"layer {bottom}")

        # A corrupt blob: its chunk table does not match the digest in the manifest.
        corrupt_digest, corrupt = publish_corrupt(registry, image)
        refused({**cri_labels(image, corrupt_digest, corrupt), **fresh,
                 CRI_IMAGE_REF: f"{registry.host}/test/corrupt:v1-erofs"}, f"layer {corrupt}")

        # Nothing of the failures stayed mounted; the database still serves.
        assert len([m for m, kind in mounts_below(root) if kind == "erofs"]) == 1
        client.remove_snapshot("", labels["containerd.io/snapshot.ref"])
        assert [m for m, kind in mounts_below(root) if kind == "erofs"] == []


def publish_corrupt(registry: Registry, image: PublishedImage) -> tuple[str, str]:
    """A converted image in `test/corrupt` whose top layer blob has a flipped byte in its
    chunk table (the registry serves it as stored). Returns (manifest digest, layer)."""
    layout = write_oci_image(Path(tempfile.mkdtemp(dir=registry.root)), "v1", image.layers)
    skopeo_push(layout.layout, "v1", registry.host, "test/corrupt:v1")
    convert_push(f"{registry.host}/test/corrupt:v1", f"{registry.host}/test/corrupt:v1-erofs",
                 "--chunk-size", CHUNK_SIZE, "--zstd-level", "5")  # other blobs than the good
    digest, manifest = manifest_of(registry, "test/corrupt", "v1-erofs")
    layers = manifest["layers"]
    assert isinstance(layers, list)
    layer = layers[-1]
    hex_digest = layer["digest"].partition(":")[2]
    blob = (registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" /
            hex_digest[:2] / hex_digest / "data")
    data = bytearray(blob.read_bytes())
    offset = int(layer["annotations"][ANNOTATION_CHUNK_TABLE_OFFSET])
    data[offset + 40] ^= 0xFF
    blob.write_bytes(bytes(data))
    return digest, layer["digest"]
