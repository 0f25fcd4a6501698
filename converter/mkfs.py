"""Run erofs-utils (Debian 12 ships 1.5): build a raw EROFS image from a directory, check one.

Options, as containerd passes them: with a compressor (`lz4hc,12`) `-z<compressor>` and
`-C65536` (1.5 has `-C`: big physical clusters, read by kernels >= 5.13). xattrs need no
option: 1.5 keeps them by default (`-x` only tunes xattr sharing or, negative, drops them).

Reproducible images: the only varying bytes of a 1.5 image are the UUID and the build time
(in the superblock, and as the mtime of any inode newer than it). A fixed UUID is passed with
`-U`, and the build time with the SOURCE_DATE_EPOCH variable rather than `-T`: in 1.5, `-T`
overwrites the mtime of every inode whatever other option is given (`--preserve-mtime` does
not undo it), while SOURCE_DATE_EPOCH only clamps mtimes newer than it and keeps the rest.
Without a timestamp, reproducible mode uses one second after the newest mtime in the tree,
so no mtime changes. Directory order needs nothing: mkfs.erofs sorts entries by name.
A `-T` given in `extra_opts` is honoured as such (1.5 would otherwise let the variable win).

lazyfs's own writer (`converter.erofs.writer`) builds uncompressed images by default; this
module builds compressed and interleaved images, and any image with `--erofs-writer mkfs`.

Layout: mkfs.erofs writes each file's data as it walks the tree and places inodes in blocks
between the data, and each directory's entries after its whole subtree, so a path walk jumps
across the image: a lazy start pays one round trip per inode or directory it looks up. The
metadata-first layout (`--chunksize=4096`: chunk-based files, Linux >= 5.15) makes 1.5 write
the file data to a side file that it appends after all inodes and directories: every lookup
is answered from the first few chunks (about 0.5 % of a Debian root file system), file data
keeps the walk's order, and identical 4 KiB blocks are stored once. Its cost: no file tails
inlined in their inode (the padding compresses to nothing). Chunk-based files are never
compressed, so a compressed image keeps the interleaved layout. 1.5 stages the file data in
an unnamed temporary file in /tmp (glibc's tmpfile(): no variable moves it) and copies it into
the image with copy_file_range, which fails across file systems: an image for elsewhere is
built in /tmp and copied. When /tmp lacks the room, the default falls back to the interleaved
layout with a warning, and an explicit metadata-first request fails before mkfs runs. (1.5
calls chunk-based files experimental; the kernel has read them since 5.15, and every image
is checked by fsck.erofs and compared with its tree in the tests.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path

from converter.errors import ConvertError

# containerd's physical cluster size for compressed images.
PCLUSTER_BYTES = 65536
# Any fixed value makes images reproducible; this one is derived from the project name.
REPRODUCIBLE_UUID = str(uuid.uuid5(uuid.NAMESPACE_DNS, "reproducible.lazyfs"))
_OUTPUT_TAIL_CHARS = 2000
_COMPRESSOR_SPEC = re.compile(r"[a-z0-9]+(,[0-9]+)?")
# The EROFS block size: chunks of one block lose nothing to alignment and dedupe best.
METADATA_FIRST_CHUNK_BYTES = 4096
# Where mkfs.erofs 1.5 stages chunk-based file data, and the room it leaves there besides.
STAGING_DIR = Path("/tmp")
_STAGING_SPARE_BYTES = 64 * 1024 * 1024

log = logging.getLogger(__name__)


class ErofsLayout(Enum):
    """Where mkfs.erofs puts the metadata (see the module docstring)."""

    METADATA_FIRST = "metadata-first"  # inodes and directories first, then all file data
    INTERLEAVED = "interleaved"  # mkfs.erofs's default: metadata between the files' data


def layout_options(layout: ErofsLayout | None, compression: str | None,
                   extra_opts: Sequence[str]) -> list[str]:
    """The mkfs.erofs options for `layout` (None: metadata-first unless compressed). Raises
    ConvertError when metadata-first is asked for a compressed image; `--chunksize` among
    `extra_opts` is the caller's own choice and wins."""
    if any(opt.startswith("--chunksize") for opt in extra_opts):
        return []
    if layout is ErofsLayout.METADATA_FIRST and compression is not None:
        raise ConvertError("the metadata-first layout stores file data uncompressed (chunk-"
                           "based files): use --erofs-layout interleaved with a compressor")
    if layout is ErofsLayout.INTERLEAVED or compression is not None:
        return []
    return [f"--chunksize={METADATA_FIRST_CHUNK_BYTES}"]


