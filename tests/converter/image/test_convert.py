"""Whole-image conversion: layouts, docker archives and registries in; layouts and registries
out. Converted layers are checked by format, by digest and by the tree their image holds."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard

from converter.errors import ConvertError
from converter.image.convert import ImageConvertResult, convert_image, new_config
from converter.image.oci_layout import LayoutError
from converter.image.sources import open_image_source
from converter.layer import ConvertOptions, convert_layer
from converter.mkfs import build_erofs
from converter.tree import compare_trees, scan_directory, scan_tar
from lazyfs.eager.check import unpack_blob
from lazyfs.eager.locate import read_metadata
from lazyfs.fetch.registry import UnauthorizedError
from lazyfs.fetch.registry_auth import Credentials
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format import oci
from lazyfs.format.descriptor import LABEL_UNCOMPRESSED, Descriptor, descriptor_from_dict
from lazyfs.format.platform import parse_platform
from tests.converter import mounted_erofs
from tests.support.images import (
    base_layer,
    busybox_layers,
    docker_archive,
    docker_oci_archive,
    expected_rootfs_tree,
    sha256,
    skopeo_push,
    write_image_blobs,
    write_index_image,
    write_oci_image,
)
from tests.support.registry import Registry, htpasswd_auth, running_registry

pytestmark = pytest.mark.root  # tar extraction keeps owners and device nodes; checks mount
SEEKABLE_KEYS = {
    "dev.containerd.erofs.zstd.chunk_table_offset",
    "dev.containerd.erofs.zstd.chunk_digest",
    "dev.containerd.erofs.dmverity.offset",
    "dev.containerd.erofs.dmverity.root_digest",
}


def _convert(src: str, registry: RegistryOptions | None = None,
             **kwargs: Any) -> tuple[ImageConvertResult, list[str]]:
    lines: list[str] = []

    async def main() -> ImageConvertResult:
        async with open_image_source(src, registry) as source:
            return await convert_image(source, progress=lines.append, **kwargs)

    return trio.run(main), lines


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.partition(":")[2]


def _json(layout: Path, digest: str) -> Any:
    return json.loads(_blob(layout, digest).read_bytes())


def _image(layout: Path, tag: str) -> tuple[Descriptor, Any]:
    """The index.json entry named `tag` and the JSON it points at."""
    index = json.loads((layout / "index.json").read_bytes())
    found = [e for e in index["manifests"]
             if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    assert len(found) == 1, index
    entry = descriptor_from_dict(found[0])
    return entry, _json(layout, entry.digest)


def _check_layer(blob: Path, descriptor: dict[str, Any], source_tar: bytes | None,
                 work: Path) -> str:
    """The blob passes the format checks and a full eager check against its descriptor, and
    its image holds the tree the source layer means. Returns the raw image's digest."""
    assert descriptor["mediaType"] == oci.EROFS_LAYER_ZSTD
    assert set(descriptor["annotations"]) >= SEEKABLE_KEYS
    layer = Descriptor(descriptor["mediaType"], descriptor["digest"], descriptor["size"],
                       annotations=dict(descriptor["annotations"]))
    with open(blob, "rb") as f:
        metadata = read_metadata(f, blob.stat().st_size, layer.seekable())
    assert metadata.verity is not None and metadata.root is not None
    raw = work / (descriptor["digest"].partition(":")[2] + ".erofs")
    report = unpack_blob(blob, raw, layer)
    assert report.ok and report.authenticated, report.problems
    assert report.image_digest is not None
    if source_tar is not None:
        with mounted_erofs(raw, work / "mnt") as mountpoint:
            problems = compare_trees(scan_tar(io.BytesIO(source_tar)), scan_directory(mountpoint))
        assert problems == []
    return report.image_digest


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    return subprocess.run(["skopeo", "--insecure-policy", *args], check=True,
                          capture_output=True, text=True, timeout=120)


# --- OCI layout and docker archives into a layout ----------------------------------------------


