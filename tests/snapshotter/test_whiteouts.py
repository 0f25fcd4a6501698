"""Containers on lazily mounted layers that white out names no lower layer has: the
snapshotter hands containerd overlays of the layers' EROFS mounts under the container's
upper directory, and a container must not list those whiteouts (as `c?????????` entries) in
a directory that only the whiting-out layer has, whether that layer is the only one, the
bottom or the top."""

from __future__ import annotations

import pytest

from tests.support.containerd import Containerd
from tests.support.images import base_layer, ghost_layer
from tests.support.registry import Registry
from tests.support.registry_images import publish
from tests.support.snapshotter_images import lazy_pull

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]

# The shell's globs list names as readdir returns them (ls leaves out, on its stdout, an
# entry it cannot stat).
LIST = "echo /fresh/* /newer/*; echo /*"


def test_a_container_lists_no_whiteouts_of_names_no_layer_has(
    containerd: Containerd, registry: Registry
) -> None:
    work = containerd.work / "images"
    only = publish(work, registry.host, layers=[ghost_layer(on_base=True)],
                   repository="test/ghost-only")
    stacked = publish(work, registry.host,
                      layers=[ghost_layer(), base_layer(), ghost_layer("newer")],
                      repository="test/ghost-stacked")
    for number, (image, expected) in enumerate(
        ((only, "/fresh/real /newer/*"), (stacked, "/fresh/real /newer/real"))
    ):
        pulled = lazy_pull(containerd, image.converted)
        assert pulled.returncode == 0, pulled.stderr
        assert "lazy" in pulled.stdout
        result = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.converted,
                                f"ghost{number}", "/bin/sh", "-c", LIST)
        listed, root = result.stdout.splitlines()
        assert listed == expected
        assert "phantom" not in root and "/bin" in root
