"""mkfs.erofs and fsck.erofs as the converter runs them, checked against the tree model."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.errors import ConvertError
from converter.mkfs import (
    REPRODUCIBLE_UUID,
    ErofsLayout,
    build_erofs,
    erofs_tool_version,
    file_data_bytes,
    fsck_erofs,
    newest_mtime,
)
from converter.source import SourceKind, detect_source
from converter.tar_extract import extract_layer
from converter.tree import TreeEntry, compare_trees, scan_directory, scan_tar
from tests.converter import BASE_MTIME, LayerBuilder, mounted_erofs, rich_layer

SUPERBLOCK = 1024


@pytest.fixture(autouse=True)
def _no_epoch_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """mkfs.erofs reads SOURCE_DATE_EPOCH: tests set it themselves when they want it."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def _superblock(image: Path) -> tuple[int, bytes]:
    """(build time, UUID bytes) from an EROFS superblock."""
    with open(image, "rb") as f:
        f.seek(SUPERBLOCK)
        sb = f.read(128)
    assert sb[:4] == bytes.fromhex("e2e1f5e0")
    (build_time,) = struct.unpack_from("<Q", sb, 24)
    return build_time, sb[48:64]


def _plain_tree(root: Path) -> Path:
    """A small tree any user can create, with fixed mtimes."""
    root.mkdir()
    (root / "dir").mkdir()
    (root / "dir/file").write_bytes(b"hello " * 5000)
    (root / "other").write_bytes(os.urandom(70000))
    os.symlink("dir/file", root / "link")
    for path in (root / "dir/file", root / "other", root / "link", root / "dir", root):
        os.utime(path, (BASE_MTIME, BASE_MTIME), follow_symlinks=False)
    return root


CHUNKED_FILE = 0x4  # EROFS feature_incompat: chunk-based files


def _incompat_features(image: Path) -> int:
    with open(image, "rb") as f:
        f.seek(SUPERBLOCK + 80)
        (features,) = struct.unpack("<I", f.read(4))
    return features  # type: ignore[no-any-return]


@pytest.mark.parametrize(("compression", "layout", "extra", "chunked"), [
    (None, None, (), True),  # the default: metadata first
    (None, ErofsLayout.METADATA_FIRST, (), True),
    (None, ErofsLayout.INTERLEAVED, (), False),
    ("lz4hc,12", None, (), False),  # compressed files cannot be chunk-based
    (None, ErofsLayout.INTERLEAVED, ("--chunksize=8192",), True),  # the caller's own wins
])
def test_layouts(tmp_path: Path, compression: str | None, layout: ErofsLayout | None,
                 extra: tuple[str, ...], chunked: bool) -> None:
    image = tmp_path / "layer.erofs"
    build_erofs(_plain_tree(tmp_path / "src"), image, compression=compression, layout=layout,
                extra_opts=extra)
    fsck_erofs(image)
    assert bool(_incompat_features(image) & CHUNKED_FILE) is chunked


def test_metadata_first_cannot_be_compressed(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match=r"metadata-first.*interleaved"):
        build_erofs(_plain_tree(tmp_path / "src"), tmp_path / "img", compression="lz4hc",
                    layout=ErofsLayout.METADATA_FIRST)
    assert not (tmp_path / "img").exists()


def test_metadata_first_needs_room_in_the_staging_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """mkfs.erofs 1.5 stages the file data in /tmp: without room there, the default falls
    back to the interleaved layout and says so; an explicit request fails, naming sizes."""
    src = _plain_tree(tmp_path / "src")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=32 << 20))
    image = tmp_path / "default.erofs"
    build_erofs(src, image)
    fsck_erofs(image)
    assert not _incompat_features(image) & CHUNKED_FILE
    assert "the metadata-first layout needs 0 MiB in /tmp (mkfs.erofs 1.5 stages the file " \
        "data there" in caplog.text
    assert "which has 32 MiB free: building the interleaved layout instead" in caplog.text
    with pytest.raises(ConvertError, match="which has 32 MiB free: free space there"):
        build_erofs(src, tmp_path / "explicit.erofs", layout=ErofsLayout.METADATA_FIRST)
    assert not (tmp_path / "explicit.erofs").exists()


def test_metadata_first_needs_room_for_the_staged_data_and_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    monkeypatch.setattr("converter.mkfs._STAGING_SPARE_BYTES", 0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5 << 20))
    with pytest.raises(ConvertError, match=r"needs 6 MiB in /tmp .*which has 5 MiB free"):
        build_erofs(src, tmp_path / "img", layout=ErofsLayout.METADATA_FIRST)


