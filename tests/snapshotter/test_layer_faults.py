"""Layers the snapshotter cannot mount: one whose descriptor has no digest to authenticate
it (refused, whether by `lazyfs pull --containerd` or by a Prepare), and committed layers
whose registry is down when the snapshotter starts (retried in the background and by the
calls that need them; until then those calls fail, naming the layer)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import pytest

from lazyfs.containerd.client import ContainerdClient, ContainerdError
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    ANNOTATION_CHUNK_TABLE_OFFSET,
    ANNOTATION_ROOT_DIGEST,
)
from lazyfs.snapshotter.remote import LAZYFS_IMAGE_REF, LAZYFS_LAYER_DIGEST
from lazyfs.snapshotter.snapshots import TARGET_LABEL
from tests.support.containerd import Containerd
from tests.support.forged_images import blob_file
from tests.support.lazyfs_cli import wait_until
from tests.support.registry import Registry, free_port
from tests.support.registry_images import PublishedImage
from tests.support.snapshotter_images import (
    SHOW,
    assert_consistent,
    chain_of,
    check_output,
    committed,
    database,
    layer_stats,
    lazy_pull,
    manifest_of,
    put_manifest,
    scrape,
)

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

LAZYFS = "lazyfs"
RETRY_WAIT_S = 0.3


def test_a_layer_without_digests_is_refused(containerd: Containerd, image: PublishedImage,
                                            registry: Registry) -> None:
    _, manifest = manifest_of(registry, "test/app", "v1-erofs")
    bottom, top = manifest["layers"]
    for key in (ANNOTATION_CHUNK_DIGEST, ANNOTATION_ROOT_DIGEST):
        del top["annotations"][key]
    assert ANNOTATION_CHUNK_TABLE_OFFSET in top["annotations"]  # seekable EROFS still
    digest = put_manifest(registry, "test/app", "v1-no-digests", manifest)

    result = lazy_pull(containerd, f"{registry.host}/test/app:v1-no-digests")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert f"layer 2 of 2 ({top['digest']}): refusing to mount it" in message
    assert f"no {ANNOTATION_CHUNK_DIGEST} annotation" in message
    # Refused before containerd saw anything.
    assert containerd.ctr("images", "ls", "-q").stdout.split() == []
    assert committed(containerd) == []
    assert assert_consistent(containerd) == {}

    # As containerd's Prepares of a pull would come: the bottom layer has its digests and is
    # mounted; the top one is refused, and nothing of it is recorded or mounted.
    pinned = f"{registry.host}/test/app@{digest}"
    bottom_id, top_id = chain_of(registry, "test/app", "v1-no-digests")
    with ContainerdClient(str(containerd.socket), containerd.namespace) as client:
        with pytest.raises(ContainerdError, match="already exists"):
            client.prepare(LAZYFS, "extract-1", "", {
                TARGET_LABEL: bottom_id, LAZYFS_IMAGE_REF: pinned,
                LAZYFS_LAYER_DIGEST: bottom["digest"]})
        labels = {TARGET_LABEL: top_id, LAZYFS_IMAGE_REF: pinned,
                  LAZYFS_LAYER_DIGEST: top["digest"]}
        with pytest.raises(ContainerdError) as caught:
            client.prepare(LAZYFS, "extract-2", bottom_id, labels)
        message = str(caught.value)
        assert "\n" not in message, message
        assert f"layer {top['digest']} of {pinned}: refusing to mount it" in message
        assert f"no {ANNOTATION_CHUNK_DIGEST} annotation" in message
        for key in ("extract-2", top_id):
            assert client.snapshot_labels(LAZYFS, key) is None
    assert assert_consistent(containerd) == {bottom_id: bottom["digest"]}


@contextlib.contextmanager
def blobs_missing(registry: Registry, digests: Iterable[str]) -> Iterator[None]:
    """The registry answers 404 for these blobs until the block ends."""
    paths = [blob_file(registry, digest) for digest in digests]
    for path in paths:
        path.rename(path.with_name("moved"))
    try:
        yield
    finally:
        for path in paths:
            path.with_name("moved").rename(path)


def restart(containerd: Containerd, *options: str) -> None:
    containerd.snapshotter.extra = list(options)
    containerd.snapshotter.restart()
    wait_until(lambda: containerd.ctr("snapshots", "--snapshotter", LAZYFS, "ls",
                                      check=False).returncode == 0, "containerd reconnecting")


def remote(rows: dict[str, str | None]) -> dict[str, str | None]:
    """The remote snapshots (a removed container's own snapshot goes at containerd's next
    garbage collection)."""
    return {key: digest for key, digest in rows.items() if digest is not None}


def test_layers_that_fail_at_start_up_are_retried(containerd: Containerd,
                                                  image: PublishedImage,
                                                  registry: Registry) -> None:
    """Their blobs missing from the registry when the snapshotter starts, the layers are
    retried in the background, and by the first call that needs them."""
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    snapshots = assert_consistent(containerd)
    log = containerd.snapshotter.log
    with blobs_missing(registry, set(snapshots.values())):
        # Without the disk cache, which would mount them (see the test after this one).
        port = free_port()
        restart(containerd, "--no-disk-cache", "--remount-max-delay", str(RETRY_WAIT_S),
                "--metrics-address", f"127.0.0.1:{port}")
        assert layer_stats(containerd) == {}
        metrics = scrape(port)
        assert "lazyfs_layers_mounted 0.0" in metrics
        assert "lazyfs_layers_remount_pending 2.0" in metrics
        assert log.read_text().count("cannot mount it again") == 2
        # Calls that need the layers try them again, and fail naming one and why.
        run = containerd.ctr("run", "--rm", "--snapshotter", LAZYFS, image.converted, "c1",
                             "/bin/true", check=False)
        assert run.returncode != 0
        assert re.search(r"layer sha256:\w+ is not mounted: .*404", run.stderr), run.stderr
        key = next(iter(snapshots))
        shown = containerd.ctr("snapshots", "--snapshotter", LAZYFS, "mounts", "/mnt", key,
                               check=False)
        assert shown.returncode != 0
        assert f"layer {snapshots[key]} is not mounted: " in shown.stderr, shown.stderr
        assert database(containerd) == snapshots  # the failed container left nothing
        wait_until(lambda: "retry 2 of 8 failed" in log.read_text(), "background retries")
    # Nothing asks for them: the background retries mount them.
    wait_until(lambda: len(layer_stats(containerd)) == 2, "the layers mounted in the background")
    assert log.read_text().count("mounted again (retry") == 2
    wait_until(lambda: "lazyfs_layers_remount_pending 0.0" in scrape(port), "no retry pending")
    assert "lazyfs_layers_mounted 2.0" in scrape(port)
    assert assert_consistent(containerd) == snapshots

    with blobs_missing(registry, set(snapshots.values())):
        restart(containerd, "--no-disk-cache", "--remount-retries", "0")  # no retries now
        assert log.read_text().count("not mounted after 0 retries") == 2
    # The first call that needs them mounts them.
    run = containerd.ctr("run", "--rm", "--snapshotter", LAZYFS, image.converted, "c2",
                         "/bin/sh", "-c", SHOW)
    check_output(run.stdout)
    assert log.read_text().count("mounted again for snapshot") == 2
    assert remote(assert_consistent(containerd)) == snapshots


def test_layers_whose_blobs_are_gone_mount_from_the_disk_cache(containerd: Containerd,
                                                               image: PublishedImage,
                                                               registry: Registry) -> None:
    """With the disk cache (the default), a restart while the registry lacks the blobs mounts
    the layers from it, and a container that reads what one read before runs."""
    result = lazy_pull(containerd, image.converted)
    assert result.returncode == 0, result.stderr
    snapshots = assert_consistent(containerd)
    check_output(containerd.ctr("run", "--rm", "--snapshotter", LAZYFS, image.converted, "d1",
                                "/bin/sh", "-c", SHOW).stdout)
    with blobs_missing(registry, set(snapshots.values())):
        restart(containerd)
        assert len(layer_stats(containerd)) == 2
        check_output(containerd.ctr("run", "--rm", "--snapshotter", LAZYFS, image.converted,
                                    "d2", "/bin/sh", "-c", SHOW).stdout)
        for values in layer_stats(containerd).values():
            assert values["bytes_fetched"] == 0 and values["chunks_from_disk"] >= 1
        # Once the start-up is over, the layers ask their source whether it answers.
        wait_until(lambda: "source unreachable" in containerd.snapshotter.log.read_text(),
                   "the probe of the missing blobs")
    assert remote(assert_consistent(containerd)) == snapshots
