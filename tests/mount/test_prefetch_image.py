"""Prefetch lists that travel with an image, against Debian's docker-registry on 127.0.0.1:
`lazyfs run --record` writes one, `lazyfs convert --prefetch` puts it into the layer
annotations (layers pass through unchanged), a mount of that image replays it on its own, and
a list recorded from another conversion is refused by convert with a clear message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from lazyfs.format.prefetch_list import (
    ANNOTATION_PREFETCH,
    parse_prefetch_annotation,
    parse_prefetch_list,
)
from tests.support import registry_images
from tests.support.lazyfs_cli import Lazyfs, wait_until
from tests.support.registry import Registry
from tests.support.registry_images import PublishedImage, convert_push, publish

pytestmark = [pytest.mark.root, pytest.mark.network]

INSECURE = "--insecure-registry"
CHUNK_DIGEST = "dev.containerd.erofs.zstd.chunk_digest"


registry = registry_images.registry


@pytest.fixture(scope="module")
def busybox(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> PublishedImage:
    """The busybox image, converted again with 64 KiB chunks (so a start reads a few)."""
    image = publish(tmp_path_factory.mktemp("busybox"), registry.host)
    small = f"{registry.host}/test/busybox:v1-64k"
    convert_push(image.original, small, "--chunk-size", "64K")
    return PublishedImage(image.host, image.original, small, image.layers)


def manifest(host: str, tag: str) -> dict[str, Any]:
    response = httpx.get(f"http://{host}/v2/test/busybox/manifests/{tag}", timeout=10,
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def layer_stats(lazyfs: Lazyfs, mountpoint: Path) -> dict[str, Any]:
    result = lazyfs.run("stats", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["layers"]  # type: ignore[no-any-return]


def test_recorded_list_travels_in_the_image_and_mounts_use_it(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    recorded = tmp_path / "start.json"
    run = lazyfs.run("run", busybox.converted, INSECURE, "--record", str(recorded), "--",
                     "/bin/busybox", "sh", "-c", "cat /etc/hostname")
    assert run.returncode == 0, run.stderr
    assert f"prefetch list written to {recorded}" in run.stderr
    prefetch = parse_prefetch_list(recorded.read_bytes(), str(recorded))
    source = manifest(busybox.host, "v1-64k")
    digests = [layer["annotations"][CHUNK_DIGEST] for layer in source["layers"]]
    assert prefetch.layers and all(entry.chunk_digest in digests for entry in prefetch.layers)

    carried = f"{busybox.host}/test/busybox:v1-64k-prefetch"
    converted = lazyfs.run("convert", busybox.converted, "--prefetch", str(recorded), "--push",
                           carried, INSECURE)
    assert converted.returncode == 0, converted.stderr
    assert "prefetch list of" in converted.stderr
    annotated = manifest(busybox.host, "v1-64k-prefetch")
    assert [layer["digest"] for layer in annotated["layers"]] == [
        layer["digest"] for layer in source["layers"]]  # passed through, blobs unchanged
    for layer in annotated["layers"]:
        entry = prefetch.for_digest(layer["annotations"][CHUNK_DIGEST])
        if entry is None:
            assert ANNOTATION_PREFETCH not in layer["annotations"]
        else:
            assert parse_prefetch_annotation(layer["annotations"][ANNOTATION_PREFETCH],
                                             "x").chunks == entry.chunks

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    lazyfs.mount(carried, str(mountpoint), INSECURE, mountpoint=mountpoint)

    def replayed() -> bool:
        layers = layer_stats(lazyfs, mountpoint).values()
        return all(layer["background"]["state"] in ("done", "idle") for layer in layers)

    wait_until(replayed, "the carried lists to be replayed")
    listed = sorted(layer["background"]["listed_chunks"]
                    for layer in layer_stats(lazyfs, mountpoint).values())
    assert listed == sorted([len(entry.chunks) for entry in prefetch.layers]
                            + [0] * (len(annotated["layers"]) - len(prefetch.layers)))
    assert lazyfs.run("umount", str(mountpoint)).returncode == 0

    lazyfs.mount(carried, str(mountpoint), INSECURE, "--no-prefetch", mountpoint=mountpoint)
    assert all(layer["background"]["listed_chunks"] == 0
               for layer in layer_stats(lazyfs, mountpoint).values())
    assert lazyfs.run("umount", str(mountpoint)).returncode == 0


def test_convert_refuses_a_list_recorded_from_another_conversion(
    lazyfs: Lazyfs, busybox: PublishedImage, tmp_path: Path
) -> None:
    recorded = tmp_path / "start.json"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    lazyfs.mount(busybox.converted, str(mountpoint), INSECURE, "--record", str(recorded),
                 mountpoint=mountpoint)
    assert (mountpoint / "etc" / "hostname").read_bytes()
    assert lazyfs.run("umount", str(mountpoint)).returncode == 0
    assert parse_prefetch_list(recorded.read_bytes(), "x").layers
    # The default 4 MiB chunks make other chunk tables than the recorded 64 KiB ones.
    result = lazyfs.run("convert", busybox.original, "--prefetch", str(recorded), "--push",
                        f"{busybox.host}/test/busybox:other", INSECURE)
    assert result.returncode == 2
    assert f"{recorded}: recorded for other layers than those of the converted image" in (
        result.stderr)
    assert "Traceback" not in result.stderr
