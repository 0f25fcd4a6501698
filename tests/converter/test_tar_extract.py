"""Extraction of tar layers: faithful to the model (`scan_tar`), and refusing every escape."""

from __future__ import annotations

import io
import logging
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.errors import ConvertError, UnsafeTarError
from converter.source import SourceKind, open_tar_stream
from converter.tar_extract import extract_layer
from converter.tree import compare_trees, scan_directory, scan_tar
from tests.converter import BASE_MTIME, CAP_NET_RAW, LayerBuilder, rich_layer

# Extraction sets owners, creates device nodes and trusted.* xattrs: root only.
pytestmark = pytest.mark.root


def _extract(layer: LayerBuilder, tmp_path: Path) -> Path:
    """Extract `layer` and check the result against the model of the layer."""
    data = layer.tar()
    dest = tmp_path / "tree"
    dest.mkdir()
    extract_layer(io.BytesIO(data), dest)
    assert compare_trees(scan_tar(io.BytesIO(data)), scan_directory(dest)) == []
    return dest


@pytest.mark.parametrize("kind", [SourceKind.TAR, SourceKind.TAR_GZIP, SourceKind.TAR_ZSTD])
def test_extraction_equals_model(tmp_path: Path, kind: SourceKind) -> None:
    layer = rich_layer()
    encoded = {
        SourceKind.TAR: layer.tar,
        SourceKind.TAR_GZIP: layer.gzip,
        SourceKind.TAR_ZSTD: lambda: layer.zstd(frame_bytes=100_000),
    }[kind]()
    source = tmp_path / "layer"
    source.write_bytes(encoded)
    dest = tmp_path / "tree"
    dest.mkdir()
    with open_tar_stream(source) as stream:
        stats = extract_layer(stream, dest)
    with open_tar_stream(source) as stream:
        expected = scan_tar(stream)
    assert compare_trees(expected, scan_directory(dest)) == []
    assert (stats.files, stats.dirs, stats.symlinks, stats.hardlinks) == (11, 8, 2, 1)
    assert (stats.chardevs, stats.blockdevs, stats.fifos) == (2, 1, 1)
    assert (stats.whiteouts, stats.opaque, stats.ignored, stats.entries) == (1, 1, 1, 29)


