"""The files nearly every start of a Linux container reads, found by their names alone: they
go right after the metadata, so that a lazy start finds them in the first chunks together
instead of in one chunk each, wherever the layer's tar happened to put them.

A dynamically linked program's start runs the dynamic loader, which reads /etc/ld.so.cache
and maps the C library (and, for most runtimes, the math library); the C library then reads
the C locale's files, the gconv module cache, locale.alias, and small configuration files
in /etc (nsswitch.conf, passwd, ...) and the time zone /etc/localtime names (most often a
symlink into /usr/share/zoneinfo). The picks are bounded (`MAX_FILE_BYTES`,
`MAX_TOTAL_BYTES`), so that an unusual layer cannot push its other data far back.

Which program starts is not known here, but it maps a few more shared libraries: the other
shared libraries of the library directories follow, the small ones first. A start needs a
handful of them, and most are small (compression, XML, SELinux, PCRE ...): packed together
they share a few chunks instead of taking one each across the whole library directory, and
the large ones go after them. What a language runtime reads at start follows
(`converter.erofs.runtime_start`); every other file keeps the source's order. Pure: it only
reads the tree.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Collection

from converter.erofs.inode_tree import Node, first_within, walk

MAX_FILE_BYTES = 4 << 20  # a C library is about 2 MiB
MAX_TOTAL_BYTES = 16 << 20
MAX_ETC_FILE_BYTES = 256 << 10  # ld.so.cache and small configuration, not data kept in /etc
MAX_SYMLINKS = 8
LOCALTIME = b"etc/localtime"

# The library directories: /lib, /lib64, /usr/lib32 ... and their multiarch subdirectories.
_LIBRARY_DIR = rb"(?:usr/)?lib(?:32|64|x32)?(?:/[^/]+-linux-[^/]+)?/"
_SHARED_LIBRARY = re.compile(_LIBRARY_DIR + rb"lib[^/]*\.so(?:\.[0-9]+)*")
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


def likely_start_files(root: Node, placed_elsewhere: Collection[Node] = ()) -> list[Node]:
    """The regular files of the tree under `root` that nearly every start reads, in the
    order it reads them (at most MAX_TOTAL_BYTES), then the other shared libraries, the
    small ones first (see the module docstring), but those of `placed_elsewhere`; each
    once."""
    found: list[list[Node]] = [[] for _ in _RULES]
    libraries: list[Node] = []
    for path, node in walk(root):
        if not node.is_file or not node.size:
            continue
        for number, (pattern, limit) in enumerate(_RULES):
            if node.size <= limit and pattern.fullmatch(path):
                found[number].append(node)
                break
        else:
            if _SHARED_LIBRARY.fullmatch(path):
                libraries.append(node)
    zone = resolve(root, LOCALTIME)
    if zone is not None and zone.is_file and zone.size and zone.size <= MAX_ETC_FILE_BYTES:
        found[-1].append(zone)
    picked = first_within(found, MAX_TOTAL_BYTES)
    seen = set(picked)
    libraries.sort(key=lambda node: node.size)  # stable: the tree's order among equals
    for node in libraries:
        if node not in seen and node not in placed_elsewhere:
            seen.add(node)
            picked.append(node)
    return picked


def resolve(root: Node, path: bytes) -> Node | None:
    """The node `path` (relative to `root`) names, symlinks followed as the kernel would in
    a container of this tree alone; None when it names nothing (or too many symlinks)."""
    names = [name for name in path.split(b"/") if name]
    parents: list[Node] = []
    node = root
    hops = 0
    while names:
        name = names.pop(0)
        if name == b".":
            continue
        if name == b"..":
            node = parents.pop() if parents else root
            continue
        child = (node.children or {}).get(name)
        if child is None:
            return None
        if stat.S_ISLNK(child.mode) and child.target is not None:
            hops += 1
            if hops > MAX_SYMLINKS:
                return None
            target = child.target
            if target.startswith(b"/"):
                parents, node = [], root
            names = [part for part in target.split(b"/") if part] + names
            continue
        parents.append(node)
        node = child
    return node


__all__ = ["MAX_TOTAL_BYTES", "likely_start_files", "resolve"]
