"""Two containerd namespaces pulling the same image lazily.

containerd hands a proxy snapshotter one flat key space: its own snapshots are named
NAMESPACE/N/KEY, but a remote snapshot is recorded under the target containerd asked for,
the chain ID, and containerd's metadata in every namespace that pulls the image points at
that one snapshot. Removing the image in one namespace must leave it, mounted, to the other;
containerd's garbage collection removes it once no namespace refers to it.
"""

from __future__ import annotations

import re

import pytest

from tests.support.containerd import Containerd
from tests.support.registry_images import PublishedImage
from tests.support.snapshotter_images import (
    SHOW,
    assert_consistent,
    check_output,
    committed,
    database,
    lazy_pull,
)

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]


def run_show(containerd: Containerd, namespace: str, image: PublishedImage, name: str) -> None:
    result = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.converted, name,
                            "/bin/sh", "-c", SHOW, namespace=namespace)
    check_output(result.stdout)


def test_a_layer_shared_by_two_namespaces_stays_until_both_remove_it(
    containerd: Containerd, image: PublishedImage
) -> None:
    a, b = f"{containerd.namespace}-a", f"{containerd.namespace}-b"
    for namespace in (a, b):
        result = lazy_pull(containerd, image.converted, namespace)
        assert result.returncode == 0, result.stderr
    shared = assert_consistent(containerd)
    assert len(shared) == 2 and all(key.startswith("sha256:") for key in shared)  # chain IDs
    assert sorted(committed(containerd, a)) == sorted(committed(containerd, b)) == sorted(shared)

    run_show(containerd, a, image, "in-a")
    # While a container runs, its snapshot is one of ours, named by containerd.
    containerd.ctr("run", "-d", "--snapshotter", "lazyfs", image.converted, "long", "busybox",
                   "sleep", "600", namespace=b)
    keys = [key for key in database(containerd) if key.startswith(f"{b}/")]
    assert len(keys) == 1 and re.fullmatch(rf"{re.escape(b)}/\d+/long", keys[0]), keys
    containerd.ctr("tasks", "delete", "--force", "long", namespace=b)
    containerd.ctr("containers", "rm", "long", namespace=b)

    containerd.ctr("images", "rm", "--sync", image.converted, namespace=a)
    assert committed(containerd, a) == []
    assert assert_consistent(containerd) == shared  # b's image still holds them
    run_show(containerd, b, image, "in-b")

    containerd.ctr("images", "rm", "--sync", image.converted, namespace=b)
    assert assert_consistent(containerd) == {}
