"""The snapshotter under Debian's containerd, running real containers with runc: ordinary
gzip images, lazily mounted seekable EROFS images, restarts, concurrency, metrics and bad
inputs through containerd's snapshots API with the labels of its CRI plugin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from lazyfs.containerd.client import ContainerdClient, ContainerdError
from lazyfs.format.descriptor import ANNOTATION_CHUNK_TABLE_OFFSET, parse_annotations
from lazyfs.format.layout import parse_metadata
from lazyfs.format.open_plan import metadata_pieces
from lazyfs.format.prefetch_list import (
    ANNOTATION_PREFETCH,
    LayerPrefetch,
    serialize_prefetch_annotation,
)
from lazyfs.fuse.operations import STATS_FILE_NAME
from lazyfs.snapshotter.layers import FUSE_DIR, layer_name
from lazyfs.snapshotter.remote import CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST
from tests.support.containerd import Containerd
from tests.support.forged_images import blob_file
from tests.support.images import skopeo_push, write_oci_image
from tests.support.lazyfs_cli import wait_until
from tests.support.mounts import mounts_below
from tests.support.registry import Registry, free_port
from tests.support.registry_images import PublishedImage, convert_push
from tests.support.snapshotter_images import (
    CHUNK_SIZE,
    SHOW,
    assert_consistent,
    chain_of,
    check_output,
    committed,
    database,
    erofs_mounts,
    layer_stats,
    lazy_pull,
    manifest_of,
    put_manifest,
    scrape,
    unchecked_layers,
)

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]


def test_ordinary_gzip_image_runs(containerd: Containerd, image: PublishedImage) -> None:
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "lazyfs", image.original)
    result = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.original, "gz1",
                            "/bin/sh", "-c", SHOW)
    check_output(result.stdout)
    # Its two layers are ordinary committed snapshots of ours.
    assert len(committed(containerd)) == 2


def test_lazy_pull_survives_a_restart_and_runs_four_containers(
    containerd: Containerd, image: PublishedImage
) -> None:
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    assert "2 layers, lazy" in result.stdout
    # Nothing but the superblocks was read so far (and what came along with a miss).
    assert all(s["chunks_fetched"] - s["readahead_chunks"] <= 2
               for s in layer_stats(containerd).values())
    # The content checks done (each fetches its layer whole, once reads pause): after the
    # restart only the containers' reads fetch.
    wait_until(lambda: unchecked_layers(containerd) == [], "the layers' content checks")

    port = free_port()
    # Without the disk cache (test_a_restarted_snapshotter_reads_from_the_disk_cache has it),
    # so that the chunks read before the restart are fetched again and counted.
    containerd.snapshotter.extra = ["--metrics-address", f"127.0.0.1:{port}", "--no-disk-cache"]
    containerd.snapshotter.restart()  # between pull and run: the layers are mounted again
    assert len(layer_stats(containerd)) == 2
    # containerd's connection to the old socket broke; it reconnects on the next calls.
    wait_until(lambda: containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls",
                                      check=False).returncode == 0, "containerd reconnecting")

    # Each container writes what it saw to a file of ours: under load, containerd 1.6 can
    # lose a container's stdout on its way through ctr (exit status 0, nothing printed).
    out = containerd.work / "out"
    out.mkdir()
    runs = [
        subprocess.Popen(
            [*containerd.ctr_argv(), "run", "--rm", "--snapshotter", "lazyfs",
             "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw", image.converted,
             f"lazy{n}", "/bin/sh", "-c", f"({SHOW}) > /out/{n} 2>&1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    for n, run in enumerate(runs):
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, f"container {n}: {stderr}"
        check_output((out / str(n)).read_text())

    stats = layer_stats(containerd)
    fetched = sum(s["bytes_fetched"] for s in stats.values())
    total = sum(s["blob_size"] for s in stats.values())
    assert fetched < total / 2, (fetched, total)  # the big file was never read
    for values in stats.values():
        # One cache and one single flight for all four: no chunk fetched twice.
        assert values["chunk_fetches"] <= values["chunks_fetched"]
        assert values["bytes_fetched"] <= values["blob_size"]
        assert values["verify_failures"] == 0
    metrics = scrape(port)
    for name, values in stats.items():  # file names: the digests' first hex digits
        assert values["bytes_fetched"] > 0
        assert f'lazyfs_layer_fetched_bytes_total{{layer="sha256:{name}' in metrics
        assert f'lazyfs_layer_fetch_latency_seconds_count{{layer="sha256:{name}' in metrics
    assert "lazyfs_layer_verification_failures_total" in metrics

    # Each layer's first chunk read again past the page cache: the chunk cache serves it, and
    # the hit is the layer's (each layer's share adds up to the shared cache's counts).
    hits_before = counter(metrics, "lazyfs_layer_cache_hits_total")
    for name in stats:
        read_past_page_cache(containerd.snapshotter.root / FUSE_DIR / name)
    metrics = scrape(port)
    hits = counter(metrics, "lazyfs_layer_cache_hits_total")
    misses = counter(metrics, "lazyfs_layer_cache_misses_total")
    everything = snapshotter_stats(containerd)
    for name, values in everything["layers"].items():
        digest = next(d for d in hits if d.startswith(f"sha256:{name}"))
        assert hits[digest] > hits_before.get(digest, 0)
        assert (hits[digest], misses[digest]) == (values["cache_hits"], values["cache_misses"])
    assert sum(hits.values()) == everything["cache"]["hits"]
    assert sum(misses.values()) == everything["cache"]["misses"] > 0

    # containerd knows the layers as committed snapshots of ours.
    assert len(committed(containerd)) == 2

    # Removing the image and collecting garbage unmounts the layers.
    containerd.ctr("images", "rm", "--sync", image.converted)
    assert committed(containerd) == []
    assert layer_stats(containerd) == {}
    assert erofs_mounts(containerd) == []


def counter(metrics: str, name: str) -> dict[str, float]:
    """Per layer digest, the value of the counter `name`."""
    pattern = re.compile(rf'^{name}{{layer="([^"]+)"}} (\S+)$', re.MULTILINE)
    return {layer: float(value) for layer, value in pattern.findall(metrics)}


def read_past_page_cache(path: Path) -> None:
    """Read the first block of a layer file through FUSE, dropping its cached pages first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert len(os.pread(fd, 4096, 0)) == 4096
    finally:
        os.close(fd)


