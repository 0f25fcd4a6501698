"""The files nearly every start of a Linux container reads, found by their names alone: they
go right after the metadata, so that a lazy start finds them in the first chunks together
instead of in one chunk each, wherever the layer's tar happened to put them.

A dynamically linked program's start runs the dynamic loader, which reads /etc/ld.so.cache
and maps the C library (and, for most runtimes, the math library); the C library then reads
the C locale's files, the gconv module cache, locale.alias, and small configuration files
in /etc (nsswitch.conf, passwd, localtime, ...). Which program starts is not known here, so
nothing else is guessed: every other file keeps the source's order. The picks are bounded
(`MAX_FILE_BYTES`, `MAX_TOTAL_BYTES`), so that an unusual layer cannot push its other data
far back. Pure: it only reads the tree.
"""

from __future__ import annotations

import re

from converter.inode_tree import Node, walk

MAX_FILE_BYTES = 4 << 20  # a C library is about 2 MiB
MAX_TOTAL_BYTES = 16 << 20
MAX_ETC_FILE_BYTES = 256 << 10  # ld.so.cache and small configuration, not data kept in /etc

# The library directories: /lib, /lib64, /usr/lib32 ... and their multiarch subdirectories.
_LIBRARY_DIR = rb"(?:usr/)?lib(?:32|64|x32)?(?:/[^/]+-linux-[^/]+)?/"
# In the order a start reads them: the loader, the C library, then its data.
_RULES: tuple[tuple[re.Pattern[bytes], int], ...] = (
    (re.compile(_LIBRARY_DIR + rb"(?:ld-linux[^/]*|ld64|ld-musl-[^/]*|ld)\.so[.0-9]*"),
     MAX_FILE_BYTES),
    (re.compile(rb"etc/ld\.so\.cache"), MAX_FILE_BYTES),
    (re.compile(_LIBRARY_DIR + rb"lib(?:c|m|pthread|dl|rt)\.so\.[0-9]+"), MAX_FILE_BYTES),
    (re.compile(rb"etc/[^/]+"), MAX_ETC_FILE_BYTES),
    (re.compile(rb"usr/lib/locale/C\.[^/]+/.+"), MAX_FILE_BYTES),
    (re.compile(_LIBRARY_DIR + rb"gconv/gconv-modules\.cache"), MAX_FILE_BYTES),
    (re.compile(rb"usr/share/locale/locale\.alias"), MAX_FILE_BYTES),
)


def likely_start_files(root: Node) -> list[Node]:
    """The regular files of the tree under `root` that nearly every start reads, in the
    order it reads them (see the module docstring); each once, at most MAX_TOTAL_BYTES."""
    found: list[list[Node]] = [[] for _ in _RULES]
    for path, node in walk(root):
        if not node.is_file or not node.size:
            continue
        for number, (pattern, limit) in enumerate(_RULES):
            if node.size <= limit and pattern.fullmatch(path):
                found[number].append(node)
                break
    picked: list[Node] = []
    seen: set[Node] = set()
    total = 0
    for node in (node for nodes in found for node in nodes):
        if node not in seen and total + node.size <= MAX_TOTAL_BYTES:
            seen.add(node)
            picked.append(node)
            total += node.size
    return picked


__all__ = ["MAX_TOTAL_BYTES", "likely_start_files"]
