"""The root file system layers make: whiteouts, opaque directories, directories merged or
replaced, implied directories, hardlinks and overlayfs's own xattrs."""

from __future__ import annotations

import io
import tarfile

from converter.tar_extract import IMPLICIT_DIR_MODE
from converter.tree import TreeEntry, scan_tar
from lazyfs.audit.merge import LayerTree, merge_layers
from tests.support.images import busybox_layers, expected_rootfs_tree


def entry(path: str, kind: str = "file", mode: int = 0o644, **fields: object) -> TreeEntry:
    return TreeEntry(path=path, kind=kind, mode=mode, uid=0, gid=0, **fields)  # type: ignore[arg-type]


def layer(*entries: TreeEntry, explicit: frozenset[str] | None = None) -> LayerTree:
    return LayerTree({e.path: e for e in [entry(".", "dir", 0o755), *entries]}, explicit)


def whiteout(path: str) -> TreeEntry:
    return entry(path, "chardev", 0, rdev=(0, 0))


def test_whiteouts_remove_paths_and_everything_below() -> None:
    lower = layer(entry("a", "dir", 0o755), entry("a/b"), entry("a/c", "dir", 0o755),
                  entry("a/c/d"), entry("keep"))
    upper = layer(entry("a", "dir", 0o755), whiteout("a/c"), whiteout("never-there"))
    assert sorted(merge_layers([lower, upper])) == [".", "a", "a/b", "keep"]


def test_opaque_directories_hide_what_is_below_them() -> None:
    lower = layer(entry("d", "dir", 0o700), entry("d/old"), entry("d/sub", "dir"))
    upper = layer(entry("d", "dir", 0o750, xattrs={"trusted.overlay.opaque": b"y",
                                                   "trusted.overlay.origin": b""}),
                  entry("d/new"))
    merged = merge_layers([lower, upper])
    assert sorted(merged) == [".", "d", "d/new"]
    assert merged["d"].mode == 0o750 and dict(merged["d"].xattrs) == {}


def test_anything_but_a_directory_over_a_directory_replaces_it() -> None:
    lower = layer(entry("x", "dir", 0o755), entry("x/inside"), entry("y"))
    upper = layer(entry("x", "symlink", 0o777, link_target="elsewhere"),
                  entry("y", "dir", 0o700), entry("y/z"))
    merged = merge_layers([lower, upper])
    assert sorted(merged) == [".", "x", "y", "y/z"]
    assert merged["x"].kind == "symlink" and merged["y"].mode == 0o700


def test_implied_directories_keep_the_lower_ones_attributes() -> None:
    lower = layer(entry("home", "dir", 0o700, xattrs={"user.a": b"1"}))
    implied = layer(entry("home", "dir", IMPLICIT_DIR_MODE), entry("home/file"),
                    explicit=frozenset())
    named = layer(entry("home", "dir", IMPLICIT_DIR_MODE), entry("home/file"),
                  explicit=frozenset({"home"}))
    assert merge_layers([lower, implied])["home"].mode == 0o700
    assert merge_layers([lower, named])["home"].mode == IMPLICIT_DIR_MODE
    assert merge_layers([lower, layer(entry("home", "dir", IMPLICIT_DIR_MODE))])[
        "home"].mode == IMPLICIT_DIR_MODE  # an EROFS layer holds its directories itself


def test_hardlinks_stay_within_the_layer_that_made_them() -> None:
    lower = layer(entry("a", inode_group="a"), entry("b", inode_group="a"),
                  entry("c", inode_group="a"))
    upper = layer(entry("c", inode_group="c"), entry("d", inode_group="c"), whiteout("b"))
    merged = merge_layers([lower, upper])
    assert merged["a"].inode_group is None  # its partner went
    assert (merged["c"].inode_group, merged["d"].inode_group) == ("c", "c")


def test_root_whiteouts_and_an_opaque_root() -> None:
    lower = layer(entry("-early"), entry("z"))
    upper = LayerTree({".": entry(".", "dir", 0o755,
                                  xattrs={"trusted.overlay.opaque": b"y"}),
                       "-new": entry("-new")})
    assert sorted(merge_layers([lower, upper])) == ["-new", "."]


def test_agrees_with_the_test_images_model() -> None:
    layers = busybox_layers()
    trees = []
    for tar in layers:
        trees.append(LayerTree(scan_tar(io.BytesIO(tar)), frozenset(_named_dirs(tar))))
    assert merge_layers(trees) == expected_rootfs_tree(layers)


def _named_dirs(tar: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {m.name.rstrip("/") for m in archive if m.isdir()}
