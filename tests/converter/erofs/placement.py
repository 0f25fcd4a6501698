"""Where lazyfs's writer put each file's blocks, read back from an image and replayed from
its source: the start-order tests compare both."""

from __future__ import annotations

from pathlib import Path

from converter.erofs.dir_inodes import DirectorySource
from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import Node, walk
from converter.erofs.writer import ImageOptions, ImageResult, place_blocks, write_image
from converter.erofs_tree import scan_erofs
from converter.mkfs import fsck_erofs
from converter.tree import compare_trees, scan_directory

BLOCK = 4096


def names_of(root: Node) -> dict[Node, str]:
    """Each node of the tree under `root` and its path."""
    return {node: path.decode() for path, node in walk(root)}


def placed_blocks(erofs: ErofsSource) -> dict[str, list[int]]:
    """Each file of an open image and its image blocks, from its block maps."""
    names = names_of(erofs.root)
    placed: dict[str, list[int]] = {}
    for block, node, _ in erofs.blocks_of(BLOCK):
        placed.setdefault(names[node], []).append(block)
    return placed


def replayed_blocks(src: Path) -> tuple[dict[str, list[int]], int]:
    """Each file of the directory `src` and the image blocks the writer would put it in
    (`place_blocks`, nothing written), and the image's size."""
    replayed: dict[str, list[int]] = {}
    source = DirectorySource(src)
    names = names_of(source.root)
    size = place_blocks(source, ImageOptions(),
                        lambda block, node, _: replayed.setdefault(names[node], []).append(block))
    return replayed, size


def written_image(src: Path, image: Path) -> ImageResult:
    """The directory `src` written to `image` by lazyfs's writer, checked by fsck.erofs and
    against the tree."""
    result = write_image(DirectorySource(src), image, ImageOptions())
    fsck_erofs(image)
    assert compare_trees(scan_directory(src), scan_erofs(image), ignore={"owner"}) == []
    return result
