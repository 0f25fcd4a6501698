"""The files a language runtime reads at every start, found by their names alone: they follow
the files nearly every Linux start reads (`converter.erofs.likely_start`), so that a lazy
start of an image built for one runtime, as most images are, finds them together in a few
chunks instead of spread over the layer wherever its tar put them.

First the interpreters: their binaries (Python, Perl, Ruby, Node.js) and the shared
libraries that hold the interpreter itself (libpython, libperl, libruby, Java's libjvm and
its launcher's libjli). Then what every Python start imports (`encodings` and its UTF-8
codec, `site` and what it imports, for the versions that do not freeze them, and
`sitecustomize`) and the `.pth` files `site` reads, and Perl's `strict` and `warnings`,
which nearly every script uses. Then the rest of Python's compiled standard library (.pyc in
`__pycache__`, the extension modules of `lib-dynload`) in the tree's order, apart from its
sources: a program imports a few dozen of its several hundred modules, another few dozen
each, and packed together they take three chunks of a Debian python3 instead of five
interleaved with the sources and tests. Left out of it are the modules no program imports
at start: the tests, IDLE, Tk, 2to3, pip's bundled wheels, the help texts, the codecs of
other character sets, the pure-Python fallbacks of C modules and the help and debugger.
Last, the shared libraries its extension modules link (libssl and libcrypto for ssl and
hashlib, libsqlite3, libffi for ctypes, ...), small first, which otherwise lie among all the
other libraries: when the tree holds such a standard library, they leave those
(`likely_start_files(root, placed_elsewhere)`), as the interpreters' own libraries do.

Every pick is bounded (`MAX_PROGRAM_BYTES` a file, `MAX_TOTAL_BYTES` in all: a Node.js or a
JVM too large for a chunk or two stays where it is), so that an unusual layer cannot push its
other data far back. Pure: it only reads the tree.
"""

from __future__ import annotations

import re

from converter.erofs.inode_tree import Node, first_within, walk

MAX_PROGRAM_BYTES = 24 << 20  # libpython3.x is 5-25 MiB, libjvm about 20 MiB; node is larger
MAX_TOTAL_BYTES = 48 << 20

_PREFIX = rb"(?:usr/(?:local/)?|opt/[^/]+/)?"
_LIBRARY_DIR = _PREFIX + rb"lib(?:32|64)?/(?:[^/]+-linux-[^/]+/)?"
_PYTHON = _PREFIX + rb"lib(?:64)?/python[23]\.[0-9]+/"
_PYC = rb"\.[^/]+\.pyc"  # .cpython-311.pyc, .cpython-311.opt-1.pyc, ...
# Not the standard library (installed packages), or imported by no program's start: tests,
# IDLE, Tk, 2to3, bundled wheels, help texts, demos, the codecs of other character sets,
# pure-Python fallbacks and tools (help, debugger).
_NOT_AT_START = (
    rb"(?!(?:site|dist)-packages/|(?:.+/)?tests?/"
    rb"|(?:idlelib|tkinter|lib2to3|ensurepip|pydoc_data|turtledemo)/"
    rb"|encodings/|(?:__pycache__/|lib-dynload/)(?:pydoc|doctest|pdb|turtle|_pydecimal|_pyio"
    rb"|_test|_ctypes_test|_xxtestfuzz|xxlimited|_codecs_)[.a-z_0-9]*\.)")

_EXTENSION_MODULES = re.compile(_PYTHON + _NOT_AT_START + rb"lib-dynload/[^/]+\.so")
# The libraries those link (ctypes, bz2, uuid, decimal, lzma, ssl and hashlib, sqlite3), small
# first, when the tree holds them: elsewhere they stay with the other shared libraries.
_EXTENSION_LIBRARIES = re.compile(
    _LIBRARY_DIR + rb"lib(?:ffi|bz2|uuid|mpdec|lzma|ssl|crypto|sqlite3)\.so[.0-9]*")

# In the order they are laid out.
_RULES: tuple[re.Pattern[bytes], ...] = (
    # The interpreters.
    re.compile(_PREFIX + rb"bin/(?:python[23](?:\.[0-9]+)?|perl(?:5[.0-9]*)?|ruby[.0-9]*"
               rb"|node|nodejs)"),
    re.compile(_LIBRARY_DIR + rb"lib(?:python[23]\.[0-9]+m?|perl|ruby)[.0-9-]*\.so[.0-9]*"),
    re.compile(_PREFIX + rb"lib/jvm/[^/]+/(?:jre/)?(?:bin/java|lib/(?:[^/]+/)?libjli\.so"
               rb"|lib/(?:[^/]+/)?server/libjvm\.so)"),
    # What every Python start imports, and the .pth files its site module reads.
    re.compile(_PYTHON + rb"encodings/__pycache__/(?:__init__|aliases|utf_8|latin_1)" + _PYC),
    re.compile(_PYTHON + rb"__pycache__/(?:site|os|stat|posixpath|genericpath|_collections_abc"
               rb"|_sitebuiltins|codecs|io|abc|sitecustomize)" + _PYC),
    re.compile(_PREFIX + rb"lib/python[23](?:\.[0-9]+)?/(?:site|dist)-packages/[^/]+\.pth"),
    # What nearly every Perl script uses.
    re.compile(_PREFIX + rb"(?:share|lib(?:/[^/]+-linux-[^/]+)?)/perl(?:5|-base)?(?:/[.0-9]+)?"
               rb"/(?:strict|warnings)\.pm"),
    # The rest of Python's compiled standard library, and the libraries it links.
    re.compile(_PYTHON + _NOT_AT_START + rb"(?:.+/)?__pycache__/[^/]+" + _PYC),
    _EXTENSION_MODULES,
    _EXTENSION_LIBRARIES,
)


def runtime_start_files(root: Node) -> list[Node]:
    """The regular files of the tree under `root` that a language runtime reads at start, in
    the order of the rules above (each rule's in the tree's order), at most MAX_TOTAL_BYTES;
    each once."""
    found: list[list[Node]] = [[] for _ in _RULES]
    for path, node in walk(root):
        if not node.is_file or not node.size or node.size > MAX_PROGRAM_BYTES:
            continue
        for number, pattern in enumerate(_RULES):
            if pattern.fullmatch(path):
                found[number].append(node)
                break
    extensions = found[_RULES.index(_EXTENSION_MODULES)]
    libraries = found[_RULES.index(_EXTENSION_LIBRARIES)]
    libraries[:] = sorted(libraries, key=lambda node: node.size) if extensions else []
    return first_within(found, MAX_TOTAL_BYTES)


__all__ = ["MAX_PROGRAM_BYTES", "MAX_TOTAL_BYTES", "runtime_start_files"]