@pytest.mark.root  # /dev/shm: a file system other than /tmp's on this machine
def test_metadata_first_image_for_another_file_system(tmp_path: Path) -> None:
    """1.5 fails (EIO) copying the staged data across file systems: such an image is built
    beside the staged data and copied, and nothing is left behind in either place."""
    if _same_file_system_as_tmp(Path("/dev/shm")):
        pytest.skip("/dev/shm is on /tmp's file system here")
    out_dir = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        image = out_dir / "layer.erofs"
        before = set(os.listdir("/tmp"))
        build_erofs(_plain_tree(tmp_path / "src"), image, layout=ErofsLayout.METADATA_FIRST)
        fsck_erofs(image)
        assert _incompat_features(image) & CHUNKED_FILE
        assert os.listdir(out_dir) == ["layer.erofs"]
        assert not [name for name in set(os.listdir("/tmp")) - before
                    if name.startswith(".lazyfs-mkfs.")]
    finally:
        shutil.rmtree(out_dir)


def _same_file_system_as_tmp(path: Path) -> bool:
    return os.stat(path).st_dev == os.stat("/tmp").st_dev


def test_file_data_bytes_counts_regular_files_in_whole_blocks(tmp_path: Path) -> None:
    src = _plain_tree(tmp_path / "src")  # 30000 and 70000 bytes, a symlink, a directory
    assert file_data_bytes(src, 4096) == 32768 + 73728


def test_tool_version() -> None:
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", erofs_tool_version())


@pytest.mark.parametrize("compression", [None, "lz4hc,12", "lz4"])
def test_build_and_check(tmp_path: Path, compression: str | None) -> None:
    src = _plain_tree(tmp_path / "src")
    image = tmp_path / "out" / "layer.erofs"
    image.parent.mkdir()
    build_erofs(src, image, compression=compression)
    assert detect_source(image) is SourceKind.EROFS_IMAGE
    assert sorted(p.name for p in image.parent.iterdir()) == ["layer.erofs"]
    fsck_erofs(image)
    if compression is not None:
        assert image.stat().st_size < 70000 + 30000 // 2  # "hello " repeats compress well


def test_mkfs_failure_reports_its_output(tmp_path: Path) -> None:
    src = _plain_tree(tmp_path / "src")
    image = tmp_path / "layer.erofs"
    with pytest.raises(ConvertError, match=r"mkfs.erofs of .* failed .*compressor"):
        build_erofs(src, image, compression="nosuchalgo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no image, no temporary


@pytest.mark.parametrize("bad", ["-d9", "lz4hc 12", "", "lz4hc,"])
def test_invalid_compression_spec(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConvertError, match="invalid EROFS compression"):
        build_erofs(_plain_tree(tmp_path / "src"), tmp_path / "x", compression=bad)


def test_extra_opts_come_last_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _plain_tree(tmp_path / "src")
    other_uuid = uuid.uuid4()
    build_erofs(src, tmp_path / "a", reproducible=True, extra_opts=[f"-U{other_uuid}"])
    assert _superblock(tmp_path / "a")[1] == other_uuid.bytes
    # An explicit -T wins, even over SOURCE_DATE_EPOCH in the environment.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "777")
    build_erofs(src, tmp_path / "b", reproducible=True, extra_opts=["-T", "12345"])
    assert _superblock(tmp_path / "b")[0] == 12345
    with pytest.raises(ConvertError, match="either as timestamp or as -T"):
        build_erofs(src, tmp_path / "c", extra_opts=["-T12345"], timestamp=1)
    with pytest.raises(TypeError, match="sequence of arguments"):
        build_erofs(src, tmp_path / "c", extra_opts="-T12345")


def test_environment_epoch_is_used_in_reproducible_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(BASE_MTIME + 77))
    build_erofs(_plain_tree(tmp_path / "src"), tmp_path / "img", reproducible=True)
    assert _superblock(tmp_path / "img")[0] == BASE_MTIME + 77


