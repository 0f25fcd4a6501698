"""Which program writes a layer's raw EROFS image, and how lazyfs's own writer is run.

lazyfs's writer (`converter.erofs.writer`) writes every uncompressed image by default: streamed
from the directory or the tar layer (read twice, nothing extracted), metadata first, in any
size. mkfs.erofs (`converter.mkfs`) writes what only it can: compressed images, its own
interleaved layout, images built with mkfs options; and any image with `--erofs-writer mkfs`.

In start-up order (`build_in_startup_order`), lazyfs's writer also takes an EROFS image (raw,
or a seekable blob it decodes first): the layer a recorded start read, written anew with the
blocks that start read right after the metadata (`converter.erofs.startup_order`).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from converter.erofs.dir_inodes import DirectorySource
from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import LayerSource, Node
from converter.erofs.startup_order import startup_by_replay, startup_from_image
from converter.erofs.tar_inodes import TarSource
from converter.erofs.writer import ErofsWriter, ImageOptions, ImageResult, write_image
from converter.errors import ConvertError
from converter.mkfs import REPRODUCIBLE_UUID, ErofsLayout
from converter.source import CHUNK_SIZE, SourceKind, open_tar_stream
from converter.tar_extract import ExtractStats
from lazyfs.format.prefetch_list import PrefetchList

Report = Callable[[str, int, int | None], None]
"""(phase, bytes done, total or None): "scan" (tar bytes read), "write" (file data)."""


def choose_writer(writer: ErofsWriter | None, compression: str | None,
                  layout: ErofsLayout | None, mkfs_opts: tuple[str, ...],
                  startup_order: bool = False) -> ErofsWriter:
    """The writer for these options (None: lazyfs's, unless only mkfs.erofs can do what they
    ask). Raises ConvertError when lazyfs's is asked for what only mkfs.erofs does, or a
    start-up order of mkfs.erofs."""
    needs_mkfs = [what for what, given in (
        ("--erofs-compression", compression is not None),
        ("--erofs-layout interleaved", layout is ErofsLayout.INTERLEAVED),
        ("--mkfs-opts", bool(mkfs_opts))) if given]
    if (writer is ErofsWriter.LAZYFS or startup_order) and needs_mkfs:
        raise ConvertError(f"{', '.join(needs_mkfs)}: only mkfs.erofs builds such images "
                           "(--erofs-writer mkfs); lazyfs's writer builds uncompressed, "
                           "metadata-first images" + (", as --startup-order needs"
                                                       if startup_order else ""))
    if startup_order and writer is ErofsWriter.MKFS:
        raise ConvertError("--startup-order: only lazyfs's writer lays blocks out in start-up "
                           "order, not --erofs-writer mkfs")
    if writer is None:
        return ErofsWriter.MKFS if needs_mkfs else ErofsWriter.LAZYFS
    return writer


def build_time_from_environment(timestamp: int | None) -> int | None:
    """`timestamp`, else SOURCE_DATE_EPOCH as mkfs.erofs honours it. Raises ConvertError for
    a value that is not a time."""
    if timestamp is not None:
        if timestamp < 0:
            raise ConvertError(f"invalid timestamp {timestamp}: must be >= 0")
        return timestamp
    text = os.environ.get("SOURCE_DATE_EPOCH")
    if not text:
        return None
    if not text.isdigit():
        raise ConvertError(f"SOURCE_DATE_EPOCH={text!r}: not a number of seconds")
    return int(text)


@dataclass
class Built:
    """What lazyfs's writer made of a layer: the image's numbers, the tar's entries (None for
    a directory or an image) and the seconds of each phase."""

    result: ImageResult
    stats: ExtractStats | None
    seconds: dict[str, float] = field(default_factory=dict)


class CountingReader:
    """A read-only stream that reports, as `phase`, how many bytes went through it."""

    def __init__(self, stream: BinaryIO, report: Report, phase: str) -> None:
        self._stream = stream
        self._report = report
        self._phase = phase
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._done += len(data)
        self._report(self._phase, self._done, None)
        return data


def layer_source(src: Path, kind: SourceKind, report: Report) -> LayerSource:
    """The source lazyfs's writer reads `src` through (a directory or a tar layer). Raises
    ConvertError (UnsafeTarError) for what it cannot take."""
    if kind is SourceKind.DIRECTORY:
        return DirectorySource(src)
    if not kind.is_tar:
        raise ConvertError(f"{src}: a {kind.value} source has no tree to write")
    first = True

    @contextlib.contextmanager
    def stream() -> Iterator[BinaryIO]:
        nonlocal first
        with open_tar_stream(src, kind) as raw:
            if first:  # the read of the entries; the data's is counted as written
                first = False
                yield CountingReader(raw, report, "scan")  # type: ignore[misc]
            else:
                yield raw

    return TarSource(stream)


def write_layer_image(source: LayerSource, image: Path, *, reproducible: bool,
                      timestamp: int | None, report: Report,
                      startup: Iterable[tuple[Node, int]] = ()) -> ImageResult:
    """Write `source`'s image with lazyfs's writer. Raises ConvertError, OSError."""
    options = ImageOptions(
        timestamp=build_time_from_environment(timestamp),
        uuid=uuid.UUID(REPRODUCIBLE_UUID).bytes if reproducible else uuid.uuid4().bytes)
    return write_image(source, image, options, startup=startup,
                       progress=lambda done, total: report("write", done, total))


def build_layer_image(src: Path, kind: SourceKind, image: Path, *, reproducible: bool,
                      timestamp: int | None, report: Report) -> Built:
    """Build the raw EROFS image of the directory or tar layer `src` with lazyfs's writer.
    Raises ConvertError (UnsafeTarError) for unusable input, naming the path or entry."""
    seconds: dict[str, float] = {}
    start = time.monotonic()
    report("scan", 0, None)
    source = layer_source(src, kind, report)
    seconds["scan"] = time.monotonic() - start
    start = time.monotonic()
    try:
        result = write_layer_image(source, image, reproducible=reproducible,
                                   timestamp=timestamp, report=report)
    except OSError as exc:
        raise ConvertError(f"{exc.filename or image}: cannot write: {exc.strerror}") from None
    seconds["write"] = time.monotonic() - start
    stats = source.stats if isinstance(source, TarSource) else None
    return Built(result, stats, seconds)


def decode_seekable(blob: Path, raw: Path) -> None:
    """Decode the seekable EROFS blob `blob` into the raw image `raw` (its frames in a row;
    the chunk table and dm-verity frames are skippable frames, which decode to nothing).
    Raises ConvertError for a blob that does not decode. Its digests are not checked here:
    `lazyfs verify` does, and an image's blobs are checked as they are fetched."""
    try:
        with open(blob, "rb") as source, open(raw, "wb") as sink:
            reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
            while piece := reader.read(CHUNK_SIZE):
                sink.write(piece)
    except zstandard.ZstdError as exc:
        raise ConvertError(f"{blob}: does not decode: {exc}") from None


