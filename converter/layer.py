"""Convert one layer (directory, tar of any compression, raw EROFS image) into a seekable blob.

directory or tar -> lazyfs's EROFS writer (streamed, nothing extracted) -> encode; with
mkfs.erofs (compressed or interleaved images, or `erofs_writer` MKFS): directory -> mkfs.erofs
-> encode, tar -> safe extraction into a private temporary directory -> mkfs.erofs -> encode;
raw EROFS image -> encode. With a start-up order (a recorded prefetch list), lazyfs's writer
writes any of them (a seekable EROFS blob too) anew, the blocks the start read first, and the
descriptor carries the new layer's prefetch list. A layer lazyfs's writer wrote carries its
layout fingerprint (`dev.lazyfs.layout`), which recordings copy. The blob and its OCI
descriptor are written to temporary files beside their destinations and renamed into place
only when both are complete, so an interrupted or failed conversion leaves neither a partial
output nor its temporary space behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from converter.encoder import EncodeOptions, EncodeResult, encode_image
from converter.erofs.startup_order import startup_prefetch
from converter.erofs.writer import ErofsWriter
from converter.errors import ConvertError, UnsupportedSourceError
from converter.layer_image import (
    CountingReader,
    build_in_startup_order,
    build_layer_image,
    choose_writer,
)
from converter.mkfs import REPRODUCIBLE_UUID, ErofsLayout, build_erofs
from converter.source import SourceKind, detect_source, open_tar_stream
from converter.tar_extract import ExtractStats, extract_layer
from lazyfs.format.descriptor import (
    LABEL_UNCOMPRESSED,
    Descriptor,
    serialize_descriptor,
)
from lazyfs.format.descriptor import descriptor_path_for as descriptor_name_for
from lazyfs.format.prefetch_list import (
    ANNOTATION_LAYOUT,
    ANNOTATION_PREFETCH,
    LayerPrefetch,
    PrefetchList,
    PrefetchListError,
    serialize_prefetch_annotation,
)

Progress = Callable[[str, int, int | None], None]
"""Called with (phase, bytes done, total bytes or None when unknown); phases are "scan" (tar
bytes read, or none for a directory) and "write" (file data written) with lazyfs's writer,
"extract" (tar bytes read) and "mkfs" (no byte counts) with mkfs.erofs, then "encode" (image
bytes encoded)."""


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert: the blob's encoding, and how mkfs.erofs builds the image."""

    encode: EncodeOptions = field(default_factory=EncodeOptions)
    erofs_compression: str | None = None  # mkfs.erofs -z argument, e.g. "lz4hc,12"
    erofs_layout: ErofsLayout | None = None  # None: metadata-first unless compressed
    erofs_writer: ErofsWriter | None = None  # None: lazyfs's unless only mkfs.erofs can
    mkfs_opts: tuple[str, ...] = ()
    reproducible: bool = False  # fixed UUIDs and timestamps: same input, same bytes
    timestamp: int | None = None  # the image's build time (UNIX seconds)
    force: bool = False  # replace an existing blob and descriptor
    startup_order: PrefetchList | None = None  # a recorded list: its blocks first
    startup_order_source: str = "--startup-order"  # where that list came from


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion produced; `seconds` holds the wall time of each phase."""

    source: Path
    options: ConvertOptions
    source_kind: SourceKind
    blob_path: Path
    descriptor_path: Path
    descriptor: Descriptor
    encoded: EncodeResult
    extract_stats: ExtractStats | None
    seconds: dict[str, float]
    prefetch: LayerPrefetch | None = None  # the list it carries (written in start-up order)
    startup_end: int | None = None  # where its start-up blocks end in the raw image
    layout: str | None = None  # the layout fingerprint, when lazyfs's writer wrote the image


def descriptor_path_for(blob_path: Path) -> Path:
    """The descriptor beside a blob, where readers look for it: `X.blob` ->
    `X.descriptor.json`, any other name -> `NAME.descriptor.json` (the rule of
    `lazyfs.format.descriptor.descriptor_path_for`, which readers share)."""
    return blob_path.with_name(descriptor_name_for(blob_path.name))


def convert_layer(
    src: Path, out: Path, options: ConvertOptions | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert the layer at `src` into the seekable blob `out` and its descriptor beside it.

    Raises ConvertError (UnsupportedSourceError, UnsafeTarError) for unusable input or
    options, or when an output exists without `force`; KeyboardInterrupt passes through after
    cleaning up.
    """
    options = options or ConvertOptions()
    descriptor_path = descriptor_path_for(out)
    kind = detect_source(src)
    _check_outputs(src, out, descriptor_path, options.force)
    startup = options.startup_order
    if kind is SourceKind.SEEKABLE_EROFS and startup is None:
        raise UnsupportedSourceError(
            f"{src}: already a seekable EROFS blob; to re-encode it, `lazyfs unpack` it to a "
            "raw image and convert that"
        )
    if kind is SourceKind.EROFS_IMAGE and (options.erofs_compression or options.mkfs_opts
                                           or options.erofs_layout or options.erofs_writer):
        raise ConvertError(f"{src}: is already an EROFS image: --erofs-compression, "
                           "--erofs-layout, --erofs-writer and --mkfs-opts apply only to "
                           "directory and tar sources")
    writer = choose_writer(options.erofs_writer, options.erofs_compression,
                           options.erofs_layout, options.mkfs_opts, startup is not None)
    encode_options = options.encode
    if options.reproducible and encode_options.verity_uuid is None:
        encode_options = replace(encode_options, verity_uuid=uuid.UUID(REPRODUCIBLE_UUID).bytes)
    report = progress or (lambda phase, done, total: None)
    seconds: dict[str, float] = {}
    stats: ExtractStats | None = None
    startup_end: int | None = None
    layout: str | None = None
    with tempfile.TemporaryDirectory(prefix="lazyfs-convert-") as work_dir:
        work = Path(work_dir)
        if startup is not None:
            image = work / "image.erofs"
            built = build_in_startup_order(
                src, kind, image, work, prefetch=startup, where=options.startup_order_source,
                reproducible=options.reproducible, timestamp=options.timestamp, report=report)
            seconds.update(built.seconds)
            stats, startup_end = built.stats, built.result.startup_end
            layout = built.result.layout
        elif kind is SourceKind.EROFS_IMAGE:
            image = src
        elif writer is ErofsWriter.LAZYFS:
            image = work / "image.erofs"
            built = build_layer_image(src, kind, image, reproducible=options.reproducible,
                                      timestamp=options.timestamp, report=report)
            seconds.update(built.seconds)
            stats, layout = built.stats, built.result.layout
        else:
            tree = src
            if kind.is_tar:
                tree = work / "rootfs"
                tree.mkdir(mode=0o700)
                with _timed(seconds, "extract"):
                    stats = _extract(src, kind, tree, report)
            image = work / "image.erofs"
            report("mkfs", 0, None)
            with _timed(seconds, "mkfs"):
                build_erofs(tree, image, compression=options.erofs_compression,
                            layout=options.erofs_layout, extra_opts=options.mkfs_opts,
                            reproducible=options.reproducible, timestamp=options.timestamp)
            if kind.is_tar:
                # The extracted tree is no longer needed: free its space before encoding.
                shutil.rmtree(tree, ignore_errors=True)
        with _timed(seconds, "encode"):
            encoded, descriptor, prefetch = _write_outputs(
                image, out, descriptor_path, encode_options, options.force, report,
                startup_end, layout)
    return ConvertResult(src, options, kind, out, descriptor_path, descriptor, encoded, stats,
                         seconds, prefetch, startup_end, layout)