def test_source_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="not a directory"):
        build_erofs(tmp_path / "missing", tmp_path / "x")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:SUPERBLOCK] + b"\0" + data[SUPERBLOCK + 1 :], id="magic"),
        # Only the file data is missing: found because fsck_erofs decodes every file.
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
    ],
)
def test_fsck_detects_a_damaged_image(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    image = tmp_path / "layer.erofs"
    build_erofs(_plain_tree(tmp_path / "src"), image, compression="lz4hc")
    fsck_erofs(image)
    image.write_bytes(damage(image.read_bytes()))
    with pytest.raises(ConvertError, match=r"fsck.erofs of .* failed .*<E>"):
        fsck_erofs(image)


def test_reproducible_images_are_identical(tmp_path: Path) -> None:
    src = _plain_tree(tmp_path / "src")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, symlinks=True)  # other inodes, same names, modes and mtimes
    first, second, third = tmp_path / "1", tmp_path / "2", tmp_path / "3"
    build_erofs(src, first, reproducible=True, compression="lz4hc,12")
    build_erofs(copy, second, reproducible=True, compression="lz4hc,12")
    assert first.read_bytes() == second.read_bytes()
    build_erofs(src, third, compression="lz4hc,12")
    assert third.read_bytes() != first.read_bytes()  # a random UUID and the current time
    build_time, image_uuid = _superblock(first)
    assert image_uuid == uuid.UUID(REPRODUCIBLE_UUID).bytes
    assert build_time == newest_mtime(src) + 1 == BASE_MTIME + 1


def test_timestamp_sets_the_build_time(tmp_path: Path) -> None:
    src = _plain_tree(tmp_path / "src")
    build_erofs(src, tmp_path / "img", timestamp=BASE_MTIME + 1234)
    assert _superblock(tmp_path / "img")[0] == BASE_MTIME + 1234
    with pytest.raises(ConvertError, match="invalid timestamp"):
        build_erofs(src, tmp_path / "img2", timestamp=-1)


# --- whole layers, checked through the kernel's EROFS driver -----------------------------------


def _extracted(
    layer: LayerBuilder, tmp_path: Path, name: str = "tree"
) -> tuple[Path, dict[str, TreeEntry]]:
    data = layer.tar()
    dest = tmp_path / name
    dest.mkdir()
    extract_layer(io.BytesIO(data), dest)
    return dest, scan_tar(io.BytesIO(data))


@pytest.mark.root
@pytest.mark.parametrize(("compression", "layout"), [
    (None, None), (None, ErofsLayout.INTERLEAVED), ("lz4hc,12", None)])
def test_layer_survives_mkfs_and_mount(
    tmp_path: Path, compression: str | None, layout: ErofsLayout | None
) -> None:
    tree, expected = _extracted(rich_layer(), tmp_path)
    image = tmp_path / "layer.erofs"
    build_erofs(tree, image, compression=compression, layout=layout, reproducible=True)
    fsck_erofs(image)
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        assert compare_trees(expected, scan_directory(mnt)) == []
        # Reproducible mode keeps every mtime.
        assert os.lstat(mnt / "etc/passwd").st_mtime == os.lstat(tree / "etc/passwd").st_mtime
        assert os.lstat(mnt / "home").st_mtime == os.lstat(tree / "home").st_mtime


@pytest.mark.root
def test_fsck_extract_matches_except_what_it_cannot_restore(tmp_path: Path) -> None:
    tree, expected = _extracted(rich_layer(), tmp_path)
    image = tmp_path / "layer.erofs"
    build_erofs(tree, image)
    out = tmp_path / "fsck-out"
    fsck_erofs(image, extract_to=out)
    actual = scan_directory(out)
    # erofs-utils 1.5 restores neither xattrs nor hardlinks when extracting, and it sets the
    # owner after the mode, which clears setuid and setgid: those are checked on a mount.
    assert compare_trees(expected, actual, ignore={"xattrs", "hardlinks", "setid"}) == []
    assert compare_trees(expected, actual) != []


@pytest.mark.root
def test_reproducible_from_two_extractions(tmp_path: Path) -> None:
    images = []
    for name in ("one", "two"):
        tree, _ = _extracted(rich_layer(), tmp_path, name)
        image = tmp_path / f"{name}.erofs"
        build_erofs(tree, image, reproducible=True, compression="lz4hc,12")
        images.append(image.read_bytes())
    assert images[0] == images[1]


@pytest.mark.root
def test_timestamp_clamps_only_newer_mtimes(tmp_path: Path) -> None:
    layer = (
        LayerBuilder().file("old", b"o", mtime=BASE_MTIME).file("new", b"n", mtime=BASE_MTIME + 900)
    )
    tree, _ = _extracted(layer, tmp_path)
    image = tmp_path / "layer.erofs"
    build_erofs(tree, image, timestamp=BASE_MTIME + 500)
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        assert os.lstat(mnt / "old").st_mtime == BASE_MTIME
        assert os.lstat(mnt / "new").st_mtime == BASE_MTIME + 500