def build_in_startup_order(src: Path, kind: SourceKind, image: Path, work: Path, *,
                           prefetch: PrefetchList, where: str, reproducible: bool,
                           timestamp: int | None, report: Report) -> Built:
    """Build the image of `src` (directory, tar, raw EROFS image, seekable EROFS blob) with
    lazyfs's writer, the blocks a recorded start read (`prefetch`, read from `where`) first.
    Raises NoStartupOrderError when the list fits the layer nowhere, ConvertError."""
    seconds: dict[str, float] = {}
    start = time.monotonic()
    if kind is SourceKind.SEEKABLE_EROFS:
        report("decode", 0, None)
        decoded = work / "recorded.erofs"
        decode_seekable(src, decoded)
        src, kind = decoded, SourceKind.EROFS_IMAGE
        seconds["decode"] = time.monotonic() - start
        start = time.monotonic()
    report("scan", 0, None)
    try:
        if kind is SourceKind.EROFS_IMAGE:
            with ErofsSource(src) as erofs:
                startup = startup_from_image(erofs, src.stat().st_size, prefetch, where)
                seconds["scan"] = time.monotonic() - start
                start = time.monotonic()
                result = write_layer_image(erofs, image, reproducible=reproducible,
                                           timestamp=timestamp, report=report, startup=startup)
            stats = None
        else:
            source = layer_source(src, kind, report)
            replayed = ImageOptions(timestamp=build_time_from_environment(timestamp))
            startup = startup_by_replay(source, replayed, prefetch, where)
            seconds["scan"] = time.monotonic() - start
            start = time.monotonic()
            result = write_layer_image(source, image, reproducible=reproducible,
                                       timestamp=timestamp, report=report, startup=startup)
            stats = source.stats if isinstance(source, TarSource) else None
    except OSError as exc:
        raise ConvertError(f"{exc.filename or image}: cannot write: {exc.strerror}") from None
    seconds["write"] = time.monotonic() - start
    return Built(result, stats, seconds)


__all__ = [
    "Built",
    "build_in_startup_order",
    "build_layer_image",
    "build_time_from_environment",
    "choose_writer",
    "decode_seekable",
    "layer_source",
    "write_layer_image",
]
