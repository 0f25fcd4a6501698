"""lazyfs's CRI image service under containerd 1.6's CRI plugin, driven as kubelet drives
them: PullImage, ImageStatus, ListImages, RemoveImage through lazyfs's socket, pods and
containers through containerd's. A seekable EROFS image is pulled lazily (containerd's own
pull fails on its layers) and its containers start from the lazily mounted layers; images
that share layers share their snapshots, mounts and fetches."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from lazyfs.cri.api import api_pb2 as cri
from lazyfs.format.descriptor import ANNOTATION_CHUNK_TABLE_OFFSET, parse_annotations
from lazyfs.format.layout import parse_metadata
from lazyfs.format.open_plan import metadata_pieces
from lazyfs.snapshotter.layers import layer_name
from tests.cri.conftest import PULL_PASSWORD, PULL_USER
from tests.support.containerd import Containerd
from tests.support.cri import Node, log_lines, running_node
from tests.support.forged_images import blob_file
from tests.support.images import base_layer, change_layer, skopeo_push, write_oci_image
from tests.support.lazyfs_cli import wait_until
from tests.support.registry import Registry
from tests.support.registry_images import PublishedImage, convert_push
from tests.support.snapshotter_images import (
    assert_consistent,
    chain_of,
    committed,
    erofs_mounts,
    layer_stats,
    manifest_of,
)

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

CRI_NAMESPACE = "k8s.io"
# A file of each layer, and the directory the top layer emptied and refilled.
SHOW = ["/bin/sh", "-c", "cat /etc/motd /etc/passwd; ls /var/cache/app; echo end"]


def check_shown(lines: list[str], motd: str = "welcome") -> None:
    assert lines[0] == motd  # the top layer's /etc/motd
    assert "root:x:0:0:root:/root:/bin/sh" in lines  # the base layer's /etc/passwd
    assert "fresh.txt" in lines and "a.bin" not in lines  # the opaque directory
    assert lines[-1] == "end"


def start_in_pod(node: Node, image_ref: str, log_dir: Path, name: str) -> tuple[str, str]:
    """A host-network pod with one container of `image_ref` (as kubelet passes what
    PullImage answered) started, showing SHOW: (sandbox ID, container ID)."""
    sandbox = node.cri.sandbox_config(name, log_dir)
    sandbox_id = node.cri.run_pod(sandbox)
    return sandbox_id, node.cri.run_container(sandbox_id, sandbox, "show", image_ref, SHOW)


def run_in_pod(node: Node, image_ref: str, log_dir: Path, name: str) -> list[str]:
    """A pod of `start_in_pod`; its container's log lines once it has exited 0."""
    sandbox_id, container_id = start_in_pod(node, image_ref, log_dir, name)
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


def test_pods_of_two_images_fetch_the_layers_they_share_once(
    node: Node, image: PublishedImage, sibling: PublishedImage, registry: Registry,
    tmp_path: Path
) -> None:
    """Two images, one the other's two layers (the same blobs) and a top layer of its own,
    pulled lazily, a pod of each: the shared layers are one snapshot and one mount each;
    once the first pod has run, the second image's pull and pod fetch nothing of them, while
    the first pod still runs; each container sees its own top layer."""
    app = manifest_of(registry, "test/app", "v1-erofs")[1]["layers"]
    other = manifest_of(registry, "test/sibling", "v1-erofs")[1]["layers"]
    assert [layer["digest"] for layer in other[:2]] == [layer["digest"] for layer in app]
    shared = {layer_name(layer["digest"]): layer for layer in app}

    def fetched() -> dict[str, int]:
        """What each shared layer fetched, once the content checks are done (they fetch
        every frame once, in the background): from then on only reads fetch."""
        wait_until(lambda: None not in remote_layers(node.containerd).values(),
                   "the layers' content checks")
        stats = layer_stats(node.containerd)
        return {name: stats[name]["bytes_fetched"] for name in shared}

    def shown(container_id: str, log: Path) -> list[str]:
        status = node.cri.wait_exited(container_id)
        assert (status.exit_code, status.reason) == (0, "Completed"), status
        return log_lines(log)

    app_ref = node.cri.pull(image.converted)
    app_pod, container_id = start_in_pod(node, app_ref, tmp_path / "app", "app")
    check_shown(shown(container_id, tmp_path / "app" / "show.log"))
    first = fetched()

    sibling_ref = node.cri.pull(sibling.converted)
    assert sibling_ref != app_ref
    # One snapshot per chain ID, each of a remote layer mounted once, nothing else mounted.
    snapshots = {key: digest for key, digest in assert_consistent(node.containerd).items()
                 if digest is not None}
    assert snapshots == dict(zip(chain_of(registry, "test/sibling", "v1-erofs"),
                                 [layer["digest"] for layer in other], strict=True))
    sibling_pod, container_id = start_in_pod(node, sibling_ref, tmp_path / "sibling",
                                             "sibling")
    lines = shown(container_id, tmp_path / "sibling" / "show.log")
    check_shown(lines, motd="welcome-sibling")
    assert fetched() == first  # the sibling's pull and pod: nothing of the shared layers

    for name, layer in shared.items():
        on_demand = first[name] - frames_bytes(registry, layer)
        print(f"\nshared layer {name}: {on_demand} of {layer['size']} bytes fetched")
        assert 0 < on_demand <= layer["size"]  # no byte twice
    node.cri.remove_pod(sibling_pod)
    node.cri.remove_pod(app_pod)


