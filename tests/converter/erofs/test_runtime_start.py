"""What a language runtime reads at start (its interpreter, Python's start-up modules and
compiled standard library and the libraries that links, Perl's strict and warnings) follows
the files nearly every start reads, in the order of the rules, each rule's in the tree's
order; sources, tests and files beyond the bounds stay where the source put them. The tree
stays the same, fsck.erofs passes, and a replay of the placement (`place_blocks`) tells
where each of them went."""

from __future__ import annotations

import os
from pathlib import Path

from converter.erofs.dir_inodes import DirectorySource
from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import Node, directory
from converter.erofs.likely_start import likely_start_files
from converter.erofs.runtime_start import (
    MAX_PROGRAM_BYTES,
    MAX_TOTAL_BYTES,
    runtime_start_files,
)
from tests.converter.erofs.placement import (
    names_of,
    placed_blocks,
    replayed_blocks,
    written_image,
)

BLOCK = 4096
STDLIB = "usr/lib/python3.11"
# In the order of their rules, each rule's in the tree's order.
RUNTIME = [
    "usr/bin/perl", "usr/bin/python3.11", "usr/local/bin/ruby",
    "usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
    f"{STDLIB}/encodings/__pycache__/__init__.cpython-311.pyc",
    f"{STDLIB}/encodings/__pycache__/utf_8.cpython-311.pyc",
    f"{STDLIB}/__pycache__/site.cpython-311.pyc",
    f"{STDLIB}/__pycache__/sitecustomize.cpython-311.pyc",
    "usr/lib/python3/dist-packages/distutils-precedence.pth",
    "usr/share/perl/5.36/strict.pm",
    f"{STDLIB}/__pycache__/enum.cpython-311.pyc",
    f"{STDLIB}/json/__pycache__/decoder.cpython-311.opt-1.pyc",
    f"{STDLIB}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
    "usr/lib/x86_64-linux-gnu/libffi.so.8.1.2", "usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6",
]
OTHERS = [
    f"{STDLIB}/enum.py", f"{STDLIB}/test/__pycache__/test_os.cpython-311.pyc",
    f"{STDLIB}/idlelib/__pycache__/editor.cpython-311.pyc",
    f"{STDLIB}/encodings/__pycache__/cp437.cpython-311.pyc",
    f"{STDLIB}/__pycache__/pydoc.cpython-311.pyc",
    f"{STDLIB}/lib-dynload/_codecs_jp.cpython-311-x86_64-linux-gnu.so",
    f"{STDLIB}/sqlite3/test/__pycache__/test_dump.cpython-311.pyc", "usr/bin/python3.11-config",
    "usr/bin/perldoc", "usr/share/perl/5.36/Carp.pm", "usr/local/lib/node_modules/npm/x.js",
    "home/app/__pycache__/main.cpython-311.pyc",
    "usr/local/lib/python3.11/site-packages/six/__pycache__/__init__.cpython-311.pyc",
]
SIZES = {"usr/local/bin/ruby": 5 * BLOCK, "usr/lib/x86_64-linux-gnu/libffi.so.8.1.2": BLOCK,
         "usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6": 6 * BLOCK}


def _tree(root: Path) -> Path:
    """The files above, each a few blocks, written in an order unlike a start's."""
    for number, name in enumerate(sorted(RUNTIME + OTHERS, reverse=True)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(SIZES.get(name, (number % 3 + 1) * BLOCK + 10)))
    return root


def test_picks_what_runtimes_read_at_start_in_the_order_of_the_rules(tmp_path: Path) -> None:
    source = DirectorySource(_tree(tmp_path / "src"))
    names = names_of(source.root)
    assert [names[node] for node in runtime_start_files(source.root)] == RUNTIME


def _file_tree(sizes: dict[bytes, int]) -> Node:
    root = directory()
    for path, size in sizes.items():
        *parents, name = path.split(b"/")
        node = root
        for part in parents:
            assert node.children is not None
            node = node.children.setdefault(part, directory())
        assert node.children is not None
        node.children[name] = Node(0o100644, size=size)
    return root


def test_a_program_too_large_stays_where_it_is() -> None:
    root = _file_tree({b"usr/bin/node": MAX_PROGRAM_BYTES + 1, b"usr/bin/python3.12": 100})
    names = names_of(root)
    assert [names[node] for node in runtime_start_files(root)] == ["usr/bin/python3.12"]


def test_the_libraries_of_extension_modules_only_with_a_standard_library() -> None:
    library = b"usr/lib/x86_64-linux-gnu/libssl.so.3"
    without = _file_tree({library: 100, b"usr/lib/x86_64-linux-gnu/libc.so.6": 100})
    assert runtime_start_files(without) == []
    assert names_of(without)[likely_start_files(without)[-1]] == library.decode()
    module = b"usr/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so"
    with_python = _file_tree({library: 100, module: 100})
    names = names_of(with_python)
    runtime = runtime_start_files(with_python)
    assert [names[node] for node in runtime] == [module.decode(), library.decode()]
    assert likely_start_files(with_python, runtime) == []


def test_picks_at_most_the_bound() -> None:
    size = 1 << 20
    root = _file_tree({b"usr/lib/python3.11/__pycache__/m%03d.cpython-311.pyc" % number: size
                       for number in range(MAX_TOTAL_BYTES // size + 10)})
    picked = runtime_start_files(root)
    assert sum(node.size for node in picked) <= MAX_TOTAL_BYTES < sum(
        node.size for node in picked) + size


def test_laid_out_after_the_likely_start_files(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    (src / "usr/lib/x86_64-linux-gnu/libc.so.6").write_bytes(os.urandom(3 * BLOCK))
    image = tmp_path / "image.erofs"
    result = written_image(src, image)
    with ErofsSource(image) as erofs:
        placed = placed_blocks(erofs)
        names = names_of(erofs.root)
        runtime = runtime_start_files(erofs.root)
        likely = [names[node] for node in likely_start_files(erofs.root, runtime)]
    assert likely == ["usr/lib/x86_64-linux-gnu/libc.so.6"]  # libpython goes with python
    first = result.metadata_size // BLOCK
    in_order = [block for name in likely + RUNTIME for block in placed[name]]
    assert in_order == list(range(first, first + len(in_order)))  # side by side, in order
    assert all(min(placed[name]) >= first + len(in_order) for name in OTHERS)

    assert replayed_blocks(src) == (placed, result.image_size)
