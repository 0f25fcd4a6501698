"""The files nearly every start reads (the dynamic loader, the C library, ld.so.cache, /etc's
small files, the C locale) go right after the metadata, each file's blocks side by side, in
the order a start reads them; every other file follows in the source's order. The tree stays
the same, fsck.erofs 1.5 passes, and a replay of the placement (`place_blocks`) tells where
each of them went."""

from __future__ import annotations

import os
from pathlib import Path

from converter.dir_inodes import DirectorySource
from converter.erofs_inodes import ErofsSource
from converter.erofs_tree import scan_erofs
from converter.erofs_writer import ImageOptions, place_blocks, write_image
from converter.inode_tree import Node, directory, walk
from converter.likely_start import MAX_TOTAL_BYTES, likely_start_files
from converter.mkfs import fsck_erofs
from converter.tree import compare_trees, scan_directory

BLOCK = 4096
# In the order of their rules, each rule's in the tree's order.
LIKELY = ["usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "etc/ld.so.cache",
          "lib64/libm.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6", "etc/passwd",
          "usr/lib/locale/C.utf8/LC_CTYPE", "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
          "usr/share/locale/locale.alias"]
OTHERS = ["etc/big-data", "etc/ssl/certs.pem", "usr/bin/app", "usr/lib/libcrypto.so.3",
          "usr/lib/locale/de_DE/LC_CTYPE", "usr/share/doc/libc6/README", "opt/lib/libc.so.6"]


def _tree(root: Path) -> Path:
    """The files above (each a few blocks; etc/big-data beyond what /etc's picks may hold),
    written in an order unlike a start's."""
    for number, name in enumerate(sorted(OTHERS + LIKELY, reverse=True)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (300 << 10) if name == "etc/big-data" else (number % 3 + 1) * BLOCK + 10
        path.write_bytes(os.urandom(size))
    return root


def _names(root: Node) -> dict[Node, str]:
    return {node: path.decode() for path, node in walk(root)}


def test_picks_the_start_files_in_the_order_a_start_reads_them(tmp_path: Path) -> None:
    source = DirectorySource(_tree(tmp_path / "src"))
    names = _names(source.root)
    assert [names[node] for node in likely_start_files(source.root)] == LIKELY


def test_picks_at_most_the_bound(tmp_path: Path) -> None:
    root = directory()
    etc = root.children[b"etc"] = directory()  # type: ignore[index]
    for number in range(MAX_TOTAL_BYTES // (200 << 10) + 10):
        etc.children[b"f%03d" % number] = Node(0o100644, size=200 << 10)  # type: ignore[index]
    picked = likely_start_files(root)
    assert sum(node.size for node in picked) <= MAX_TOTAL_BYTES < sum(
        node.size for node in picked) + (200 << 10)


def test_laid_out_right_after_the_metadata(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    image = tmp_path / "image.erofs"
    result = write_image(DirectorySource(src), image, ImageOptions())
    fsck_erofs(image)
    assert compare_trees(scan_directory(src), scan_erofs(image), ignore={"owner"}) == []
    with ErofsSource(image) as erofs:
        names = _names(erofs.root)
        placed: dict[str, list[int]] = {}
        for block, node, _ in erofs.blocks_of(BLOCK):
            placed.setdefault(names[node], []).append(block)
    first = result.metadata_size // BLOCK
    in_order = [block for name in LIKELY for block in placed[name]]
    assert in_order == list(range(first, first + len(in_order)))  # side by side, in order
    assert all(min(placed[name]) >= first + len(in_order) for name in OTHERS)

    replayed: dict[str, list[int]] = {}
    source = DirectorySource(src)
    replay_names = _names(source.root)
    size = place_blocks(source, ImageOptions(),
                        lambda block, node, _: replayed.setdefault(replay_names[node],
                                                                   []).append(block))
    assert size == result.image_size
    assert replayed == placed