def build_erofs(
    src_dir: Path,
    out_image: Path,
    *,
    compression: str | None = None,
    layout: ErofsLayout | None = None,
    extra_opts: Sequence[str] = (),
    reproducible: bool = False,
    timestamp: int | None = None,
) -> None:
    """Build the raw EROFS image `out_image` from the tree at `src_dir` with mkfs.erofs.

    `compression` is mkfs's `-z` argument (`lz4hc,12`; None: uncompressed). `layout` places
    the metadata (None: metadata-first unless compressed; see `layout_options`). `extra_opts`
    come last, so they override ours. `timestamp` (UNIX seconds) is the build time; newer
    mtimes are clamped to it. `reproducible` fixes the UUID too, so the same tree gives the
    same bytes. The image appears complete or not at all. Raises ConvertError with the tail
    of mkfs's output on failure.
    """
    if isinstance(extra_opts, str):
        raise TypeError("extra_opts is a sequence of arguments, not one string")
    tool = _tool("mkfs.erofs")
    if not src_dir.is_dir():
        raise ConvertError(f"{src_dir}: not a directory to build an EROFS image from")
    args = [tool, "--quiet"]
    if compression is not None:
        if not _COMPRESSOR_SPEC.fullmatch(compression):
            raise ConvertError(
                f"invalid EROFS compression {compression!r}: expected NAME[,LEVEL], e.g. lz4hc,12"
            )
        args += [f"-z{compression}", f"-C{PCLUSTER_BYTES}"]
    layout_args = layout_options(layout, compression, extra_opts)
    if layout_args and not _staging_fits(src_dir,
                                         explicit=layout is ErofsLayout.METADATA_FIRST):
        layout_args = []
    args += layout_args
    env = dict(os.environ)
    if any(opt.startswith("-T") for opt in extra_opts):
        # 1.5 lets SOURCE_DATE_EPOCH win over -T: an explicit -T must not be overridden.
        if timestamp is not None:
            raise ConvertError("give the build time either as timestamp or as -T, not both")
        env.pop("SOURCE_DATE_EPOCH", None)
    elif reproducible and timestamp is None and "SOURCE_DATE_EPOCH" not in env:
        timestamp = newest_mtime(src_dir) + 1
    if reproducible:
        args.append(f"-U{REPRODUCIBLE_UUID}")
    if timestamp is not None:
        if timestamp < 0:
            raise ConvertError(f"invalid timestamp {timestamp}: must be >= 0")
        env["SOURCE_DATE_EPOCH"] = str(timestamp)
    args += list(extra_opts)

    out_dir = out_image.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_image.name}.", suffix=".tmp", dir=out_dir)
    except OSError as e:
        raise ConvertError(f"{out_image}: cannot create: {e.strerror}") from None
    os.close(fd)
    build_name = tmp_name
    try:
        if layout_args and not _same_file_system(STAGING_DIR, out_dir):
            # 1.5 copies the staged data into the image with copy_file_range, which fails
            # (EIO) across file systems: build beside the staged data, then copy.
            fd, build_name = tempfile.mkstemp(prefix=".lazyfs-mkfs.", suffix=".tmp",
                                              dir=STAGING_DIR)
            os.close(fd)
        _run([*args, build_name, os.fspath(src_dir)], env, f"mkfs.erofs of {src_dir}")
        if build_name != tmp_name:
            shutil.copyfile(build_name, tmp_name)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out_image)
    except OSError as e:
        _unlink_quietly(tmp_name)
        raise ConvertError(f"{e.filename or out_image}: cannot write: {e.strerror}") from None
    except BaseException:
        _unlink_quietly(tmp_name)
        raise
    finally:
        if build_name != tmp_name:
            _unlink_quietly(build_name)


def _same_file_system(first: Path, second: Path) -> bool:
    try:
        return os.stat(first).st_dev == os.stat(second).st_dev
    except OSError:
        return False


