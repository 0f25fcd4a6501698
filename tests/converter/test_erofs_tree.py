"""lazyfs's own EROFS reader: the tree it reads from a raw image is the one a kernel mount
shows (every aspect `converter.tree` compares), for mkfs.erofs's layouts and containerd's
images, without root; compressed and damaged images are refused with what is wrong."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from converter.erofs_tree import scan_erofs
from converter.mkfs import ErofsLayout, build_erofs
from converter.tar_extract import extract_layer
from converter.tree import compare_trees, scan_directory
from lazyfs.erofs.reader import ErofsError, ErofsUnsupportedError
from tests.converter import mounted_erofs, rich_layer

VECTORS = ("basic-noverity", "basic-verity-64k", "ctd-tar-whiteouts")


def _raw_image(blob: Path, out: Path) -> Path:
    reader = zstandard.ZstdDecompressor().stream_reader(blob.read_bytes(),
                                                        read_across_frames=True)
    out.write_bytes(reader.read())
    return out


@pytest.mark.parametrize("name", VECTORS)
def test_containerd_vectors_read_as_their_listing(vectors_dir: Path, tmp_path: Path,
                                                  name: str) -> None:
    tree = scan_erofs(_raw_image(vectors_dir / f"{name}.blob", tmp_path / "image.erofs"))
    listing = json.loads((vectors_dir / f"{name}.files.json").read_text())["files"]
    assert sorted(tree) == sorted([".", *(entry["path"] for entry in listing)])
    for entry in listing:
        found = tree[entry["path"]]
        assert (found.mode, found.uid, found.gid) == (
            int(entry["mode"], 8) & 0o7777, entry["uid"], entry["gid"]), entry
        if "sha256" in entry:
            assert (found.size, found.sha256) == (entry["size"], entry["sha256"]), entry
        if "target" in entry:
            assert found.link_target == entry["target"], entry


def test_containerd_whiteouts_opaque_dirs_hardlinks_and_xattrs(vectors_dir: Path,
                                                               tmp_path: Path) -> None:
    """What fsck.erofs 1.5's extraction loses, read from containerd's `--tar --aufs` image."""
    tree = scan_erofs(_raw_image(vectors_dir / "ctd-tar-whiteouts.blob", tmp_path / "i.erofs"))
    whiteouts = {path for path, entry in tree.items() if entry.kind == "chardev"}
    assert whiteouts and all(tree[path].rdev == (0, 0) for path in whiteouts)
    assert any(entry.xattrs.get("trusted.overlay.opaque") == b"y" for entry in tree.values())
    assert any(entry.inode_group is not None for entry in tree.values())
    assert any(name.startswith("user.") for entry in tree.values() for name in entry.xattrs)


@pytest.fixture(scope="module")
def rich_tree() -> Iterator[Path]:
    """rich_layer() extracted (owners, devices, xattrs: needs root)."""
    if os.geteuid() != 0:
        pytest.skip("extracting a layer with owners and devices needs root")
    with tempfile.TemporaryDirectory(prefix="lazyfs-test-") as work:
        tree = Path(work) / "tree"
        tree.mkdir()
        extract_layer(io.BytesIO(rich_layer().tar()), tree)
        yield tree


@pytest.mark.root
@pytest.mark.parametrize("layout", list(ErofsLayout))
def test_reads_what_a_kernel_mount_shows(rich_tree: Path, tmp_path: Path,
                                         layout: ErofsLayout) -> None:
    image = tmp_path / "image.erofs"
    build_erofs(rich_tree, image, layout=layout, reproducible=True)
    with mounted_erofs(image, tmp_path / "mnt") as mounted:
        expected = scan_directory(mounted)
    found = scan_erofs(image)
    assert compare_trees(expected, found) == []
    assert found["dev/big"].rdev == (4095, 1048575)
    assert found["bin/ping"].inode_group == "bin/ping"
    assert found["var"].xattrs["trusted.lazyfs.test"] == b"dir-xattr"


@pytest.mark.root
def test_many_entries_span_directory_blocks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    for number in range(600):
        (src / "dir" / f"file-with-a-longer-name-{number:04}").write_bytes(b"%d" % number)
    image = tmp_path / "image.erofs"
    build_erofs(src, image, layout=ErofsLayout.INTERLEAVED)
    found = scan_erofs(image)
    assert compare_trees(scan_directory(src), found, ignore=["owner"]) == []


@pytest.mark.root
def test_compressed_images_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"compressible " * 10_000)
    image = tmp_path / "image.erofs"
    build_erofs(src, image, compression="lz4hc")
    with pytest.raises(ErofsUnsupportedError, match="compressed"):
        scan_erofs(image)


def test_damaged_images_are_errors(vectors_dir: Path, tmp_path: Path) -> None:
    image = _raw_image(vectors_dir / "basic-noverity.blob", tmp_path / "image.erofs")
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])
    with pytest.raises(ErofsError, match="outside the"):
        scan_erofs(image)
    image.write_bytes(bytes(2048))
    with pytest.raises(ErofsError, match="not an EROFS image"):
        scan_erofs(image)
