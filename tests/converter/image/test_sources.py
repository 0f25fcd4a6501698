"""Image sources: OCI layouts, `docker save` archives (both forms), registries; detection by
content; every blob checked against its digest as it is read."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from converter.errors import ConvertError
from converter.image.oci_layout import LayoutError
from converter.image.sources import (
    DOCKER_LAYER_TAR,
    DockerArchiveSource,
    ImageSource,
    LayoutSource,
    RegistrySource,
    is_image_source,
    open_image_source,
)
from lazyfs.fetch.registry import DigestMismatchError, NotFoundError, UnauthorizedError
from lazyfs.fetch.registry_auth import Credentials
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format import oci
from tests.support.images import (
    BUSYBOX,
    base_layer,
    busybox_layers,
    docker_archive,
    docker_oci_archive,
    sha256,
    skopeo_push,
    write_index_image,
    write_oci_image,
)
from tests.support.registry import Registry, htpasswd_auth, running_registry


def _read_all(source: ImageSource, tmp_path: Path) -> tuple[oci.Manifest, list[bytes]]:
    """root -> manifest -> config -> every layer, through the source's own checks."""

    tmp_path.mkdir(exist_ok=True)

    async def main() -> tuple[oci.Manifest, list[bytes]]:
        async with source:
            root = await source.root()
            manifest = oci.parse_manifest(root.data, root.media_type)
            await source.read_blob(manifest.config, "config")
            blobs = []
            for number, layer in enumerate(manifest.layers):
                dest = tmp_path / f"layer-{number}"
                await source.fetch_blob(layer, dest)
                blobs.append(dest.read_bytes())
            return manifest, blobs

    return trio.run(main)


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.partition(":")[2]


# --- OCI layouts -------------------------------------------------------------------------------