def test_attributes_on_disk(tmp_path: Path) -> None:
    dest = _extract(rich_layer(), tmp_path)

    def st(path: str) -> os.stat_result:
        return os.lstat(dest / path)

    assert stat.S_IMODE(st("bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(st("bin/wall").st_mode) == 0o2755
    assert stat.S_IMODE(st("tmp").st_mode) == 0o1777
    assert (st("home/user/notes").st_uid, st("home/user/notes").st_gid) == (4294967294,) * 2
    assert os.getxattr(dest / "bin/ping", "security.capability") == CAP_NET_RAW
    assert os.getxattr(dest / "home/user/notes", "user.binary") == b"\xff\x00\xfe"
    assert os.getxattr(dest / "opaque", "trusted.overlay.opaque") == b"y"
    assert st("bin/ping").st_ino == st("bin/ping-hardlink").st_ino
    assert os.readlink(dest / "bin/sh") == "busybox"
    null = st("dev/null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (
        1,
        3,
    )
    big = st("dev/big")
    assert (os.major(big.st_rdev), os.minor(big.st_rdev)) == (4095, 1048575)
    assert stat.S_ISBLK(st("dev/sda").st_mode)
    assert stat.S_ISFIFO(st("dev/initctl").st_mode)
    whiteout = st("var/removed")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert stat.S_IMODE(whiteout.st_mode) == 0 and (whiteout.st_uid, whiteout.st_gid) == (7, 8)
    assert not (dest / "var/.wh.removed").exists()
    assert not (dest / "opaque/.wh..wh..opq").exists()
    assert not (dest / ".wh..wh.plnk").exists()
    assert (dest / "replaced").read_bytes() == b"second version"


def test_directories_holding_whiteouts_are_marked_as_mkfs_erofs_marks_them(
    tmp_path: Path,
) -> None:
    """`trusted.overlay.origin` (empty) on every directory a whiteout went into, as
    `mkfs.erofs --tar --aufs` writes it: overlayfs hides whiteouts only in directories it
    knows may hold them (merged ones, or marked ones)."""
    layer = LayerBuilder()
    layer.dir("fresh").file("fresh/.wh.ghost").file("fresh/real", b"real")
    layer.file(".wh.top")  # the root holds one too
    layer.file("implied/deeper/.wh.x")  # parents the layer only implies
    layer.dir("plain").file("plain/file", b"no whiteout here")
    layer.dir("back").file("back/.wh.y").file("back/y", b"written over the whiteout")
    layer.dir("gone").file("gone/.wh.z").file("gone", b"the directory replaced by a file")
    layer.dir("opq").file("opq/.wh..wh..opq").file("opq/new", b"")
    dest = _extract(layer, tmp_path)
    origin = "trusted.overlay.origin"
    marked = [".", "fresh", "implied/deeper", "back"]
    for path in marked:
        assert os.getxattr(dest / path, origin) == b"", path
    for path in ["implied", "plain", "opq"]:  # an opaque directory alone needs no mark
        assert origin not in os.listxattr(dest / path), path
    # mkfs.erofs keeps the mark once a whiteout went in, even after an entry replaced it.
    assert (dest / "back/y").read_bytes() == b"written over the whiteout"
    assert stat.S_ISCHR(os.lstat(dest / "fresh/ghost").st_mode)


def test_mtimes(tmp_path: Path) -> None:
    layer = LayerBuilder()
    layer.dir("d", mtime=BASE_MTIME + 1)
    layer.file("d/f", b"x", mtime=BASE_MTIME + 2)
    layer.symlink("d/s", "f", mtime=BASE_MTIME + 3)
    layer.file("implicit/parent/f", b"y", mtime=BASE_MTIME + 50)
    precise = layer._info("precise", tarfile.REGTYPE, mode=0o644)
    precise.pax_headers = {"mtime": "1600000004.123456789"}
    layer.add(precise, b"")
    dest = _extract(layer, tmp_path)
    assert os.lstat(dest / "d").st_mtime == BASE_MTIME + 1  # set after d/f and d/s went in
    assert os.lstat(dest / "d/f").st_mtime == BASE_MTIME + 2
    assert os.lstat(dest / "d/s").st_mtime == BASE_MTIME + 3
    assert os.lstat(dest / "precise").st_mtime_ns == 1600000004_123456789
    # Directories without an entry of their own take the newest mtime of the layer.
    for implicit in ("implicit", "implicit/parent", "."):
        assert os.lstat(dest / implicit).st_mtime == BASE_MTIME + 50
        assert stat.S_IMODE(os.lstat(dest / implicit).st_mode) == 0o755


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(
            LayerBuilder().dir("a").file("a/x", b"1").file("a", b"now a file"), id="dir-by-file"
        ),
        pytest.param(LayerBuilder().file("a", b"1").dir("a").file("a/x", b"2"), id="file-by-dir"),
        pytest.param(
            LayerBuilder()
            .dir("a", mode=0o755)
            .file("a/.wh..wh..opq")
            .file("a/x", b"1")
            .dir("a", mode=0o700, uid=5, xattrs={"user.later": b"1"}),
            id="dir-redeclared",
        ),
        pytest.param(
            LayerBuilder().file("f", b"old").hardlink("l", "f").file("f", b"new"),
            id="hardlink-keeps-old-inode",
        ),
        pytest.param(LayerBuilder().file("x", b"1").file(".wh.x"), id="whiteout-after-file"),
        pytest.param(LayerBuilder().file(".wh.y").file("y", b"1"), id="file-after-whiteout"),
        pytest.param(LayerBuilder().dir("d").file("d/x").file(".wh.d"), id="whiteout-replaces-dir"),
        pytest.param(
            LayerBuilder().symlink("d", "/etc").dir("d").file("d/x", b"inside"),
            id="symlink-replaced-by-dir",
        ),
        pytest.param(
            LayerBuilder().file("a", b"1").hardlink("b", "a").hardlink("c", "b"), id="link-chain"
        ),
        pytest.param(LayerBuilder().file("./a//b/./c", b"1"), id="odd-spelling"),
        pytest.param(LayerBuilder().file("caf\udce9", b"latin-1 name"), id="non-utf8-name"),
    ],
)
def test_tar_semantics_match_model(tmp_path: Path, layer: LayerBuilder) -> None:
    _extract(layer, tmp_path)


def test_replacement_details(tmp_path: Path) -> None:
    dest = _extract(
        LayerBuilder()
        .dir("a", mode=0o755)
        .file("a/.wh..wh..opq")
        .file("a/x", b"1")
        .dir("a", mode=0o700, uid=5)
        .file("f", b"old")
        .hardlink("l", "f")
        .file("f", b"new")
        .symlink("d", "/etc")
        .dir("d")
        .file("d/x", b"inside"),
        tmp_path,
    )
    a = os.lstat(dest / "a")
    assert (stat.S_IMODE(a.st_mode), a.st_uid) == (0o700, 5)
    assert os.getxattr(dest / "a", "trusted.overlay.opaque") == b"y"
    assert (dest / "a/x").read_bytes() == b"1"
    assert (dest / "l").read_bytes() == b"old" and (dest / "f").read_bytes() == b"new"
    assert (dest / "d").is_dir() and not (dest / "d").is_symlink()
    assert (dest / "d/x").read_bytes() == b"inside"


def test_user_xattr_on_symlink_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layer = LayerBuilder().symlink("s", "t", xattrs={"user.x": b"1", "trusted.y": b"2"})
    with caplog.at_level(logging.WARNING, logger="converter.tar_extract"):
        dest = _extract(layer, tmp_path)
    assert "dropping xattr user.x" in caplog.text
    assert os.getxattr(dest / "s", "trusted.y", follow_symlinks=False) == b"2"


# --- refusals ---------------------------------------------------------------------------------


