"""lazyfs's CRI image service under containerd 1.6's CRI plugin, driven as kubelet drives
them: PullImage, ImageStatus, ListImages, RemoveImage through lazyfs's socket, pods and
containers through containerd's. A seekable EROFS image is pulled lazily (containerd's own
pull fails on its layers) and its containers start from the lazily mounted layers."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from lazyfs.format.descriptor import parse_annotations
from lazyfs.format.layout import parse_metadata
from lazyfs.format.open_plan import metadata_pieces
from tests.support.containerd import Containerd
from tests.support.cri import Node, log_lines
from tests.support.forged_images import blob_file
from tests.support.lazyfs_cli import wait_until
from tests.support.registry import Registry
from tests.support.registry_images import PublishedImage
from tests.support.snapshotter_images import committed, layer_stats, manifest_of

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

CRI_NAMESPACE = "k8s.io"
# A file of each layer, and the directory the top layer emptied and refilled.
SHOW = ["/bin/sh", "-c", "cat /etc/motd /etc/passwd; ls /var/cache/app; echo end"]


def check_shown(lines: list[str]) -> None:
    assert lines[0] == "welcome"  # the top layer's /etc/motd
    assert "root:x:0:0:root:/root:/bin/sh" in lines  # the base layer's /etc/passwd
    assert "fresh.txt" in lines and "a.bin" not in lines  # the opaque directory
    assert lines[-1] == "end"


def run_in_pod(node: Node, image_ref: str, log_dir: Path, name: str) -> list[str]:
    """A host-network pod running one container of `image_ref` (as kubelet passes what
    PullImage answered) that shows SHOW; its log lines once it has exited 0."""
    sandbox = node.cri.sandbox_config(name, log_dir)
    sandbox_id = node.cri.run_pod(sandbox)
    container_id = node.cri.run_container(sandbox_id, sandbox, "show", image_ref, SHOW)
    status = node.cri.wait_exited(container_id)
    assert (status.exit_code, status.reason) == (0, "Completed"), status
    lines = log_lines(log_dir / "show.log")
    node.cri.remove_pod(sandbox_id)
    return lines


def remote_layers(containerd: Containerd) -> dict[str, str | None]:
    """The snapshotter's remote layers: digest -> what its content check measured (None
    while it has not)."""
    path = containerd.snapshotter.root / "metadata.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT digest, content_digest FROM layers").fetchall()
    return dict(rows)


def frames_bytes(registry: Registry, layer: dict[str, Any]) -> int:
    """The bytes of a layer blob's frames: what the content check of a remote layer fetches
    (every frame, in order, once), besides what reads fetch."""
    annotations = parse_annotations(layer["annotations"], "layer")
    blob = blob_file(registry, layer["digest"]).read_bytes()
    metadata = parse_metadata(annotations, len(blob), *metadata_pieces({0: blob}, annotations))
    last = metadata.table.chunk_count - 1
    return metadata.frame_range(last)[1] - metadata.frame_range(0)[0]


def test_a_converted_image_is_pulled_lazily_and_its_pod_runs(
    node: Node, image: PublishedImage, registry: Registry, tmp_path: Path
) -> None:
    manifest_digest, manifest = manifest_of(registry, "test/app", "v1-erofs")
    image_ref = node.cri.pull(image.converted)
    # kubelet's image reference: the image ID, the config's digest, as containerd gives it.
    assert image_ref == manifest["config"]["digest"]
    # Lazily: two remote layers of the snapshotter, committed in containerd's CRI namespace,
    # nothing read of them but their superblocks (and what came along with a miss).
    assert len(committed(node.containerd, CRI_NAMESPACE)) == 2
    digests = [layer["digest"] for layer in manifest["layers"]]
    assert sorted(remote_layers(node.containerd)) == sorted(digests)
    stats = layer_stats(node.containerd)
    assert len(stats) == 2
    assert all(s["chunks_fetched"] - s["readahead_chunks"] <= 2 for s in stats.values())

    # What kubelet asks before it starts a container: containerd's CRI plugin knows the
    # image by its ID, its tag and its digest.
    repository = image.converted.rpartition(":")[0]
    for name in (image_ref, image.converted, f"{repository}@{manifest_digest}"):
        status = node.cri.status(name)
        assert status is not None, name
        assert status.id == image_ref
        assert list(status.repo_tags) == [image.converted]
        assert list(status.repo_digests) == [f"{repository}@{manifest_digest}"]
        assert status.size > 0
    assert image_ref in [listed.id for listed in node.cri.list_images()]

    # Every remote layer's content is checked once in the background (a full download, off
    # the start-up path, which leaves the chunk cache alone); besides that, the pull and the
    # container read a fraction.
    wait_until(lambda: None not in remote_layers(node.containerd).values(),
               "the layers' content checks")
    checked = sum(frames_bytes(registry, layer) for layer in manifest["layers"])
    pulled = on_demand_bytes(node.containerd, checked)
    check_shown(run_in_pod(node, image_ref, tmp_path / "pod", "lazy"))
    started = on_demand_bytes(node.containerd, checked)
    stats = layer_stats(node.containerd)
    total = sum(s["blob_size"] for s in stats.values())
    print(f"\nlazy pull: {pulled} of {total} bytes fetched; with the pod: {started} "
          f"({sum(s['chunks_fetched'] for s in stats.values())} of "
          f"{sum(s['chunk_count'] for s in stats.values())} chunks); the content check: "
          f"{checked}")
    assert 0 < pulled < total / 8, (pulled, total)  # metadata, superblocks, readahead
    assert pulled < started < total / 4, (started, total)


def on_demand_bytes(containerd: Containerd, checked: int) -> int:
    """What the snapshotter's layers fetched but for their content checks (done)."""
    return sum(s["bytes_fetched"] for s in layer_stats(containerd).values()) - checked