def _check_outputs(src: Path, out: Path, descriptor_path: Path, force: bool) -> None:
    """Fail before any work when the outputs cannot be written."""
    if out.is_dir():
        raise ConvertError(f"{out}: is a directory; give the blob's file name")
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent}: no such directory for the output")
    with contextlib.suppress(OSError):
        if out.exists() and out.samefile(src):
            raise ConvertError(f"{out}: is the source itself")
    if not force:
        for path in (out, descriptor_path):
            if path.exists() or path.is_symlink():
                raise ConvertError(f"{path} exists (use --force to overwrite it)")


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        seconds[phase] = time.monotonic() - start


def _extract(src: Path, kind: SourceKind, dest: Path, report: Progress) -> ExtractStats:
    with open_tar_stream(src, kind) as stream:
        counting = CountingReader(stream, report, "extract")
        return extract_layer(counting, dest)  # type: ignore[arg-type]


def _write_outputs(
    image: Path, out: Path, descriptor_path: Path, encode_options: EncodeOptions, force: bool,
    report: Progress, startup_end: int | None = None, layout: str | None = None,
) -> tuple[EncodeResult, Descriptor, LayerPrefetch | None]:
    """Encode `image` into a temporary blob beside `out`, write the descriptor likewise, then
    move both into place (never over existing files unless `force`). With `startup_end`, the
    descriptor carries the prefetch list of the chunks up to there, which is returned; with
    `layout`, the image's layout fingerprint."""
    temps: list[Path] = []
    try:
        blob_temp = _temp_beside(out, temps)
        try:
            with open(image, "rb") as source, open(blob_temp, "wb") as sink:
                image_size = os.fstat(source.fileno()).st_size
                encoded = encode_image(source, image_size, sink, encode_options,
                                       lambda done: report("encode", done, image_size))
                sink.flush()
                os.fsync(sink.fileno())
        except ValueError as exc:
            raise ConvertError(f"{image}: cannot encode: {exc}") from None
        except OSError as exc:
            raise ConvertError(f"{exc.filename or out}: {exc.strerror or exc}") from None
        annotations = encoded.annotations.to_annotations()
        annotations[LABEL_UNCOMPRESSED] = encoded.image_digest
        if layout:
            annotations[ANNOTATION_LAYOUT] = layout
        prefetch = None
        chunk_digest = encoded.annotations.chunk_digest
        if startup_end is not None and chunk_digest is not None:
            prefetch = startup_prefetch(chunk_digest, encoded.chunk_count,
                                        encode_options.chunk_size, startup_end)
            try:
                annotations[ANNOTATION_PREFETCH] = serialize_prefetch_annotation(prefetch)
            except PrefetchListError as exc:
                raise ConvertError(str(exc)) from None
        descriptor = Descriptor(encoded.media_type, encoded.blob_digest, encoded.blob_size,
                                annotations=annotations)
        descriptor_temp = _temp_beside(descriptor_path, temps)
        with open(descriptor_temp, "w", encoding="utf-8") as text:
            text.write(serialize_descriptor(descriptor))
            text.flush()
            os.fsync(text.fileno())
        _commit([(blob_temp, out), (descriptor_temp, descriptor_path)], force)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return encoded, descriptor, prefetch


def _temp_beside(path: Path, temps: list[Path]) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConvertError(f"{path}: cannot create: {exc.strerror}") from None
    os.fchmod(fd, 0o644)
    os.close(fd)
    temps.append(Path(name))
    return temps[-1]


def _commit(moves: list[tuple[Path, Path]], force: bool) -> None:
    """Move each temporary file to its destination; undo the earlier ones if one fails.

    Without `force` a hard link is used, which fails rather than replace a file that
    appeared while converting.
    """
    done: list[Path] = []
    try:
        for temp, dest in moves:
            try:
                if force:
                    os.replace(temp, dest)
                else:
                    os.link(temp, dest)
            except FileExistsError:
                raise ConvertError(f"{dest} exists (use --force to overwrite it)") from None
            except OSError as exc:
                raise ConvertError(f"{dest}: cannot write: {exc.strerror}") from None
            done.append(dest)
    except BaseException:
        for dest in done:
            dest.unlink(missing_ok=True)
        raise


__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "convert_layer",
    "descriptor_path_for",
]