EscapeCase = Callable[[str], tuple[LayerBuilder, str]]
# Layers that try to write (or link) outside the extraction directory `out`, and the entry
# that the refusal must name.
ESCAPES: dict[str, EscapeCase] = {
    "dotdot": lambda out: (LayerBuilder().file("../escaped", b"x"), "../escaped"),
    "dotdot-inside": lambda out: (
        LayerBuilder().dir("a").file("a/../../escaped", b"x"),
        "a/../../escaped",
    ),
    "absolute": lambda out: (LayerBuilder().file(f"{out}/escaped", b"x"), f"{out}/escaped"),
    "symlink-parent": lambda out: (
        LayerBuilder().symlink("link", out).file("link/escaped", b"x"),
        "link/escaped",
    ),
    "relative-symlink-parent": lambda out: (
        LayerBuilder().symlink("up", "..").file("up/escaped", b"x"),
        "up/escaped",
    ),
    "deep-symlink-parent": lambda out: (
        LayerBuilder().dir("d").symlink("d/s", out).dir("d/s/escaped"),
        "d/s/escaped",
    ),
    "whiteout-via-symlink": lambda out: (
        LayerBuilder().symlink("s", out).file("s/.wh.secret"),
        "s/.wh.secret",
    ),
    "opaque-via-symlink": lambda out: (
        LayerBuilder().symlink("s", out).file("s/.wh..wh..opq"),
        "s/.wh..wh..opq",
    ),
    "hardlink-dotdot": lambda out: (LayerBuilder().hardlink("h", "../secret"), "h"),
    "hardlink-absolute": lambda out: (LayerBuilder().hardlink("h", f"{out}/secret"), "h"),
    "hardlink-via-symlink": lambda out: (
        LayerBuilder().symlink("s", out).hardlink("h", "s/secret"),
        "h",
    ),
    "hardlink-to-later": lambda out: (
        LayerBuilder().hardlink("h", "later").file("later", b"x"),
        "h",
    ),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_escape_is_refused(tmp_path: Path, case: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    layer, entry = ESCAPES[case](str(tmp_path))
    data = layer.tar()
    dest = tmp_path / "tree"
    dest.mkdir()
    with pytest.raises(UnsafeTarError) as refused:
        extract_layer(io.BytesIO(data), dest)
    assert repr(entry) in str(refused.value)
    with pytest.raises(UnsafeTarError):
        scan_tar(io.BytesIO(data))
    # Nothing outside the tree changed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret", "tree"]
    assert secret.read_bytes() == b"secret" and os.lstat(secret).st_nlink == 1
    assert os.listxattr(tmp_path) == []


def _typed(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (LayerBuilder().dir("d").hardlink("h", "d"), "hardlink to directory 'd'"),
        (LayerBuilder().file("./", b"x"), "only a directory can be the layer root"),
        (LayerBuilder().file("f", b"x").file("f/g", b"y"), "parent 'f' is not a directory"),
        (LayerBuilder().file(".wh.", b""), "whiteout names no file"),
        (LayerBuilder().file("f", b"", uid=4294967295), "uid 4294967295 is out of range"),
        (LayerBuilder().file("f", b"", gid=1 << 40), "gid 1099511627776 is out of range"),
        (
            LayerBuilder().device("d", tarfile.CHRTYPE, 5000, 1),
            "device major 5000 is out of range",
        ),
        (
            LayerBuilder().device("d", tarfile.BLKTYPE, 1, 1 << 20),
            "device minor 1048576 is out of range",
        ),
        (
            LayerBuilder().add(tarfile.TarInfo("volume")).add(_typed("tape", b"V")),
            "unsupported entry type",
        ),
    ],
)
def test_unusable_entries(tmp_path: Path, layer: LayerBuilder, message: str) -> None:
    dest = tmp_path / "tree"
    dest.mkdir()
    with pytest.raises(ConvertError, match=message):
        extract_layer(io.BytesIO(layer.tar()), dest)
    with pytest.raises(ConvertError, match=message):
        scan_tar(io.BytesIO(layer.tar()))


def test_truncated_layer_names_the_entry(tmp_path: Path) -> None:
    data = LayerBuilder().file("ok", b"fine").file("cut", b"z" * 10000).tar()
    dest = tmp_path / "tree"
    dest.mkdir()
    with pytest.raises(ConvertError, match="tar entry 'cut': content truncated"):
        extract_layer(io.BytesIO(data[: data.index(b"z" * 10000) + 10]), dest)


def test_destination_must_be_empty_and_private(tmp_path: Path) -> None:
    layer = LayerBuilder().file("f", b"x").tar()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old").write_bytes(b"")
    with pytest.raises(ConvertError, match="not empty"):
        extract_layer(io.BytesIO(layer), busy)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "tree").mkdir()
    with pytest.raises(ConvertError, match="other users can reach it"):
        extract_layer(io.BytesIO(layer), shared / "tree")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConvertError, match="not a directory"):
        extract_layer(io.BytesIO(layer), tmp_path / "file")
