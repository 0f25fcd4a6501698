"""Chain-ID poisoning: an image made of another image's config (so the same diff IDs, hence
the same chain IDs) and other seekable layers must never have its layers shown under the
other image's name, across containerd namespaces or within one.

The forged image is pulled first; then the victim. Across namespaces the snapshotter must not
answer the victim's Prepare with the forged layer: it waits for the forged layer's content
check, which finds that it does not hash to the diff ID it was named by, renames it out of the
way and mounts the victim's own layer. Within one namespace containerd would reuse the
forged snapshot without asking: `lazyfs pull` refuses, and once the check has run the forged
snapshot's mounts fail.
"""

from __future__ import annotations

import re

import pytest

from tests.support.containerd import Containerd
from tests.support.images import busybox_layers, skopeo_push, write_oci_image
from tests.support.lazyfs_cli import wait_until
from tests.support.registry import Registry
from tests.support.registry_images import PublishedImage, convert_push
from tests.support.snapshotter_images import (
    CHUNK_SIZE,
    SHOW,
    check_output,
    database,
    lazy_pull,
    manifest_of,
    put_manifest,
)

pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow]


def publish_forgery(registry: Registry, image: PublishedImage) -> str:
    """`test/app:forged`: the victim's converted manifest and config, with the layers of
    another converted image (the same bottom layer, another top layer: /etc/hostname says
    `changed-forged`)."""
    work = registry.root.parent / "forgery"
    layout = write_oci_image(work, "v1", busybox_layers("-forged"))
    skopeo_push(layout.layout, "v1", registry.host, "test/app:other")
    convert_push(f"{registry.host}/test/app:other", f"{registry.host}/test/app:other-erofs",
                 "--chunk-size", CHUNK_SIZE)
    _, victim = manifest_of(registry, "test/app", "v1-erofs")
    _, other = manifest_of(registry, "test/app", "other-erofs")
    assert victim["layers"][1]["digest"] != other["layers"][1]["digest"]
    forged = {**victim, "layers": other["layers"]}
    put_manifest(registry, "test/app", "forged", forged)
    return f"{registry.host}/test/app:forged"


def hostname(containerd: Containerd, reference: str, namespace: str, name: str
             ) -> tuple[int, str]:
    result = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", reference, name,
                            "/bin/busybox", "cat", "/etc/hostname", namespace=namespace,
                            check=False)
    return result.returncode, result.stdout + result.stderr


def test_a_forged_image_never_stands_for_the_image_whose_config_it_copied(
    containerd: Containerd, image: PublishedImage, registry: Registry
) -> None:
    forged = publish_forgery(registry, image)
    a, b = f"{containerd.namespace}-a", f"{containerd.namespace}-b"
    result = lazy_pull(containerd, forged, a)
    assert result.returncode == 0, result.stderr

    # Within one namespace containerd would reuse the forged snapshots without asking the
    # snapshotter: lazyfs pull refuses, naming the layer and the chain ID.
    result = lazy_pull(containerd, image.converted, a)
    assert result.returncode != 0
    digest = r"sha256:[0-9a-f]{64}"
    assert re.search(rf"layer 2 of 2 \({digest}\): namespace .*-a has its chain ID {digest} as "
                     rf"layer {digest} of .*test/app", result.stderr), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1

    # Across namespaces: the victim's pull waits for the forged layer's check, takes the name
    # back and runs its own files.
    result = lazy_pull(containerd, image.converted, b)
    assert result.returncode == 0, result.stderr
    run = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", image.converted, "victim",
                         "/bin/sh", "-c", SHOW, namespace=b)
    check_output(run.stdout)
    rows = database(containerd)
    quarantined = [key for key in rows if key.startswith("lazyfs.quarantined/")]
    assert len(quarantined) == 1, rows
    log = containerd.snapshotter.log.read_text()
    assert "is not what the image says: its config gives diff ID" in log

    # The layers of the victim are measured too, and hold.
    wait_until(lambda: containerd.snapshotter.log.read_text().count(
        "as its image says") >= 2, "the victim's layers to be checked")

    # In the forger's namespace the chain ID now names the victim's layer: whatever runs
    # there under it sees the content the diff ID was made of.
    code, output = hostname(containerd, forged, a, "forged")
    assert code == 0, output
    assert output.splitlines()[0] == "changed", output