def test_layout_to_layout(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    out = tmp_path / "out"
    result, lines = _convert(f"{image.layout}:v1", dest_layout=out)
    assert (result.tag, result.media_type, result.layout) == ("v1", oci.OCI_MANIFEST, out)
    assert [outcome.action for outcome in result.layers] == ["converted", "converted"]
    assert sum("converted to" in line for line in lines) == 2
    assert not list(out.glob(".lazyfs-convert-*"))  # temporary space is gone

    entry, manifest = _image(out, "v1")
    assert (entry.media_type, entry.digest) == (oci.OCI_MANIFEST, result.digest)
    assert manifest["mediaType"] == oci.OCI_MANIFEST
    assert manifest["config"]["mediaType"] == oci.OCI_CONFIG
    source_config = json.loads(_blob(image.layout, json.loads(
        _blob(image.layout, image.digest).read_bytes())["config"]["digest"]).read_bytes())
    config = _json(out, manifest["config"]["digest"])

    diff_ids = [_check_layer(_blob(out, layer["digest"]), layer, tar, tmp_path)
                for layer, tar in zip(manifest["layers"], image.layers["linux/amd64"],
                                      strict=True)]
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    assert config["history"] == source_config["history"]
    assert "Image" not in config["config"] and config["config"]["Cmd"] == ["/bin/sh"]
    assert set(config) == set(source_config)  # no "os.features" added, as containerd adds none
    assert (config["os"], config["architecture"]) == ("linux", "amd64")

    # Another OCI tool reads what we wrote.
    inspected = json.loads(_skopeo("inspect", f"oci:{out}:v1").stdout)
    assert inspected["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    _skopeo("copy", f"oci:{out}:v1", f"oci:{tmp_path / 'copy'}:v1")


@pytest.mark.parametrize("form", ["legacy", "oci"])
def test_docker_archive_to_layout_converts_identical_layers_once(tmp_path: Path,
                                                                 form: str) -> None:
    layers = [*busybox_layers(), base_layer()]
    if form == "legacy":
        archive = docker_archive(tmp_path / "image.tar", layers, "lazyfs/test:v1")
    else:
        archive = docker_oci_archive(tmp_path / "image.tar",
                                     write_oci_image(tmp_path / "src", "v1", layers))
    out = tmp_path / "out"
    result, lines = _convert(str(archive), dest_layout=out)
    assert len(result.layers) == 2  # the repeated layer was converted once
    assert sum("converted to" in line for line in lines) == 2
    _, manifest = _image(out, "v1")
    digests = [layer["digest"] for layer in manifest["layers"]]
    assert digests[0] == digests[2] != digests[1]
    config = _json(out, manifest["config"]["digest"])
    ids = config["rootfs"]["diff_ids"]
    assert ids[0] == ids[2] != ids[1]
    for layer, tar in zip(manifest["layers"][:2], layers, strict=False):
        assert _check_layer(_blob(out, layer["digest"]), layer, tar, tmp_path) in ids


def test_platform_filter_on_two_platform_index(tmp_path: Path) -> None:
    image = write_index_image(tmp_path / "src", "multi")
    result, _ = _convert(f"{image.layout}:multi", dest_layout=tmp_path / "arm",
                         platform=parse_platform("linux/arm64"))
    assert len(result.layers) == 2
    entry, index = _image(tmp_path / "arm", "multi")
    assert entry.media_type == oci.OCI_INDEX
    assert [m["platform"] for m in index["manifests"]] == [{"architecture": "arm64", "os": "linux"}]
    manifest = _json(tmp_path / "arm", index["manifests"][0]["digest"])
    arm_tars = image.layers["linux/arm64"]
    for layer, tar in zip(manifest["layers"], arm_tars, strict=True):
        _check_layer(_blob(tmp_path / "arm", layer["digest"]), layer, tar, tmp_path)

    result, _ = _convert(f"{image.layout}:multi", dest_layout=tmp_path / "all")
    assert len(result.layers) == 3  # the base layer both platforms share: once
    _, index = _image(tmp_path / "all", "multi")
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    amd, arm = (_json(tmp_path / "all", m["digest"]) for m in index["manifests"])
    assert amd["layers"][0] == arm["layers"][0] and amd["layers"][1] != arm["layers"][1]

    with pytest.raises(ConvertError, match=r"no image for platform linux/s390x in the index "
                                           r"\(available: linux/amd64, linux/arm64\)"):
        _convert(f"{image.layout}:multi", dest_layout=tmp_path / "none",
                 platform=parse_platform("linux/s390x"))
    assert not (tmp_path / "none").exists()


def test_index_keeps_the_source_platforms_and_configs(tmp_path: Path) -> None:
    """No "erofs" OS feature is added (containerd's converter adds none for seekable layers,
    and its platform matcher then finds no entry): each platform and config's own fields
    stay exactly as the source wrote them."""
    image = write_index_image(
        tmp_path / "src", "multi",
        {"linux/amd64": busybox_layers(), "linux/arm/v7": busybox_layers("-arm")},
        {"linux/amd64": {"os.version": "12", "os.features": ["sse4"]}})
    result, _ = _convert(f"{image.layout}:multi", dest_layout=tmp_path / "out")
    _, index = _image(tmp_path / "out", "multi")
    source_index = _json(image.layout, image.digest)
    assert [m["platform"] for m in index["manifests"]] == [
        m["platform"] for m in source_index["manifests"]]
    assert index["manifests"][0]["platform"]["os.features"] == ["sse4"]
    assert "os.features" not in index["manifests"][1]["platform"]
    for new, old in zip(index["manifests"], source_index["manifests"], strict=True):
        config = _json(tmp_path / "out", _json(tmp_path / "out", new["digest"])["config"]["digest"])
        source_config = _json(image.layout, _json(image.layout, old["digest"])["config"]["digest"])
        changed = {"rootfs", "config"}  # the new diff IDs; the legacy config.Image id goes
        assert {k: v for k, v in config.items() if k not in changed} == {
            k: v for k, v in source_config.items() if k not in changed}
    assert result.media_type == oci.OCI_INDEX


def test_every_tar_compression_and_media_type(tmp_path: Path) -> None:
    base, change = busybox_layers()
    third = busybox_layers("-3")[1]
    # A digest of the old content, as some tools put it in manifests: wrong once converted.
    stale = {"org.example.kept": "yes", LABEL_UNCOMPRESSED: sha256(change)}
    layers = [(oci.OCI_LAYER_ZSTD, zstandard.ZstdCompressor().compress(base), {}),
              (oci.OCI_LAYER_TAR, change, stale),
              (oci.DOCKER_LAYER_GZIP, gzip.compress(third, mtime=0), {})]
    image = write_image_blobs(tmp_path / "src", "v1", layers,
                              [sha256(t) for t in (base, change, third)])
    out = tmp_path / "out"
    result, _ = _convert(str(image.layout), dest_layout=out)
    assert [o.action for o in result.layers] == ["converted"] * 3
    _, manifest = _image(out, "v1")
    assert manifest["layers"][1]["annotations"]["org.example.kept"] == "yes"
    assert not any(LABEL_UNCOMPRESSED in layer["annotations"] for layer in manifest["layers"])
    for layer, tar in zip(manifest["layers"], (base, change, third), strict=True):
        _check_layer(_blob(out, layer["digest"]), layer, tar, tmp_path)


def test_config_that_does_not_fit_the_manifest(tmp_path: Path) -> None:
    base = busybox_layers()[0]
    image = write_image_blobs(tmp_path / "src", "v1",
                              [(oci.OCI_LAYER_TAR, base, {})], [sha256(base), sha256(b"")])
    with pytest.raises(ConvertError, match=r"rootfs.diff_ids do not match the 1 layers"):
        _convert(str(image.layout), dest_layout=tmp_path / "out")


def test_raw_erofs_wrapped_and_seekable_passed_through(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "raw.txt").write_text("raw erofs layer\n")
    raw = tmp_path / "raw.erofs"
    build_erofs(tree, raw, reproducible=True)
    change = tmp_path / "change.tar"
    change.write_bytes(busybox_layers()[1])
    seekable = convert_layer(change, tmp_path / "change.blob")
    # The local descriptor keeps the raw image's digest (verify and inspect read it); older
    # conversions carried it into manifests too: read as any other, and left out here.
    assert seekable.descriptor.annotations[LABEL_UNCOMPRESSED] == seekable.encoded.image_digest
    raw_bytes = raw.read_bytes()
    image = write_image_blobs(
        tmp_path / "src", "v1",
        [(oci.EROFS_LAYER, raw_bytes, {"org.example.note": "kept"}),
         (oci.EROFS_LAYER_ZSTD, seekable.blob_path.read_bytes(),
          dict(seekable.descriptor.annotations))],
        [sha256(raw_bytes), seekable.encoded.image_digest],
    )
    out = tmp_path / "out"
    result, _ = _convert(str(image.layout), dest_layout=out)
    assert [o.action for o in result.layers] == ["wrapped", "passed"]
    _, manifest = _image(out, "v1")
    wrapped, passed = manifest["layers"]
    assert wrapped["annotations"]["org.example.note"] == "kept"
    assert passed["digest"] == seekable.descriptor.digest
    assert passed["annotations"] == {k: v for k, v in seekable.descriptor.annotations.items()
                                     if k != LABEL_UNCOMPRESSED}
    assert LABEL_UNCOMPRESSED not in wrapped["annotations"]
    assert _check_layer(_blob(out, wrapped["digest"]), wrapped, None, tmp_path) == sha256(raw_bytes)
    config = _json(out, manifest["config"]["digest"])
    assert config["rootfs"]["diff_ids"] == [sha256(raw_bytes), seekable.encoded.image_digest]


def test_content_that_is_not_what_the_media_type_says(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    raw = tmp_path / "raw.erofs"
    build_erofs(tree, raw)
    image = write_image_blobs(tmp_path / "src", "v1",
                              [(oci.OCI_LAYER_GZIP, raw.read_bytes(), {})], ["sha256:" + "0" * 64])
    with pytest.raises(ConvertError, match=r"layer 1/1 sha256:[0-9a-f]{12}: media type "
                                           r"application/vnd.oci.image.layer.v1.tar\+gzip, "
                                           r"but the content is erofs"):
        _convert(str(image.layout), dest_layout=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_layout_rules(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    out = tmp_path / "out"
    first, _ = _convert(str(image.layout), dest_layout=out)
    with pytest.raises(ConvertError, match="already has an image named 'v1'"):
        _convert(str(image.layout), dest_layout=out)
    second, _ = _convert(str(image.layout), dest_layout=out, dest_tag="v2")
    assert _image(out, "v1")[0].digest == first.digest
    assert _image(out, "v2")[0].digest == second.digest
    third, _ = _convert(str(image.layout), dest_layout=out, overwrite=True)
    assert _image(out, "v1")[0].digest == third.digest != first.digest

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LayoutError, match="is not empty and is not an OCI layout"):
        _convert(str(image.layout), dest_layout=busy)
    assert os.listdir(busy) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _convert(str(image.layout), dest_layout=empty)
    assert _image(empty, "v1")


def test_failure_leaves_an_existing_layout_as_it_was(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    out = tmp_path / "out"
    _convert(str(image.layout), dest_layout=out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    manifest = _json(image.layout, image.digest)
    broken = _blob(image.layout, manifest["layers"][1]["digest"])
    data = broken.read_bytes()
    broken.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(LayoutError, match="content has digest"):
        _convert(str(image.layout), dest_layout=out, dest_tag="v2")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(LayoutError, match="content has digest"):
        _convert(str(image.layout), dest_layout=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_bad_push_destination_and_nothing_to_write(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    with pytest.raises(ConvertError, match="give a tag to push to, not a digest"):
        _convert(str(image.layout), push="127.0.0.1:1/a/b@sha256:" + "0" * 64)
    with pytest.raises(ConvertError, match="nothing to write"):
        _convert(str(image.layout))


def test_new_config_follows_containerd() -> None:
    config = {"architecture": "amd64", "os": "linux", "config": {"Image": "x", "Cmd": ["sh"]},
              "container_config": {"Image": "y"}, "rootfs": {"type": "layers",
                                                            "diff_ids": ["a", "b"]},
              "history": [{"created_by": "1"}], "os.features": ["win32k"]}
    out = new_config(config, ["c", "b"])
    assert out["rootfs"]["diff_ids"] == ["c", "b"]
    assert out["config"] == {"Cmd": ["sh"]} and out["container_config"] == {}
    assert out["os.features"] == ["win32k"]  # as it was: containerd stamps no "erofs" here
    assert list(out) == list(config)  # key order kept
    assert config["rootfs"]["diff_ids"] == ["a", "b"]  # the input is not modified
    unchanged = new_config(config, ["a", "b"])
    assert unchanged["config"]["Image"] == "x"  # legacy ids go only when diff_ids change
    del config["os.features"]
    assert "os.features" not in new_config(config, ["c", "b"])


# --- registries --------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as server:
        yield server


@pytest.mark.network
def test_registry_to_registry_push(registry: Registry, tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    skopeo_push(image.layout, "v1", registry.host, "team/app:v1")
    options = RegistryOptions(insecure=True)
    target = f"{registry.host}/team/app-erofs:v1"
    reproducible = ConvertOptions(reproducible=True)
    result, lines = _convert(f"{registry.host}/team/app:v1", options, push=target,
                             push_registry=options, layer_options=reproducible)
    assert result.pushed == target
    assert not any("already" in line for line in lines)

    raw = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false",
                             f"docker://{target}").stdout)
    inspected = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{target}").stdout)
    assert inspected["Digest"] == result.digest
    assert inspected["Layers"] == [layer["digest"] for layer in raw["layers"]]
    assert {layer["mediaType"] for layer in raw["layers"]} == {oci.EROFS_LAYER_ZSTD}
    copy = tmp_path / "copy"
    _skopeo("copy", "--src-tls-verify=false", f"docker://{target}", f"oci:{copy}:v1")
    for layer, tar in zip(raw["layers"], image.layers["linux/amd64"], strict=True):
        _check_layer(_blob(copy, layer["digest"]), layer, tar, tmp_path)

    # Again, reproducibly: the same blobs, found in the registry and not uploaded twice.
    again, lines = _convert(f"{registry.host}/team/app:v1", options, push=target,
                            push_registry=options, layer_options=reproducible)
    assert again.digest == result.digest
    assert sum("already" in line for line in lines) == 2


@pytest.mark.network
def test_push_with_wrong_credentials(tmp_path: Path) -> None:
    auth = htpasswd_auth(tmp_path / "auth", {"alice": "wonderland"})
    image = write_oci_image(tmp_path / "src", "v1")
    with running_registry(tmp_path / "registry", auth) as registry:
        wrong = RegistryOptions(Credentials("alice", "nope"), insecure=True)
        with pytest.raises(UnauthorizedError, match="credentials of user 'alice' were refused"):
            _convert(str(image.layout), push=f"{registry.host}/team/app:v1",
                     push_registry=wrong)


# --- what a mount of the converted image shows ------------------------------------------------


def test_expected_rootfs_tree_semantics() -> None:
    tree = expected_rootfs_tree(busybox_layers())
    assert tree["etc/hostname"].size == len(b"changed\n")
    assert "etc/os-release" not in tree and "bin/cat" not in tree
    assert tree["etc/os-release.link"].inode_group is None  # its other name was deleted
    assert "var/log" not in tree and "var/log/old.log" not in tree
    assert sorted(p for p in tree if p.startswith("var/cache/app/")) == [
        "var/cache/app/fresh.txt"]
    assert tree["var/cache/app"].mode == 0o700 and not tree["var/cache/app"].xattrs
    assert tree["bin/sh"].link_target == "busybox"
    assert tree["tmp"].mode == 0o1777 and tree["tmp/scratch"].mode == 0o666
    # A directory a layer only implies keeps its lower attributes; an explicit one replaces
    # them; a file over a directory replaces the whole subtree.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as upper:
        for name, kind, mode in (("root/.hushlogin", tarfile.REGTYPE, 0o600),
                                 ("home", tarfile.DIRTYPE, 0o711),
                                 ("var", tarfile.REGTYPE, 0o644)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode
            upper.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    tree = expected_rootfs_tree([busybox_layers()[0], buffer.getvalue()])
    assert tree["root"].mode == 0o700 and tree["home"].mode == 0o711
    assert tree["var"].kind == "file" and not any(p.startswith("var/") for p in tree)
    assert tree["home/user/.profile"].uid == 1000


@contextlib.contextmanager
def _overlay(lowers: list[Path], mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir()
    lowerdir = ":".join(str(p) for p in reversed(lowers))  # the top layer first
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}",
                    str(mountpoint)], check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)


def test_overlay_of_converted_layers_shows_the_image(tmp_path: Path) -> None:
    image = write_oci_image(tmp_path / "src", "v1")
    out = tmp_path / "out"
    _convert(str(image.layout), dest_layout=out)
    _, manifest = _image(out, "v1")
    with contextlib.ExitStack() as stack:
        lowers = []
        for number, layer in enumerate(manifest["layers"]):
            descriptor = Descriptor(layer["mediaType"], layer["digest"], layer["size"],
                                    annotations=layer["annotations"])
            raw = tmp_path / f"{number}.erofs"
            unpack_blob(_blob(out, layer["digest"]), raw, descriptor)
            lowers.append(stack.enter_context(mounted_erofs(raw, tmp_path / f"l{number}")))
        merged = stack.enter_context(_overlay(lowers, tmp_path / "merged"))
        problems = compare_trees(expected_rootfs_tree(image.layers["linux/amd64"]),
                                 scan_directory(merged))
    assert problems == []
