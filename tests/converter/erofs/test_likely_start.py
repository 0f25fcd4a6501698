"""The files nearly every start reads (the dynamic loader, the C library, ld.so.cache, /etc's
small files, the C locale, the time zone) go right after the metadata, each file's blocks
side by side, in the order a start reads them, then the other shared libraries, small ones
first; every other file follows in the source's order. The tree stays the same, fsck.erofs
1.5 passes, and a replay of the placement (`place_blocks`) tells where each of them went."""

from __future__ import annotations

import os
from pathlib import Path

from converter.erofs.dir_inodes import DirectorySource
from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import Node, directory
from converter.erofs.likely_start import MAX_TOTAL_BYTES, likely_start_files, resolve
from tests.converter.erofs.placement import (
    names_of,
    placed_blocks,
    replayed_blocks,
    written_image,
)

BLOCK = 4096
# In the order of their rules, each rule's in the tree's order.
LIKELY = ["usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "etc/ld.so.cache",
          "lib64/libm.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6", "etc/passwd",
          "usr/lib/locale/C.utf8/LC_CTYPE", "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
          "usr/share/locale/locale.alias", "usr/share/zoneinfo/Etc/UTC"]
# Small first: the tree has them the other way round.
LIBRARIES = ["usr/lib/x86_64-linux-gnu/libz.so.1.2.13", "usr/lib/libcrypto.so.3"]
SIZES = {"etc/big-data": 300 << 10, "usr/lib/libcrypto.so.3": 9 * BLOCK}
OTHERS = ["etc/big-data", "etc/ssl/certs.pem", "usr/bin/app", "usr/lib/locale/de_DE/LC_CTYPE",
          "usr/share/doc/libc6/README", "opt/lib/libc.so.6", "usr/share/zoneinfo/Europe/Paris",
          "usr/lib/x86_64-linux-gnu/libz.so.1.2.13.notes"]


def _tree(root: Path) -> Path:
    """The files above (each a few blocks; etc/big-data beyond what /etc's picks may hold),
    written in an order unlike a start's, and /etc/localtime a symlink to the time zone."""
    for number, name in enumerate(sorted(OTHERS + LIKELY + LIBRARIES, reverse=True)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(SIZES.get(name, (number % 3 + 1) * BLOCK + 10)))
    (root / "usr/share/zoneinfo/Etc").mkdir(parents=True, exist_ok=True)
    os.symlink("../usr/share/zoneinfo/Etc/../Etc/UTC", root / "etc/localtime")
    return root


def test_picks_the_start_files_in_the_order_a_start_reads_them(tmp_path: Path) -> None:
    source = DirectorySource(_tree(tmp_path / "src"))
    names = names_of(source.root)
    assert [names[node] for node in likely_start_files(source.root)] == LIKELY + LIBRARIES


def test_resolves_symlinks_as_the_kernel_would() -> None:
    root = directory()
    etc = root.children[b"etc"] = directory()  # type: ignore[index]
    usr = root.children[b"usr"] = directory()  # type: ignore[index]
    zone = usr.children[b"UTC"] = Node(0o100644, size=10)  # type: ignore[index]
    etc.children[b"absolute"] = Node(0o120777, target=b"/usr/../usr/./UTC")  # type: ignore[index]
    etc.children[b"relative"] = Node(0o120777, target=b"../../../usr/UTC")  # type: ignore[index]
    etc.children[b"loop"] = Node(0o120777, target=b"loop")  # type: ignore[index]
    etc.children[b"chain"] = Node(0o120777, target=b"relative")  # type: ignore[index]
    for name, found in ((b"absolute", zone), (b"relative", zone), (b"chain", zone),
                        (b"loop", None), (b"missing", None)):
        assert resolve(root, b"etc/" + name) is found


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
    result = written_image(src, image)
    with ErofsSource(image) as erofs:
        placed = placed_blocks(erofs)
    first = result.metadata_size // BLOCK
    in_order = [block for name in LIKELY + LIBRARIES for block in placed[name]]
    assert in_order == list(range(first, first + len(in_order)))  # side by side, in order
    assert all(min(placed[name]) >= first + len(in_order) for name in OTHERS)

    assert replayed_blocks(src) == (placed, result.image_size)
