"""The root file system an image's layers make together: each layer's tree applied over the
ones below it, as OCI says and overlayfs shows.

Layer trees are in the overlayfs form `converter.tree` gives every producer: a whiteout is a
0:0 character device, an opaque directory carries `trusted.overlay.opaque=y`. Applying a
layer: a whiteout removes the path and everything below it; an opaque directory hides
everything below it from the layers underneath; a directory over a directory merges with it,
taking its own owner, mode and xattrs; anything else replaces what was there, a whole
directory included. A directory that a tar layer only implies (its files have no entry for
it) keeps the attributes of the one below, as an unpacking runtime leaves it; an EROFS layer
holds every directory itself, which is what an overlay mount of such layers shows. The
merged tree keeps none of overlayfs's own xattrs (`trusted.overlay.*`), and hardlinks only
within the layer that made them. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from converter.tar_members import OPAQUE_VALUE, OPAQUE_XATTR, ROOT
from converter.tree import TreeEntry

OVERLAY_XATTR_PREFIX = "trusted.overlay."


@dataclass(frozen=True)
class LayerTree:
    """One layer's tree; `explicit_dirs` are the directories it names itself (a tar layer),
    None when it holds every directory itself (an EROFS layer)."""

    entries: Mapping[str, TreeEntry]
    explicit_dirs: frozenset[str] | None = None


def is_whiteout(entry: TreeEntry) -> bool:
    return entry.kind == "chardev" and entry.rdev == (0, 0)


def _remove(tree: dict[str, tuple[int, TreeEntry]], path: str, *, keep_self: bool) -> None:
    prefix = "" if path == ROOT else path + "/"
    for key in [k for k in tree if k != ROOT and k.startswith(prefix)]:
        del tree[key]
    if not keep_self:
        tree.pop(path, None)


def merge_layers(layers: Sequence[LayerTree]) -> dict[str, TreeEntry]:
    """The merged tree of `layers`, lowest first (see the module docstring)."""
    merged: dict[str, tuple[int, TreeEntry]] = {}
    for number, layer in enumerate(layers):
        upper = layer.entries
        # Parents before children: a path sorts after its prefix; the root goes first.
        for path in sorted(upper, key=lambda p: (p != ROOT, p)):
            entry = upper[path]
            if is_whiteout(entry):
                _remove(merged, path, keep_self=False)
                continue
            lower = merged.get(path)
            both_dirs = lower is not None and lower[1].kind == "dir" == entry.kind
            if lower is not None and not both_dirs:
                _remove(merged, path, keep_self=False)
            elif entry.kind == "dir" and entry.xattrs.get(OPAQUE_XATTR) == OPAQUE_VALUE:
                _remove(merged, path, keep_self=True)
            implied = layer.explicit_dirs is not None and path not in layer.explicit_dirs
            if both_dirs and implied:
                continue  # the directory below stays as it is
            xattrs = {k: v for k, v in entry.xattrs.items()
                      if not k.startswith(OVERLAY_XATTR_PREFIX)}
            merged[path] = (number, replace(entry, xattrs=xattrs))
    groups: dict[tuple[int, str], list[str]] = {}
    for path, (number, entry) in merged.items():
        if entry.inode_group is not None:
            groups.setdefault((number, entry.inode_group), []).append(path)
    tree = {path: replace(entry, inode_group=None) for path, (_, entry) in merged.items()}
    for paths in groups.values():
        if len(paths) > 1:
            for path in paths:
                tree[path] = replace(tree[path], inode_group=min(paths))
    return tree


__all__ = ["OVERLAY_XATTR_PREFIX", "LayerTree", "is_whiteout", "merge_layers"]
