"""fsck.erofs: which one to run, what it can decode, and what its answer on an image means.

A fsck.erofs too old for an image's compression says nothing about the image: Debian 12's
erofs-utils 1.5 decodes lz4 (and lzma only when built with liblzma, which Debian's is not),
while deflate needs erofs-utils 1.7 and zstd 1.8, and on a valid zstd image 1.5 stops with
"unknown compression format 3". So the algorithms the image's superblock lists are compared
with what the tool decodes, before it runs: the list `fsck.erofs -V` prints (1.8 does), else
what its version can decode at all. A tool that cannot decode them is not run, and the check
is reported as not made, and why. Where the version leaves it open (lzma before 1.8) the tool
runs, and an answer that it cannot decode an algorithm the superblock lists ("unknown
compression format N", or "failed to decompress ...: Operation not supported") means the
same; any other failure is the image's.

Which fsck.erofs: the one given (`lazyfs verify --fsck-erofs`), else $LAZYFS_FSCK_EROFS, else
the erofs-utils that tools/setup builds into the Python environment lazyfs runs from
(`<sys.prefix>/erofs-utils/bin`: Debian 13's erofs-utils 1.8, from its source package), else
the one on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from converter.errors import ConvertError
from lazyfs.erofs.compression import algorithm_name, compression_algorithms
from lazyfs.format.errors import FormatError

ENV_FSCK_EROFS = "LAZYFS_FSCK_EROFS"
# The erofs-utils release that first decodes each algorithm. lzma came with 1.5, but only
# in builds with liblzma: before a version that lists its decompressors, it is tried.
FIRST_VERSION = {"lz4": (1, 0), "lzma": (1, 5), "deflate": (1, 7), "zstd": (1, 8)}
_MAYBE_BUILT_WITHOUT = frozenset({"lzma"})
_HEAD_BYTES = 4096
_VERSION = re.compile(r"fsck\.erofs\s+(?:\(erofs-utils\)\s+)?v?(\d+(?:\.\d+)*)\S*")
_DECOMPRESSORS = re.compile(r"available decompressors:\s*(.*)")
_UNKNOWN_FORMAT = re.compile(r"unknown compression format (\d+)")
_NOT_SUPPORTED = re.compile(r"failed to decompress.*Operation not supported")
_TIMEOUT_SECONDS = 3600
_TAIL_CHARS = 2000


def local_prefix() -> Path:
    """Where tools/setup installs erofs-utils for the Python environment running lazyfs."""
    return Path(sys.prefix) / "erofs-utils"


@dataclass(frozen=True)
class FsckTool:
    """One fsck.erofs: its path, version ("1.5", "1.8.6"; None when it did not say) and the
    decompressors it lists (None when its version lists none)."""

    path: str
    version: str | None
    decompressors: frozenset[str] | None

    @property
    def name(self) -> str:
        return f"fsck.erofs {self.version}" if self.version else f"fsck.erofs ({self.path})"

    def can_decode(self, algorithm: str) -> bool | None:
        """True or False when known; None when it depends on how the tool was built."""
        if self.decompressors is not None:
            return any(algorithm in name for name in self.decompressors)
        first = FIRST_VERSION.get(algorithm)
        if first is None or self.version is None:
            return None
        if _numbers(self.version) < first:
            return False
        return None if algorithm in _MAYBE_BUILT_WITHOUT else True


@dataclass(frozen=True)
class FsckOutcome:
    """What came of checking an image: `problem` (fsck's complaint) when it failed,
    `not_checked` (why) when this fsck.erofs cannot decode the image (`ran`: whether that was
    known only from its answer); neither when it passed."""

    problem: str | None = None
    not_checked: str | None = None
    ran: bool = True


def find_fsck_erofs(explicit: str | os.PathLike[str] | None = None) -> FsckTool:
    """The fsck.erofs to run (see the module docstring), with what `-V` says of it. Raises
    ConvertError when the one asked for, or any at all, cannot be found or run."""
    if explicit is not None:
        return _probe(os.fspath(explicit), "--fsck-erofs")
    from_env = os.environ.get(ENV_FSCK_EROFS)
    if from_env:
        return _probe(from_env, f"${ENV_FSCK_EROFS}")
    local = local_prefix() / "bin" / "fsck.erofs"
    if os.access(local, os.X_OK):
        return _probe(os.fspath(local), "the local erofs-utils")
    found = shutil.which("fsck.erofs")
    if found is None:
        raise ConvertError("fsck.erofs not found: install erofs-utils")
    return _probe(found, "PATH")


def check_erofs_image(image: Path, tool: FsckTool, *,
                      extract_to: Path | None = None) -> FsckOutcome:
    """Run `tool` on `image`, decoding every file (with `extract_to`, also writing the tree
    there), unless it cannot decode the image's compression. Raises ConvertError when the
    image is no EROFS image or cannot be read, or the tool cannot be run."""
    try:
        with open(image, "rb") as f:
            algorithms = compression_algorithms(f.read(_HEAD_BYTES))
    except OSError as exc:
        raise ConvertError(f"{image}: cannot read: {exc.strerror}") from None
    except FormatError as exc:
        raise ConvertError(f"{image}: {exc}") from None
    cannot = [a for a in algorithms if tool.can_decode(a) is False]
    if cannot:
        return FsckOutcome(not_checked=_cannot_decode(tool, cannot), ran=False)
    args = [tool.path, f"--extract={os.fspath(extract_to)}" if extract_to else "--extract",
            os.fspath(image)]
    result = _completed(args, _TIMEOUT_SECONDS)
    if result.returncode == 0:
        return FsckOutcome()
    output = result.stderr + result.stdout
    unsure = [a for a in algorithms if tool.can_decode(a) is None]
    refused = [algorithm_name(int(found)) for found in _UNKNOWN_FORMAT.findall(output)]
    if _NOT_SUPPORTED.search(output):
        refused += unsure
    declined = [a for a in unsure if a in refused]
    if declined:
        return FsckOutcome(not_checked=_cannot_decode(tool, declined, _one_line(output)))
    return FsckOutcome(problem=f"fsck.erofs of {image} failed (exit status "
                               f"{result.returncode}): {_one_line(output)}")


def _cannot_decode(tool: FsckTool, algorithms: list[str], answer: str | None = None) -> str:
    uses = " and ".join(algorithms)
    why = (f" (it answered: {answer})" if answer is not None
           else f" (it was built without {uses})" if tool.decompressors is not None else "")
    firsts = [FIRST_VERSION.get(a) for a in algorithms]
    known = [first for first in firsts if first is not None]
    built = f" built with {uses}" if why else ""
    able = ("a newer erofs-utils may" if len(known) < len(firsts)
            else f"erofs-utils >= {'.'.join(map(str, max(known)))}{built} can")
    return (f"this image uses {uses} compression, which {tool.name} cannot decode{why}; "
            f"{able}: give one with --fsck-erofs PATH or ${ENV_FSCK_EROFS}, or run tools/setup")


def _probe(path: str, where: str) -> FsckTool:
    if os.sep not in path:
        found = shutil.which(path)
        if found is None:
            raise ConvertError(f"{where}: {path} not found")
        path = found
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ConvertError(f"{where}: {path} is not an executable file")
    try:
        result = _completed([path, "-V"], 60)
    except ConvertError as exc:
        raise ConvertError(f"{where}: {exc}") from None
    text = result.stdout + result.stderr
    version = _VERSION.search(text)
    listed = _DECOMPRESSORS.search(text)
    decompressors = (frozenset(name.strip() for name in listed.group(1).split(",") if name.strip())
                     if listed else None)
    return FsckTool(path, version.group(1) if version else None, decompressors)


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _completed(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ConvertError(f"{args[0]}: no answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise ConvertError(f"cannot run {args[0]}: {exc.strerror}") from None


def _one_line(text: str) -> str:
    return (text.strip() or "no output").replace("\n", " | ")[-_TAIL_CHARS:]


__all__ = [
    "ENV_FSCK_EROFS",
    "FIRST_VERSION",
    "FsckOutcome",
    "FsckTool",
    "check_erofs_image",
    "find_fsck_erofs",
    "local_prefix",
]