def snapshotter_stats(containerd: Containerd) -> dict[str, Any]:
    return dict(json.loads((containerd.snapshotter.root / FUSE_DIR / STATS_FILE_NAME)
                           .read_text()))


def test_a_restarted_snapshotter_reads_from_the_disk_cache(
    containerd: Containerd, image: PublishedImage
) -> None:
    """What a container read before a restart of the snapshotter is read from the disk cache
    after it: the same command in a new container fetches nothing."""
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    check_output(containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.converted,
                                "disk1", "/bin/sh", "-c", SHOW).stdout)
    # The content checks done (they fetch each layer whole, and do not fill the disk cache):
    # after the restart only reads could fetch.
    wait_until(lambda: unchecked_layers(containerd) == [], "the layers' content checks")
    containerd.snapshotter.restart()
    wait_until(lambda: containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls",
                                      check=False).returncode == 0, "containerd reconnecting")
    check_output(containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.converted,
                                "disk2", "/bin/sh", "-c", SHOW).stdout)
    stats = layer_stats(containerd)
    assert len(stats) == 2
    for values in stats.values():
        assert values["bytes_fetched"] == 0 and values["chunks_fetched"] == 0, values
        assert values["chunks_from_disk"] >= 1


def test_a_prefetch_list_a_layer_carries_is_replayed_once_it_is_mounted(
    containerd: Containerd, image: PublishedImage, registry: Registry
) -> None:
    """A layer whose descriptor carries a prefetch list (`lazyfs convert --prefetch`) has
    those chunks fetched in the background after its Prepare, before anything reads them."""
    _, manifest = manifest_of(registry, "test/app", "v1-erofs")
    top = manifest["layers"][-1]
    annotations = parse_annotations(top["annotations"], "top layer")
    blob = blob_file(registry, top["digest"]).read_bytes()
    metadata = parse_metadata(annotations, len(blob), *metadata_pieces({0: blob}, annotations))
    count = metadata.table.chunk_count
    assert annotations.chunk_digest is not None and count >= 3
    listed = (count - 1, 0, count // 2)  # the order of a start, not of the blob
    top["annotations"][ANNOTATION_PREFETCH] = serialize_prefetch_annotation(
        LayerPrefetch(annotations.chunk_digest, count, listed))
    put_manifest(registry, "test/app", "v1-erofs-prefetch", manifest)

    result = lazy_pull(containerd, f"{registry.host}/test/app:v1-erofs-prefetch")
    assert result.returncode == 0, result.stderr
    name = layer_name(top["digest"])

    def replayed() -> bool:
        return layer_stats(containerd)[name]["background"]["state"] == "done"

    wait_until(replayed, "the carried list to be replayed")
    stats = layer_stats(containerd)[name]
    assert stats["background"]["listed_chunks"] == len(listed)
    assert stats["background"]["prefetched_chunks"] == len(listed) - 1  # 0: the superblock read
    assert stats["chunks_fetched"] == len(listed)


def test_sigterm_unmounts_everything(containerd: Containerd, image: PublishedImage) -> None:
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    root = containerd.snapshotter.root
    assert len(erofs_mounts(containerd)) == 2
    assert containerd.snapshotter.stop() == 0
    assert mounts_below(root) == []
    assert "Traceback" not in containerd.snapshotter.log.read_text()


TARGET = "containerd.io/snapshot.ref"
LAZYFS = "lazyfs"


def cri_labels(image: PublishedImage, manifest_digest: str, layer_digest: str,
               target: str) -> dict[str, str]:
    return {
        TARGET: target,
        CRI_IMAGE_REF: image.converted,
        CRI_MANIFEST_DIGEST: manifest_digest,
        CRI_LAYER_DIGEST: layer_digest,
    }


def test_cri_labels_and_bad_inputs_through_containerd(
    containerd: Containerd, image: PublishedImage, registry: Registry
) -> None:
    """What containerd's CRI plugin does on a pull (the `ctr` of containerd 1.6 has no way to
    send its labels): Prepare through containerd's snapshots API, snapshotter `lazyfs`, with
    the CRI labels. Failures reach the caller as one line naming the layer, and leave
    nothing recorded or mounted, in containerd or in the snapshotter."""
    manifest_digest, manifest = manifest_of(registry, "test/app", "v1-erofs")
    bottom = manifest["layers"][0]["digest"]
    bottom_id = chain_of(registry, "test/app", "v1-erofs")[0]
    with ContainerdClient(str(containerd.socket), containerd.namespace) as client:
        # As CRI's pull does: a lease keeps the snapshots the pull makes from containerd's
        # garbage collector (without it, a collection may remove the layer's at any moment).
        lease = client.create_lease()
        labels = cri_labels(image, manifest_digest, bottom, bottom_id)
        with pytest.raises(ContainerdError) as caught:
            client.prepare(LAZYFS, "k8s-extract-1", "", labels)
        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert client.snapshot_labels(LAZYFS, labels[TARGET]) is not None
        assert list(assert_consistent(containerd).values()) == [bottom]

        def refused(labels: dict[str, str], message: str, parent: str = "") -> None:
            with pytest.raises(ContainerdError, match=message) as caught:
                client.prepare(LAZYFS, "k8s-extract-2", parent, labels)
            assert caught.value.code == grpc.StatusCode.UNKNOWN
            assert "\n" not in str(caught.value)
            assert client.snapshot_labels(LAZYFS, "k8s-extract-2") is None
            assert client.snapshot_labels(LAZYFS, labels[TARGET]) is None
            assert list(assert_consistent(containerd).values()) == [bottom]

        unknown = "sha256:" + "2" * 64
        fresh = "sha256:" + "3" * 64
        refused(cri_labels(image, unknown, bottom, fresh), f"layer {bottom}.*not found")
        refused(cri_labels(image, manifest_digest, unknown, fresh),
                f"layer {unknown}.*no such layer")
        down = {**cri_labels(image, manifest_digest, bottom, fresh),
                CRI_IMAGE_REF: "127.0.0.1:9/test/app:v1-erofs"}
        refused(down, f"layer {bottom} of 127.0.0.1:9/test/app.*(refused|connect)")
        # A target that is not the layer's chain ID in its image: containerd would share it
        # with every image that names that chain ID.
        refused(cri_labels(image, manifest_digest, bottom, fresh),
                f"target snapshot {fresh} is not the layer's chain ID in this image")

        # A corrupt blob: its chunk table does not match the digest in the manifest.
        corrupt_digest, corrupt = publish_corrupt(registry, image)
        corrupt_id = chain_of(registry, "test/corrupt", "v1-erofs")[-1]
        refused({**cri_labels(image, corrupt_digest, corrupt, corrupt_id),
                 CRI_IMAGE_REF: f"{registry.host}/test/corrupt:v1-erofs"},
                f"layer {corrupt} of .*test/corrupt.*chunk table",
                parent=bottom_id)  # the same bottom layer's content: the same chain ID

        # Removing the snapshot and collecting garbage unmounts the layer. Removed while the
        # lease still holds it: once the lease is gone, a collection may take it first.
        client.remove_snapshot(LAZYFS, labels[TARGET])
        client.delete_lease(lease)
    containerd.ctr("images", "rm", "--sync", "no-such-image", check=False)  # a collection
    wait_until(lambda: database(containerd) == {}, "the layer's snapshot to be collected")
    assert_consistent(containerd)


def publish_corrupt(registry: Registry, image: PublishedImage) -> tuple[str, str]:
    """A converted image in `test/corrupt` whose top layer blob has a flipped byte in its
    chunk table (the registry serves it as stored). Returns (manifest digest, layer)."""
    layout = write_oci_image(Path(tempfile.mkdtemp(dir=registry.root)), "v1", image.layers)
    skopeo_push(layout.layout, "v1", registry.host, "test/corrupt:v1")
    convert_push(f"{registry.host}/test/corrupt:v1", f"{registry.host}/test/corrupt:v1-erofs",
                 "--chunk-size", CHUNK_SIZE, "--zstd-level", "5")  # other blobs than the good
    digest, manifest = manifest_of(registry, "test/corrupt", "v1-erofs")
    layer = manifest["layers"][-1]
    blob = blob_file(registry, layer["digest"])
    data = bytearray(blob.read_bytes())
    offset = int(layer["annotations"][ANNOTATION_CHUNK_TABLE_OFFSET])
    data[offset + 40] ^= 0xFF
    blob.write_bytes(bytes(data))
    return digest, layer["digest"]
