"""Layers the snapshotter cannot mount: one whose descriptor has no digest to authenticate
it (refused, whether by `lazyfs pull --containerd` or by a Prepare)."""

from __future__ import annotations

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
from tests.support.registry import Registry
from tests.support.registry_images import PublishedImage
from tests.support.snapshotter_images import (
    assert_consistent,
    committed,
    lazy_pull,
    manifest_of,
    put_manifest,
)

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

LAZYFS = "lazyfs"


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
    with ContainerdClient(str(containerd.socket), containerd.namespace) as client:
        with pytest.raises(ContainerdError, match="already exists"):
            client.prepare(LAZYFS, "extract-1", "", {
                TARGET_LABEL: "bottom", LAZYFS_IMAGE_REF: pinned,
                LAZYFS_LAYER_DIGEST: bottom["digest"]})
        labels = {TARGET_LABEL: "top", LAZYFS_IMAGE_REF: pinned,
                  LAZYFS_LAYER_DIGEST: top["digest"]}
        with pytest.raises(ContainerdError) as caught:
            client.prepare(LAZYFS, "extract-2", "bottom", labels)
        message = str(caught.value)
        assert "\n" not in message, message
        assert f"layer {top['digest']} of {pinned}: refusing to mount it" in message
        assert f"no {ANNOTATION_CHUNK_DIGEST} annotation" in message
        for key in ("extract-2", "top"):
            assert not client.snapshot_exists(LAZYFS, key)
    assert assert_consistent(containerd) == {"bottom": bottom["digest"]}