def on_demand_bytes(containerd: Containerd, checked: int) -> int:
    """What the snapshotter's layers fetched but for their content checks (done)."""
    return sum(s["bytes_fetched"] for s in layer_stats(containerd).values()) - checked


SECRET = cri.AuthConfig(username=PULL_USER, password=PULL_PASSWORD)
NEEDS_CREDENTIALS = "the image needs credentials: pull the image again"


def containerd_state(containerd: Containerd) -> dict[str, list[str]]:
    """What containerd's CRI namespace holds: images, content, snapshots of ours, leases;
    and the snapshotter's remote layers."""
    def listing(*args: str) -> list[str]:
        return sorted(containerd.ctr(*args, namespace=CRI_NAMESPACE).stdout.split())

    return {
        "images": listing("images", "ls", "-q"),
        "content": listing("content", "ls", "-q"),
        "snapshots": listing("snapshots", "--snapshotter", "lazyfs", "ls"),
        "leases": listing("leases", "ls", "-q"),
        "layers": sorted(remote_layers(containerd)),
    }


def refused(node: Node, reference: str, auth: cri.AuthConfig | None) -> grpc.RpcError:
    """The error of a PullImage that must fail and leave nothing behind."""
    before = containerd_state(node.containerd)
    with pytest.raises(grpc.RpcError) as caught:
        node.cri.pull(reference, auth)
    assert containerd_state(node.containerd) == before
    assert node.cri.status(reference) is None
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert f'image "{reference}"' in str(error.details())  # ours, or containerd's
    return error


def assert_secret_nowhere(node: Node, disk_cache: Path) -> None:
    """The pull secret is in no log and no file of the snapshotter or its disk cache."""
    assert PULL_PASSWORD not in node.containerd.snapshotter.log.read_text()
    root = node.containerd.snapshotter.root
    for directory in (root, disk_cache):
        for path, dirs, files in os.walk(directory):
            if Path(path) == root:  # not the images' files: the layers and snapshots
                dirs[:] = [d for d in dirs if d not in ("fuse", "layers", "snapshots")]
            for name in files:
                file = Path(path) / name
                if stat.S_ISREG(file.lstat().st_mode):
                    assert PULL_PASSWORD.encode() not in file.read_bytes(), file


def test_a_private_image_is_pulled_with_the_pods_pull_secret(
    node: Node, private_image: PublishedImage, tmp_path: Path, private_disk_cache: Path
) -> None:
    """A pull without the pod's secret, or with a wrong one, is refused, names the image and
    the cause, and leaves nothing; with it, the image is pulled lazily and the secret serves
    its layers' lazy fetches; an ordinary image of that registry goes to containerd with it."""
    error = refused(node, private_image.converted, None)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "authentication required (HTTP 401" in str(error.details())
    wrong = cri.AuthConfig(username=PULL_USER, password="not-the-secret")
    error = refused(node, private_image.converted, wrong)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"the credentials of user '{PULL_USER}' were refused" in str(error.details())
    assert "not-the-secret" not in str(error.details())

    image_ref = node.cri.pull(private_image.converted, SECRET)
    assert len(remote_layers(node.containerd)) == 2
    check_shown(run_in_pod(node, image_ref, tmp_path / "lazy", "private"))

    encoded = base64.b64encode(f"{PULL_USER}:{PULL_PASSWORD}".encode()).decode()
    ordinary = node.cri.pull(private_image.original, cri.AuthConfig(auth=encoded))
    status = node.cri.status(private_image.original)
    assert status is not None and status.id == ordinary != image_ref
    assert len(remote_layers(node.containerd)) == 2  # unpacked by containerd, not lazily
    check_shown(run_in_pod(node, ordinary, tmp_path / "ordinary", "ordinary"))
    assert_secret_nowhere(node, private_disk_cache)


