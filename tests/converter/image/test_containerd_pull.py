"""What containerd itself makes of an image `lazyfs convert` pushed: Debian's containerd (1.6)
pulls it with `ctr images pull` as it pulls any image. 1.6 cannot unpack EROFS layers itself
(that is the snapshotter's work), so what is checked is the pull: which content arrives."""

from __future__ import annotations

import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from converter.image.convert import convert_image
from converter.image.sources import open_image_source
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format import oci
from lazyfs.format.descriptor import LABEL_UNCOMPRESSED
from lazyfs.format.platform import Platform
from tests.support.containerd import running_containerd
from tests.support.images import write_index_image
from tests.support.registry import Registry, running_registry

pytestmark = [pytest.mark.root, pytest.mark.network]
# containerd 1.6 fetches every layer, then finds no stream processor to apply an EROFS one.
UNPACK_REFUSED = "no processor for media-type"


@pytest.fixture
def work() -> Iterator[Path]:
    # Short: containerd's socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="lzp-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def registry(work: Path) -> Iterator[Registry]:
    with running_registry(work / "registry") as server:
        yield server


def _get(registry: Registry, path: str, media_type: str) -> bytes:
    request = urllib.request.Request(f"{registry.url}/v2/{path}", headers={"Accept": media_type})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()  # type: ignore[no-any-return]


def test_ctr_pull_fetches_the_host_platform_of_a_converted_index(work: Path,
                                                                  registry: Registry) -> None:
    image = write_index_image(work / "src", "multi")  # linux/amd64 and linux/arm64
    reference = f"{registry.host}/app:multi-erofs"

    async def convert() -> None:
        async with open_image_source(f"{image.layout}:multi") as source:
            await convert_image(source, push=reference, progress=lambda line: None,
                                push_registry=RegistryOptions(insecure=True))

    trio.run(convert)
    index = oci.parse_index(_get(registry, "app/manifests/multi-erofs", oci.OCI_INDEX))
    try:
        entry = index.select(Platform("linux", os.uname().machine))
    except oci.PlatformNotFoundError as exc:
        pytest.skip(f"the test image is not for this machine: {exc}")
    manifest = oci.parse_manifest(_get(registry, f"app/manifests/{entry.digest}",
                                       oci.OCI_MANIFEST))
    layers = [layer.digest for layer in manifest.layers]
    # As containerd's own converter: the raw image's digest is a content label, not in here.
    assert not any(LABEL_UNCOMPRESSED in layer.annotations for layer in manifest.layers)

    with running_containerd(work / "c") as containerd:
        pulled = containerd.ctr("images", "pull", "--plain-http", reference, check=False)
        content = set(containerd.ctr("content", "ls", "-q").stdout.split())
        checked = containerd.ctr("images", "check").stdout

    assert "no match for platform" not in pulled.stderr, pulled.stderr
    assert pulled.returncode == 0 or UNPACK_REFUSED in pulled.stderr, pulled.stderr
    # The host's manifest, its config and every layer: the whole platform, and only it.
    host_content = {entry.digest, manifest.config.digest, *layers}
    assert host_content <= content, (host_content - content, pulled.stdout, pulled.stderr)
    assert not {e.digest for e in index.manifests if e is not entry} & content
    assert f"complete ({len(layers) + 1}/{len(layers) + 1})" in checked, checked
