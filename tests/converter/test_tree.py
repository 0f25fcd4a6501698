"""The tree model: what a tar layer means, what a directory holds, and how they differ."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import replace
from pathlib import Path

import pytest

from converter.errors import ConvertError
from converter.tree import (
    COMPARED_ASPECTS,
    LAZYFS_CONVENTION,
    MKFS_EROFS_TAR_CONVENTION,
    TAR_CONVENTIONS,
    TreeEntry,
    compare_trees,
    scan_directory,
    scan_tar,
    scan_tar_each,
)
from tests.converter import CAP_NET_RAW, LayerBuilder, rich_layer


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- scan_tar ---------------------------------------------------------------------------------


def test_scan_tar_models_the_layer() -> None:
    tree = scan_tar(io.BytesIO(rich_layer().tar()))
    assert tree["."] == TreeEntry(".", "dir", 0o755, 0, 0)
    assert tree["bin/su"].mode == 0o4755
    assert tree["bin/ping"].xattrs == {"security.capability": CAP_NET_RAW}
    assert tree["bin/ping"].inode_group == tree["bin/ping-hardlink"].inode_group == "bin/ping"
    assert tree["bin/su"].inode_group is None
    assert tree["bin/sh"] == TreeEntry("bin/sh", "symlink", 0o777, 0, 0, link_target="busybox")
    assert tree["home"] == TreeEntry("home", "dir", 0o755, 0, 0)  # implicit parent
    assert tree["home/user/deep/big.bin"].size == 256 * 9000
    assert tree["dev/big"].rdev == (4095, 1048575)
    assert tree["dev/sda"].kind == "blockdev" and tree["dev/initctl"].kind == "fifo"
    assert tree["var/removed"] == TreeEntry("var/removed", "chardev", 0, 7, 8, rdev=(0, 0))
    assert tree["opaque"].xattrs == {"trusted.overlay.opaque": b"y"}
    assert tree["var"].xattrs == {"trusted.lazyfs.test": b"dir-xattr",
                                  "trusted.overlay.origin": b""}  # it holds a whiteout
    assert tree["replaced"].sha256 == _sha(b"second version")
    assert tree["replaced"].mode == 0o600
    assert tree["empty"].sha256 == _sha(b"")
    for hidden in ("var/.wh.removed", "opaque/.wh..wh..opq", ".wh..wh.plnk"):
        assert hidden not in tree
    assert len(tree) == 28


def test_scan_tar_later_entries_win() -> None:
    tree = scan_tar(
        io.BytesIO(
            LayerBuilder()
            .dir("d")
            .file("d/x", b"1")
            .file("d", b"file now")  # replaces the directory and everything below
            .file("f", b"old")
            .hardlink("l", "f")
            .file("f", b"new")  # l keeps the old inode
            .dir("o", mode=0o755)
            .file("o/.wh..wh..opq")
            .dir("o", mode=0o711, uid=3)  # redeclared: attributes change, opaque stays
            .tar()
        )
    )
    assert "d/x" not in tree and tree["d"].kind == "file"
    assert tree["l"].sha256 == _sha(b"old") and tree["f"].sha256 == _sha(b"new")
    assert tree["l"].inode_group is None and tree["f"].inode_group is None
    assert (tree["o"].mode, tree["o"].uid) == (0o711, 3)
    assert tree["o"].xattrs == {"trusted.overlay.opaque": b"y"}


def test_scan_tar_xattr_rules() -> None:
    tree = scan_tar(
        io.BytesIO(
            LayerBuilder()
            .symlink("s", "t", xattrs={"user.dropped": b"1", "trusted.kept": b"2"})
            .file("f", b"", xattrs={"security.selinux": b"system_u:object_r:bin_t:s0"})
            .tar()
        )
    )
    assert tree["s"].xattrs == {"trusted.kept": b"2"}  # Linux has no user.* on symlinks
    assert tree["f"].xattrs == {}  # SELinux labels belong to the host, not to the layer


def test_scan_tar_each_convention() -> None:
    """The converters agree on all the tar says and differ where it says nothing."""
    builder = rich_layer().dir("d").file("d/.wh..wh.plnk")  # aufs metadata
    builder.symlink("s", "t").members[-1][0].mode = 0o644  # as a header may give it
    del builder.members[0]  # no ./ entry
    layer = builder.tar()
    trees = scan_tar_each(io.BytesIO(layer))
    assert list(trees) == list(TAR_CONVENTIONS)
    ours, containerds = trees[LAZYFS_CONVENTION], trees[MKFS_EROFS_TAR_CONVENTION]
    assert ours == scan_tar(io.BytesIO(layer))
    assert ours["."].mode == 0o755 and containerds["."].mode == 0o777  # no ./ entry
    assert ours["s"].mode == 0o777 and containerds["s"].mode == 0o644
    # mkfs.erofs --aufs takes `.wh..wh.plnk` for a whiteout of `.wh.plnk`; lazyfs ignores it.
    assert "d/.wh.plnk" not in ours and ours["d"].xattrs == {}
    assert containerds["d/.wh.plnk"] == TreeEntry("d/.wh.plnk", "chardev", 0, 0, 0, rdev=(0, 0))
    assert containerds["d"].xattrs == {"trusted.overlay.origin": b""}
    # rich_layer's own `.wh..wh.plnk`, in the root
    assert containerds[".wh.plnk"].kind == "chardev" and ".wh.plnk" not in ours
    assert containerds["."].xattrs == {"trusted.overlay.origin": b""} and ours["."].xattrs == {}
    # Everything else is the same: symlinks of mode 0777 in the header, and all the rest.
    assert containerds["bin/sh"] == ours["bin/sh"]
    for path in ("d/.wh.plnk", ".wh.plnk", ".", "s", "d"):
        ours.pop(path, None)
        containerds.pop(path, None)
    assert ours == containerds


def test_symlink_modes_can_be_left_out_of_a_comparison() -> None:
    link = TreeEntry("s", "symlink", 0o644, 0, 0, link_target="t")
    extracted = replace(link, mode=0o777)
    assert compare_trees(_tree(link), _tree(extracted)) == ["s: mode: expected 0644, found 0777"]
    assert compare_trees(_tree(link), _tree(extracted), ignore=["symlink_mode"]) == []
    directory = TreeEntry("d", "dir", 0o755, 0, 0)
    assert compare_trees(_tree(directory), _tree(replace(directory, mode=0o700)),
                         ignore=["symlink_mode"]) == ["d: mode: expected 0755, found 0700"]


# --- scan_directory ---------------------------------------------------------------------------


def test_scan_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    big = os.urandom(3 << 20)  # several 1 MiB hashing pieces
    (root / "big").write_bytes(big)
    (root / "sub").mkdir()
    (root / "sub/file").write_bytes(b"data")
    (root / "sub/file").chmod(0o640)
    os.link(root / "sub/file", root / "link")
    os.symlink("sub/file", root / "sym")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "big", "user.note", b"\x00\x01")
    tree = scan_directory(root)
    uid, gid = os.getuid(), os.getgid()
    assert tree["."] == TreeEntry(".", "dir", 0o755, uid, gid)
    assert tree["big"] == TreeEntry(
        "big",
        "file",
        0o644 & ~_umask(),
        uid,
        gid,
        len(big),
        _sha(big),
        xattrs={"user.note": b"\0\1"},
    )
    assert tree["sub/file"].mode == 0o640 and tree["sub/file"].sha256 == _sha(b"data")
    assert tree["sub/file"].inode_group == tree["link"].inode_group == "link"
    assert tree["sym"] == TreeEntry("sym", "symlink", 0o777, uid, gid, link_target="sub/file")
    assert tree["fifo"].kind == "fifo"
    assert sorted(tree) == [".", "big", "fifo", "link", "sub", "sub/file", "sym"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_scan_directory_missing(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="cannot scan"):
        scan_directory(tmp_path / "nope")


# --- compare_trees ----------------------------------------------------------------------------


def _tree(*entries: TreeEntry) -> dict[str, TreeEntry]:
    return {entry.path: entry for entry in entries}


BASE = _tree(
    TreeEntry(".", "dir", 0o755, 0, 0),
    TreeEntry("f", "file", 0o644, 0, 0, 3, _sha(b"abc"), xattrs={"user.a": b"1"}),
    TreeEntry("g", "file", 0o644, 0, 0, 3, _sha(b"abc"), inode_group="g"),
    TreeEntry("h", "file", 0o644, 0, 0, 3, _sha(b"abc"), inode_group="g"),
    TreeEntry("s", "symlink", 0o777, 0, 0, link_target="f"),
    TreeEntry("c", "chardev", 0o600, 0, 0, rdev=(1, 3)),
)


def _changed(path: str, **changes: object) -> dict[str, TreeEntry]:
    tree = dict(BASE)
    tree[path] = replace(tree[path], **changes)  # type: ignore[arg-type]
    return tree


def test_equal_trees() -> None:
    assert compare_trees(BASE, dict(BASE)) == []


@pytest.mark.parametrize(
    ("actual", "message"),
    [
        ({k: v for k, v in BASE.items() if k != "s"}, "missing: s (symlink)"),
        ({**BASE, "new": TreeEntry("new", "fifo", 0o600, 0, 0)}, "extra: new (fifo)"),
        (_changed("s", kind="file"), "s: type: expected symlink, found file"),
        (_changed("f", mode=0o4644), "f: mode: expected 0644, found 4644"),
        (_changed("f", uid=1, gid=2), "f: owner: expected 0:0, found 1:2"),
        (_changed("f", size=4, sha256=_sha(b"abcd")), "f: size: expected 3, found 4"),
        (_changed("f", sha256=_sha(b"abd")), f"f: content: expected sha256 {_sha(b'abc')}"),
        (_changed("s", link_target="g"), "s: symlink target: expected 'f', found 'g'"),
        (_changed("c", rdev=(1, 5)), "c: device: expected 1:3, found 1:5"),
        (_changed("f", xattrs={}), "f: xattr user.a: missing, expected b'1'"),
        (_changed("f", xattrs={"user.a": b"2"}), "f: xattr user.a: expected b'1', found b'2'"),
        (
            _changed("f", xattrs={"user.a": b"1", "user.b": b"x"}),
            "f: xattr user.b: unexpected, found b'x'",
        ),
        (
            _changed("h", inode_group=None) | {"g": replace(BASE["g"], inode_group=None)},
            "g: hardlinks: expected links with h, found no other links",
        ),
        (
            _changed("f", inode_group="f") | {"g": replace(BASE["g"], inode_group="f")},
            "f: hardlinks: expected no other links, found links with g",
        ),
    ],
)
def test_each_difference_is_reported(actual: dict[str, TreeEntry], message: str) -> None:
    problems = compare_trees(BASE, actual)
    assert any(p.startswith(message) for p in problems), problems


def test_ignore_aspects() -> None:
    actual = _changed("f", xattrs={}, mode=0o600)
    actual["g"] = replace(actual["g"], inode_group=None)
    actual["h"] = replace(actual["h"], inode_group=None)
    assert len(compare_trees(BASE, actual)) == 4  # mode, xattr; g and h lost their link
    assert compare_trees(BASE, actual, ignore={"xattrs", "hardlinks", "mode"}) == []
    assert compare_trees(BASE, actual, ignore=COMPARED_ASPECTS) == []
    setuid = _changed("f", mode=0o4644)
    assert compare_trees(BASE, setuid, ignore={"setid"}) == []
    assert compare_trees(BASE, _changed("f", mode=0o4664), ignore={"setid"}) == [
        "f: mode: expected 0644, found 4664"
    ]
    with pytest.raises(ValueError, match="xatrs"):
        compare_trees(BASE, actual, ignore={"xatrs"})


def test_odd_path_names_are_printable() -> None:
    name = "bad\nname\udcff"
    problems = compare_trees({}, {name: TreeEntry(name, "file", 0o644, 0, 0)})
    assert problems == ["extra: bad\\nname\\xff (file)"]