def test_after_a_restart_a_private_image_needs_its_pull_secret_again(
    node: Node, private_image: PublishedImage, tmp_path: Path, private_disk_cache: Path
) -> None:
    """The snapshotter keeps pull secrets in memory only: restarted, it cannot mount the
    layers of a private image again, and a container of it fails saying what to do, until
    the image is pulled again with the secret."""
    image_ref = node.cri.pull(private_image.converted, SECRET)
    check_shown(run_in_pod(node, image_ref, tmp_path / "before", "before"))
    snapshotter = node.containerd.snapshotter
    # No disk cache: opening a layer asks its registry (from the cache it would not).
    snapshotter.extra = [*snapshotter.extra, "--no-disk-cache"]
    snapshotter.restart()
    wait_until(lambda: node.containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls",
                                           check=False, namespace=CRI_NAMESPACE).returncode == 0,
               "containerd reconnecting")
    wait_until(lambda: NEEDS_CREDENTIALS in snapshotter.log.read_text(),
               "the layers' remount to fail")
    assert layer_stats(node.containerd) == {}

    sandbox = node.cri.sandbox_config("after", tmp_path / "after")
    sandbox_id = node.cri.run_pod(sandbox)
    with pytest.raises(grpc.RpcError) as caught:
        node.cri.run_container(sandbox_id, sandbox, "show", image_ref, SHOW)
    assert isinstance(caught.value, grpc.Call)
    details = str(caught.value.details())
    assert NEEDS_CREDENTIALS in details and "refused without credentials (HTTP 401)" in details

    assert node.cri.pull(private_image.converted, SECRET) == image_ref
    container_id = node.cri.run_container(sandbox_id, sandbox, "show2", image_ref, SHOW)
    status = node.cri.wait_exited(container_id)
    assert (status.exit_code, status.reason) == (0, "Completed"), status
    check_shown(log_lines(tmp_path / "after" / "show2.log"))
    assert_secret_nowhere(node, private_disk_cache)


def test_after_a_restart_reads_the_disk_cache_lacks_need_the_pull_secret_again(
    node: Node, private_app: PublishedImage, tmp_path: Path
) -> None:
    """With the disk cache, a restarted snapshotter mounts the layers again without asking
    the registry: what the cache holds is read, and a fetch of the rest fails (EIO in the
    container) saying that the image needs credentials, until a pull brings them."""
    image_ref = node.cri.pull(private_app.converted, SECRET)
    check_shown(run_in_pod(node, image_ref, tmp_path / "before", "before"))
    node.containerd.snapshotter.restart()
    wait_until(lambda: node.containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls",
                                           check=False, namespace=CRI_NAMESPACE).returncode == 0,
               "containerd reconnecting")
    assert len(layer_stats(node.containerd)) == 2  # from the disk cache

    sandbox = node.cri.sandbox_config("after", tmp_path / "after")
    sandbox_id = node.cri.run_pod(sandbox)
    read_all = ["/bin/sh", "-c", "cat /etc/motd && cat /opt/big.bin > /dev/null && echo read"]

    def start(name: str) -> tuple[int, list[str]]:
        container_id = node.cri.run_container(sandbox_id, sandbox, name, image_ref, read_all)
        status = node.cri.wait_exited(container_id)
        return status.exit_code, log_lines(tmp_path / "after" / f"{name}.log")

    code, lines = start("lacking")
    assert code != 0 and lines[0] == "welcome"  # cached: read; the rest: EIO
    assert "Input/output error" in lines[-1], lines
    assert NEEDS_CREDENTIALS in node.containerd.snapshotter.log.read_text()

    node.cri.pull(private_app.converted, SECRET)
    # Reads of what failed are held off for a moment (a second, doubling while they fail).
    attempts = iter(range(30))
    wait_until(lambda: start(f"again{next(attempts)}") == (0, ["welcome", "read"]),
               "the layers to read with the secret again", timeout_s=90)


