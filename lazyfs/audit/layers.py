"""One layer of an image, read whole: fetched (checked against its digest and size), every
byte checked as its format allows, its diff ID computed and its file tree read.

- seekable EROFS: `lazyfs.eager.check.check_blob` with the manifest's descriptor (every
  frame's SHA-512 and size, the chunk table and dm-verity tree against the annotations, every
  data block, the blob digest); the diff ID is the sha256 of the raw EROFS image it decodes
  to (the `containerd.io/uncompressed` digest containerd's differ computes); the tree is
  read from that image (`lazyfs.audit.erofs_files`), and fsck.erofs decodes every file of
  it as `lazyfs verify BLOB` has it do (`converter.fsck`: one too old for the image's
  compression is said, not a problem);
- raw EROFS: the diff ID is the blob's digest, the tree read from the blob, fsck.erofs run;
- tar (plain, gzip or zstd, told by content): the diff ID is the sha256 of the uncompressed
  tar, the tree `converter.tree.scan_tar`'s, with the directories the layer names itself
  (for applying it over lower layers, `lazyfs.audit.merge`).

What fails becomes a problem of the reading, never an exception, so one bad layer does not
hide what the others hold. The reading itself is plain blocking work for a worker thread.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from converter.errors import ConvertError, UnsupportedSourceError
from converter.fsck import FsckTool, check_erofs_image
from converter.image.selection import TAR_TYPES
from converter.image.sources import ImageSource
from converter.source import CHUNK_SIZE, detect_source, iter_layer, open_tar_stream
from converter.tar_members import plan_member
from converter.tree import scan_tar_each
from lazyfs.audit.erofs_files import TreeUnavailableError, erofs_tree
from lazyfs.audit.merge import LayerTree
from lazyfs.eager.check import check_blob
from lazyfs.erofs.reader import ErofsError
from lazyfs.errors import LazyfsError
from lazyfs.format import oci
from lazyfs.format.descriptor import Descriptor

Progress = Callable[[str, int, int | None], None]
"""Called with (what is being done, bytes done, bytes in all or None), from any thread."""


@dataclass
class LayerReading:
    """What reading one layer found. `diff_id` and `tree` are None when it failed. A tar
    layer's tree depends on the converter where the tar says nothing (the root's mode, a
    symlink's: `converter.tree.TarConvention`): `conventions` holds it by each convention's
    name, `tree` by the first (`lazyfs convert`'s); an EROFS layer's is its own, and
    `conventions` empty."""

    descriptor: Descriptor
    summary: str = ""
    diff_id: str | None = None
    tree: LayerTree | None = None
    conventions: dict[str, LayerTree] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unread: str | None = None  # why a sound EROFS layer's files could not be read here

    def candidates(self) -> dict[str, LayerTree]:
        """The trees the layer may stand for, by convention name ("" for an EROFS layer)."""
        if self.conventions:
            return self.conventions
        return {"": self.tree} if self.tree is not None else {}


async def read_layer(source: ImageSource, descriptor: Descriptor, work: Path, label: str,
                     *, threads: int, limiter: trio.CapacityLimiter, progress: Progress,
                     fsck: FsckTool | None) -> LayerReading:
    """Fetch the layer `descriptor` of `source` into the private directory `work` and read
    it (see the module docstring); `label` names it in progress; `fsck` checks EROFS images
    (None: not run). Leaves nothing in `work`."""
    reading = LayerReading(descriptor)
    blob = work / "layer.blob"
    work.mkdir()
    try:
        progress(f"{label}: fetching", 0, None)
        try:
            await source.fetch_blob(descriptor, blob)
        except LazyfsError as exc:
            reading.problems.append(f"blob: {exc}")
            return reading
        await trio.to_thread.run_sync(_read_blob, reading, blob, work, label, threads, progress,
                                      fsck, limiter=limiter)
        return reading
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_blob(reading: LayerReading, blob: Path, work: Path, label: str, threads: int,
               progress: Progress, fsck: FsckTool | None) -> None:
    media_type = reading.descriptor.media_type
    try:
        if media_type == oci.EROFS_LAYER_ZSTD:
            _read_seekable(reading, blob, work, label, threads, progress, fsck)
        elif media_type == oci.EROFS_LAYER:
            progress(f"{label}: reading files", 0, None)
            reading.diff_id = reading.descriptor.digest
            _read_erofs(reading, blob, work, "EROFS", label, progress, fsck)
        elif media_type in TAR_TYPES:
            _read_tar(reading, blob, label, progress)
        else:
            reading.problems.append(f"media type {media_type}: neither a tar nor an EROFS "
                                    "layer, its files cannot be read")
    except OSError as exc:
        reading.problems.append(f"{exc.filename or blob}: {exc.strerror or exc}")


def _read_seekable(reading: LayerReading, blob: Path, work: Path, label: str, threads: int,
                   progress: Progress, fsck: FsckTool | None) -> None:
    image = work / "image.erofs"
    try:
        with open(image, "wb") as output:
            report = check_blob(blob, reading.descriptor, output=output, threads=threads,
                                progress=lambda done, total: progress(f"{label}: checking",
                                                                      done, total))
    except LazyfsError as exc:  # a descriptor whose annotations cannot be used
        reading.problems.append(str(exc))
        return
    reading.problems += report.problems
    if not report.authenticated:
        reading.problems.append("its descriptor does not pin every metadata structure (no "
                                "chunk table digest, or a dm-verity frame without its root "
                                "digest): a lazy mount would refuse it")
    if not report.ok or report.metadata is None:
        return
    reading.diff_id = report.image_digest
    verity = "dm-verity ok" if report.verity_checked else "no dm-verity"
    progress(f"{label}: reading files", 0, None)
    frames = report.chunks_checked
    _read_erofs(reading, image, work,
                f"seekable EROFS, {frames} frame{'' if frames == 1 else 's'} ok, {verity}, "
                f"EROFS image {report.image_digest}", label, progress, fsck)
    image.unlink()


def _read_erofs(reading: LayerReading, image: Path, work: Path, what: str, label: str,
                progress: Progress, fsck: FsckTool | None) -> None:
    try:
        tree, how = erofs_tree(image, work)
    except (ErofsError, ConvertError) as exc:
        reading.problems.append(f"EROFS image: {exc}")
        return
    except TreeUnavailableError as exc:
        reading.unread = str(exc)
        reading.summary = f"{what}; files not read: {exc}"
    else:
        reading.tree = LayerTree(tree)
        reading.summary = f"{what}; {len(tree)} paths ({how})"
    if fsck is None:
        return
    progress(f"{label}: fsck.erofs", 0, None)
    try:
        outcome = check_erofs_image(image, fsck)
    except ConvertError as exc:
        reading.problems.append(f"fsck.erofs: {exc}")
        return
    if outcome.problem is not None:
        reading.problems.append(f"fsck.erofs: {outcome.problem}")
    elif outcome.not_checked is not None:
        reading.summary += f"; fsck.erofs not run: {outcome.not_checked}"
    else:
        reading.summary += "; fsck.erofs: every file decodes"


class _Hashing:
    """A read-only stream that hashes what is read through it and counts it."""

    def __init__(self, stream: BinaryIO, report: Callable[[int], None]) -> None:
        self._stream, self._report = stream, report
        self.hasher = hashlib.sha256()
        self.done = self._reported = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.hasher.update(data)
        self.done += len(data)
        if self.done - self._reported >= CHUNK_SIZE:  # tarfile reads 512 bytes at a time
            self._reported = self.done
            self._report(self.done)
        return data


def _read_tar(reading: LayerReading, blob: Path, label: str, progress: Progress) -> None:
    try:
        kind = detect_source(blob)
    except UnsupportedSourceError:
        kind = None
    if kind is None or not kind.is_tar:
        found = kind.value if kind else "neither a tar nor an EROFS image"
        reading.problems.append(f"media type {reading.descriptor.media_type}, but the content "
                                f"is {found}")
        return
    try:
        with open_tar_stream(blob, kind) as raw:
            stream = _Hashing(raw, lambda done: progress(f"{label}: reading tar", done, None))
            trees = scan_tar_each(stream)  # type: ignore[arg-type]
            while stream.read(CHUNK_SIZE):  # whatever follows the end of the archive
                pass
        with open_tar_stream(blob, kind) as raw:
            explicit = frozenset(plan.path for _, member in iter_layer(raw)
                                 if (plan := plan_member(member)).op == "dir")
    except ConvertError as exc:
        reading.problems.append(f"tar: {exc}")
        return
    reading.diff_id = "sha256:" + stream.hasher.hexdigest()
    reading.conventions = {convention.name: LayerTree(entries, explicit)
                           for convention, entries in trees.items()}
    reading.tree = next(iter(reading.conventions.values()))
    reading.summary = f"{kind.value}, tar {reading.diff_id}; {len(reading.tree.entries)} paths"


__all__ = ["LayerReading", "Progress", "read_layer"]