def _staging_fits(src_dir: Path, *, explicit: bool) -> bool:
    """Whether STAGING_DIR has room for twice the data of the files under `src_dir` (rounded
    up to whole blocks): the staged data, and the image it is copied into, built there or on
    the same file system. No: raise ConvertError when the layout was asked for, else warn."""
    need = 2 * file_data_bytes(src_dir, METADATA_FIRST_CHUNK_BYTES)
    why = "mkfs.erofs 1.5 stages the file data there and copies it into the image beside it"
    try:
        free = shutil.disk_usage(STAGING_DIR).free
    except OSError as e:
        free, problem = 0, f"cannot be examined ({e.strerror})"
    else:
        problem = f"has {free >> 20} MiB free"
    if need + _STAGING_SPARE_BYTES <= free:
        return True
    message = (f"the metadata-first layout needs {need >> 20} MiB in {STAGING_DIR} ({why}), "
               f"which {problem}")
    if explicit:
        raise ConvertError(f"{message}: free space there or use --erofs-layout interleaved")
    log.warning("%s: building the interleaved layout instead", message)
    return False


def fsck_erofs(image: Path, *, extract_to: Path | None = None) -> None:
    """Check `image` with fsck.erofs, decoding every file's data (without `--extract`, 1.5
    checks only metadata). With `extract_to` (absent or empty), the tree is also written there;
    erofs-utils 1.5 restores owners and modes then, but neither xattrs nor hardlinks, and it
    loses setuid/setgid bits. Raises ConvertError with fsck's output when the image is bad."""
    args = [_tool("fsck.erofs")]
    if extract_to is not None:
        args.append(f"--extract={os.fspath(extract_to)}")
    else:
        args.append("--extract")  # decode all data without writing it anywhere
    _run([*args, os.fspath(image)], None, f"fsck.erofs of {image}")


def erofs_tool_version() -> str:
    """The version of the installed mkfs.erofs, e.g. "1.5"."""
    result = _completed([_tool("mkfs.erofs"), "-V"], None, "mkfs.erofs -V")
    found = re.search(r"mkfs\.erofs\s+(\S+)", result.stdout + result.stderr)
    if found is None:
        raise ConvertError(f"cannot tell the mkfs.erofs version from: {_tail(result)}")
    return found.group(1)


def newest_mtime(root: Path) -> int:
    """The newest mtime (whole seconds) of anything under `root`, `root` itself included."""
    return max(int(st.st_mtime) for st in _lstat_tree(root))


def file_data_bytes(root: Path, block: int) -> int:
    """The bytes of the regular files under `root`, each rounded up to `block`."""
    return sum(-(-st.st_size // block) * block for st in _lstat_tree(root)
               if stat.S_ISREG(st.st_mode))


def _lstat_tree(root: Path) -> Iterator[os.stat_result]:
    """The lstat of `root` and of everything under it. Raises ConvertError naming a path that
    cannot be read."""
    pending = [os.fspath(root)]
    try:
        yield os.lstat(root)
        while pending:
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(entry.path)
                    yield st
    except OSError as e:
        raise ConvertError(f"{e.filename}: cannot read: {e.strerror}") from None


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ConvertError(f"{name} not found: install erofs-utils")
    return found


def _completed(
    args: list[str], env: dict[str, str] | None, what: str
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args, env=env, capture_output=True, text=True, errors="replace", check=False
        )
    except OSError as e:
        raise ConvertError(f"{what}: cannot run {args[0]}: {e.strerror}") from None


def _run(args: list[str], env: dict[str, str] | None, what: str) -> None:
    result = _completed(args, env, what)
    if result.returncode != 0:
        raise ConvertError(f"{what} failed (exit status {result.returncode}): {_tail(result)}")


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr.strip() or result.stdout.strip() or "no output").replace("\n", " | ")
    return text[-_OUTPUT_TAIL_CHARS:]


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


__all__ = [
    "METADATA_FIRST_CHUNK_BYTES",
    "PCLUSTER_BYTES",
    "REPRODUCIBLE_UUID",
    "ErofsLayout",
    "build_erofs",
    "erofs_tool_version",
    "file_data_bytes",
    "fsck_erofs",
    "layout_options",
    "newest_mtime",
]