def test_layout_by_tag_and_alone(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    for src in (f"{image.layout}:v1", str(image.layout)):
        source = open_image_source(src)
        assert isinstance(source, LayoutSource)
        _, blobs = _read_all(source, tmp_path / src[-2:])
        assert [gzip.decompress(b) for b in blobs] == image.layers["linux/amd64"]
        assert trio.run(source.root).tag == "v1"


def test_layout_missing_tag_and_ambiguous_layout(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    write_oci_image(image.layout, "v2")
    with pytest.raises(LayoutError, match=r"no image named 'nope' \(available: v1, v2\)"):
        trio.run(open_image_source(f"{image.layout}:nope").root)
    with pytest.raises(LayoutError, match=r"holds 2 images; name one as PATH:NAME"):
        trio.run(open_image_source(str(image.layout)).root)


def test_layout_manifest_digest_mismatch(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    path = _blob(image.layout, image.digest)
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion": 3'))
    with pytest.raises(LayoutError, match=f"content has digest sha256:.*, expected {image.digest}"):
        trio.run(open_image_source(f"{image.layout}:v1").root)


def test_layout_corrupt_layer_is_refused(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    manifest = json.loads(_blob(image.layout, image.digest).read_bytes())
    layer = _blob(image.layout, manifest["layers"][0]["digest"])
    data = bytearray(layer.read_bytes())
    data[100] ^= 1
    layer.write_bytes(bytes(data))
    with pytest.raises(LayoutError, match=r"content has digest .*, expected"):
        _read_all(open_image_source(str(image.layout)), tmp_path)
    assert not (tmp_path / "layer-0").exists()  # no partial file left behind


def test_layout_unsupported_version(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    (image.layout / "oci-layout").write_text('{"imageLayoutVersion":"2.0.0"}')
    with pytest.raises(LayoutError, match=r"unsupported imageLayoutVersion '2\.0\.0'"):
        trio.run(open_image_source(str(image.layout)).root)


# --- docker save archives ----------------------------------------------------------------------


def test_docker_archive_legacy_with_linked_duplicate(tmp_path: Path) -> None:
    layers = [*busybox_layers(), base_layer()]  # the third repeats the first: a symlink
    archive = docker_archive(tmp_path / "image.tar", layers, "lazyfs/test:v1")
    for number, src in enumerate((str(archive), f"{archive}:lazyfs/test:v1", f"{archive}:v1")):
        source = open_image_source(src)
        assert isinstance(source, DockerArchiveSource)
        manifest, blobs = _read_all(source, tmp_path / str(number))
        assert blobs == layers
        assert [layer.digest for layer in manifest.layers] == [sha256(x) for x in layers]
        assert {layer.media_type for layer in manifest.layers} == {DOCKER_LAYER_TAR}
    with pytest.raises(LayoutError, match=r"no image named 'other' \(available: lazyfs/test:v1"):
        trio.run(open_image_source(f"{archive}:other").root)


def test_docker_archive_layer_checked_against_diff_id(tmp_path: Path) -> None:
    layers = busybox_layers()
    wrong = [layers[0], layers[1].replace(b"changed", b"chanGed")]
    good = docker_archive(tmp_path / "good.tar", layers)
    bad = tmp_path / "bad.tar"
    # Same config (diff IDs of the good layers), other layer bytes.
    data = good.read_bytes().replace(layers[1], wrong[1])
    bad.write_bytes(data)
    with pytest.raises(LayoutError, match=f"expected {sha256(layers[1])}"):
        _read_all(open_image_source(str(bad)), tmp_path)


def test_docker_archive_oci_form_and_compressed(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    archive = docker_oci_archive(tmp_path / "new.tar", image)
    source = open_image_source(str(archive))
    assert isinstance(source, LayoutSource)
    _, blobs = _read_all(source, tmp_path / "a")
    assert [gzip.decompress(b) for b in blobs] == image.layers["linux/amd64"]

    legacy = docker_archive(tmp_path / "old.tar", busybox_layers())
    packed = tmp_path / "old.tar.gz"
    packed.write_bytes(gzip.compress(legacy.read_bytes()))
    assert is_image_source(str(packed))
    source = open_image_source(str(packed))
    _, blobs = _read_all(source, tmp_path / "b")
    assert blobs == busybox_layers()


# --- telling what SRC is -----------------------------------------------------------------------


def test_detection_by_content(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "layout", "v1")
    layer_dir = tmp_path / "rootfs"
    layer_dir.mkdir()
    (layer_dir / "manifest.json").write_text("[]")
    named_like_archive = tmp_path / "docker-save.tar"  # a layer, whatever its name says
    named_like_archive.write_bytes(base_layer())
    gz_layer = tmp_path / "layer.tar.gz"
    gz_layer.write_bytes(gzip.compress(base_layer()))
    lone = tmp_path / "lone.tar"  # a layer with a manifest.json among its files
    with tarfile.open(lone, "w") as tar:
        tar.add(layer_dir / "manifest.json", "manifest.json")
        tar.add(BUSYBOX, "bin/busybox")
    archive = docker_archive(tmp_path / "archive", busybox_layers())  # no .tar suffix

    assert is_image_source(str(image.layout))
    assert is_image_source(f"{image.layout}:v1")
    assert is_image_source(str(archive))
    assert is_image_source("127.0.0.1:5000/team/app:v1")
    assert is_image_source("127.0.0.1:5000/team/app@sha256:" + "a" * 64)
    assert not is_image_source(str(layer_dir))
    assert not is_image_source(str(named_like_archive))
    assert not is_image_source(str(gz_layer))
    assert not is_image_source(str(lone))
    assert not is_image_source(str(tmp_path / "Not A Reference"))
    with pytest.raises(ConvertError, match="not an OCI layout directory or image archive"):
        open_image_source(str(named_like_archive))
    with pytest.raises(ConvertError, match="no such file or directory, and not an image ref"):
        open_image_source(str(tmp_path / "missing") + "/Bad")


def test_reference_without_registry_hints_at_missing_file() -> None:
    source = open_image_source("no-such-layer.tar")
    assert isinstance(source, RegistrySource)
    assert str(source.reference) == "docker.io/library/no-such-layer.tar:latest"
    assert "no file or directory named 'no-such-layer.tar'" in source._hint


# --- registries --------------------------------------------------------------------------------

USERS = {"alice": "wonderland"}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as server:
        yield server


@pytest.mark.network
def test_registry_source_reads_and_checks(registry: Registry, tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    skopeo_push(image.layout, "v1", registry.host, "team/app:v1")
    options = RegistryOptions(insecure=True)
    source = open_image_source(f"{registry.host}/team/app:v1", options)
    assert isinstance(source, RegistrySource)
    _, blobs = _read_all(source, tmp_path / "a")
    assert [gzip.decompress(b) for b in blobs] == image.layers["linux/amd64"]

    with pytest.raises(NotFoundError, match="manifest team/app:nope not found"):
        trio.run(open_image_source(f"{registry.host}/team/app:nope", options).root)

    # The registry serves bytes that no longer hash to the digest asked for.
    digest = trio.run(open_image_source(f"{registry.host}/team/app:v1", options).root).digest
    hexdigest = digest.partition(":")[2]
    stored = next((registry.root / "data").rglob(f"blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"))
    stored.write_bytes(stored.read_bytes() + b" ")
    with pytest.raises(DigestMismatchError, match=f"expected {digest}"):
        trio.run(open_image_source(f"{registry.host}/team/app@{digest}", options).root)


@pytest.mark.network
def test_registry_wrong_credentials(tmp_path: Path) -> None:
    auth = htpasswd_auth(tmp_path / "auth", USERS)
    with running_registry(tmp_path / "registry", auth) as registry:
        image = write_oci_image(tmp_path / "src", "v1")
        skopeo_push(image.layout, "v1", registry.host, "team/app:v1",
                    creds=f"alice:{USERS['alice']}")
        wrong = RegistryOptions(Credentials("alice", "nope"), insecure=True)
        with pytest.raises(UnauthorizedError, match="credentials of user 'alice' were refused"):
            trio.run(open_image_source(f"{registry.host}/team/app:v1", wrong).root)
        right = RegistryOptions(Credentials("alice", USERS["alice"]), insecure=True)
        assert trio.run(open_image_source(f"{registry.host}/team/app:v1", right).root).tag == "v1"


def test_index_source_lists_platforms(tmp_path: Path) -> None:
    image = write_index_image(tmp_path / "src", "multi")
    root = trio.run(open_image_source(f"{image.layout}:multi").root)
    index = oci.parse_index(root.data, root.media_type)
    assert [str(d.platform) for d in index.manifests] == ["linux/amd64", "linux/arm64"]
    assert root.digest == image.digest == "sha256:" + hashlib.sha256(root.data).hexdigest()