def test_credentials_of_a_docker_config_keep_working(
    work: Path, registry: Registry, private: Registry, pause: str,
    private_image: PublishedImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose snapshotter has `docker login`'s credentials pulls a private image
    lazily without a pull secret, and its containers read the layers with them."""
    config = tmp_path / "docker"
    config.mkdir()
    encoded = base64.b64encode(f"{PULL_USER}:{PULL_PASSWORD}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {private.host: {"auth": encoded}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    with running_node(work / "ndocker", pause, [registry.host, private.host]) as node:
        image_ref = node.cri.pull(private_image.converted)
        assert len(remote_layers(node.containerd)) == 2
        check_shown(run_in_pod(node, image_ref, tmp_path / "pod", "docker"))


def test_an_ordinary_image_and_every_other_call_go_to_containerd(
    node: Node, image: PublishedImage, registry: Registry, tmp_path: Path
) -> None:
    """A gzip image pulled through lazyfs's endpoint is containerd's own pull (its layers
    unpacked into ordinary snapshots of the snapshotter); status, listing and the image file
    system are containerd's answers."""
    image_ref = node.cri.pull(image.original)
    assert image_ref == manifest_of(registry, "test/app", "v1")[1]["config"]["digest"]
    assert remote_layers(node.containerd) == {}
    assert len(committed(node.containerd, CRI_NAMESPACE)) == 2
    status = node.cri.status(image.original)
    assert status is not None and status.id == image_ref
    assert list(status.repo_tags) == [image.original]
    assert image_ref in [listed.id for listed in node.cri.list_images()]
    usage = node.cri.image("ImageFsInfo", cri.ImageFsInfoRequest(), cri.ImageFsInfoResponse)
    assert usage.image_filesystems and usage.image_filesystems[0].fs_id.mountpoint
    check_shown(run_in_pod(node, image_ref, tmp_path / "pod", "ordinary"))
    assert node.cri.status(f"{registry.host}/test/app:unknown") is None
    node.cri.remove(f"{registry.host}/test/app:unknown")  # removing nothing is no error


def test_removing_a_lazily_pulled_image_unmounts_its_layers(
    node: Node, image: PublishedImage, tmp_path: Path
) -> None:
    """RemoveImage (containerd's: every name of the image, then its garbage collection)
    removes the layers' snapshots, and the snapshotter unmounts the layers."""
    image_ref = node.cri.pull(image.converted)
    check_shown(run_in_pod(node, image_ref, tmp_path / "pod", "removed"))
    assert len(erofs_mounts(node.containerd)) == 2
    node.cri.remove(image.converted)
    assert node.cri.status(image_ref) is None
    assert image_ref not in [listed.id for listed in node.cri.list_images()]
    wait_until(lambda: remote_layers(node.containerd) == {}, "the layers' snapshots to go")
    wait_until(lambda: stats_when_readable(node.containerd) == {}, "the layers to be unmounted")
    assert layer_stats(node.containerd) == {}  # readable again: the FUSE file system serves
    assert erofs_mounts(node.containerd) == []
    images = node.containerd.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout
    assert "test/app" not in images and image_ref not in images


def test_an_image_that_cannot_be_pulled_is_named_with_the_cause(
    node: Node, image: PublishedImage, registry: Registry
) -> None:
    """An unknown tag or repository: the registry's answer, named, and nothing left. A
    registry lazyfs cannot reach: containerd, which may know a way, is asked, and says why
    it cannot either."""
    for missing in (f"{registry.host}/test/app:no-such-tag", f"{registry.host}/test/none:v1"):
        error = refused(node, missing, None)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert str(error.details()).startswith(f'failed to pull image "{missing}": ')
        assert "not found (HTTP 404" in str(error.details())
    unreachable = "127.0.0.1:9/test/app:v1"
    error = refused(node, unreachable, None)
    assert str(error.details()).startswith(f'failed to pull and unpack image "{unreachable}"')
    assert "connection refused" in str(error.details()), error.details()
    assert "127.0.0.1:9" in node.containerd.snapshotter.log.read_text()


def test_a_layer_that_fails_to_mount_leaves_nothing_of_the_pull(
    node: Node, registry: Registry, tmp_path: Path
) -> None:
    """The second layer's chunk table does not match the digest its manifest gives: the
    pull fails naming the image and the layer, and what it did before (content, the first
    layer's snapshot and mount) is collected before the error comes back."""
    layout = write_oci_image(tmp_path / "corrupt", "v1", [base_layer(), change_layer("-bad")])
    skopeo_push(layout.layout, "v1", registry.host, "test/corrupt:v1")
    reference = f"{registry.host}/test/corrupt:v1-erofs"
    convert_push(f"{registry.host}/test/corrupt:v1", reference)
    layer = manifest_of(registry, "test/corrupt", "v1-erofs")[1]["layers"][1]
    blob = blob_file(registry, layer["digest"])  # this image's own: no other has the layer
    data = bytearray(blob.read_bytes())
    data[int(layer["annotations"][ANNOTATION_CHUNK_TABLE_OFFSET]) + 40] ^= 0xFF
    blob.write_bytes(bytes(data))

    error = refused(node, reference, None)
    details = str(error.details())
    assert details.startswith(f'failed to pull image "{reference}": layer 2 of 2 '
                              f'({layer["digest"]})'), details
    assert "chunk table" in details
    assert erofs_mounts(node.containerd) == []


def stats_when_readable(containerd: Containerd) -> dict[str, dict[str, Any]] | None:
    """The snapshotter's layer figures, or None while its stats file cannot be read (a layer
    going away at that moment: polled again)."""
    try:
        return layer_stats(containerd)
    except AssertionError:
        return None
