"""`lazyfs convert SRC -o OUT`: write a seekable EROFS blob and its OCI descriptor.

SRC is a directory, a tar layer (plain, gzip or zstd, told apart by content) or a raw EROFS
image; for a whole image (OCI layout, image archive, registry reference) the new image goes
into an OCI layout and/or a registry, and its digest to stdout. Also home of the small helpers
the other blob commands share: finding a blob's descriptor, and a
progress line on stderr (drawn only on a terminal; a dozen lines do not justify a dependency).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from lazyfs.cli import UserError, sigterm_as_interrupt
from lazyfs.cli.sizes import parse_size
from lazyfs.eager.locate import find_descriptor
from lazyfs.sizes import human_size

if TYPE_CHECKING:
    from converter.layer import ConvertOptions, ConvertResult
    from lazyfs.format.descriptor import Descriptor
    from lazyfs.format.prefetch_list import PrefetchList

MAX_CHUNK_SIZE = 0xFFFFFFFF
# The converter's chunk size (the library's EncodeOptions keep containerd's 4 MiB). A lazy
# start reads scattered pieces of an image and each chunk it touches is fetched whole:
# measured with tools/bench_startup and tools/bench_run on a Debian + python3 image, 512 KiB
# chunks fetch less than half the bytes of 4 MiB ones for `python3 -c 'import json,
# sqlite3'` and start it fastest, with or without a prefetch list (1 MiB and 256 KiB come
# close); the blob grows by about 5 %. containerd's reader takes any chunk size; lazy mounts
# need a multiple of the dm-verity block size.
DEFAULT_CHUNK_SIZE = "512K"


class ProgressLine:
    """One self-overwriting status line on stderr, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._phase: str | None = None
        self._phase_start = 0.0
        self._drawn = 0.0

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, phase: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if phase != self._phase:
            self._phase, self._phase_start = phase, now
        elif now - self._drawn < 0.1 and (total is None or done < total):
            return
        self._drawn = now
        elapsed = max(now - self._phase_start, 1e-6)
        rate = f"{human_size(done / elapsed)}/s" if done else ""
        if total:
            fraction = min(done / total, 1.0)
            bar = "#" * int(fraction * 30)
            text = (f"{phase:<8} [{bar:<30}] {fraction:6.1%}  {human_size(done)} / "
                    f"{human_size(total)}  {rate}")
        elif done:
            text = f"{phase:<8} {human_size(done)}  {rate}"
        else:
            text = f"{phase:<8} ..."
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()

    def blob_progress(self, phase: str) -> Callable[[int, int], None]:
        """An adapter for `lazyfs.eager.check` progress callbacks."""
        return lambda done, total: self.update(phase, done, total)

    def close(self) -> None:
        if self.enabled and self._phase is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._phase = None


def write_stdout(text: str) -> None:
    """Write command output; a reader that went away (`| head`) is not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def blob_descriptor(blob: Path, explicit: Path | None) -> tuple[Descriptor | None,
                                                                Path | None]:
    """`find_descriptor` for a command: the descriptor and its path, or (None, None).
    Raises UserError when the descriptor cannot be read."""
    try:
        return find_descriptor(blob, explicit)
    except OSError as exc:
        raise UserError(f"{exc.filename}: cannot read descriptor: {exc.strerror}") from None


# --- convert -----------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a layer or a whole image into seekable EROFS",
        description="Convert a directory, a tar layer (plain, gzip or zstd) or a raw EROFS "
        "image into a seekable EROFS blob, and write its OCI descriptor beside it "
        "(X.blob -> X.descriptor.json, otherwise OUT.descriptor.json). A whole image (an OCI "
        "layout DIR[:TAG], an image archive, or a registry reference) is converted layer by "
        "layer into an OCI layout (--oci-layout) and/or pushed (--push).",
    )
    parser.add_argument("src", metavar="SRC",
                        help="directory, tar layer or EROFS image; or an image")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT",
                        help="the blob to write (a layer source)")
    parser.add_argument("--chunk-size", default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                        help=f"image bytes per zstd frame, K/M suffixes (default "
                        f"{DEFAULT_CHUNK_SIZE}: lazy starts fetch least; containerd's is 4M)")
    parser.add_argument("--zstd-level", type=int, default=3, metavar="N",
                        help="zstd level 1..22 (default 3)")
    parser.add_argument("--no-verity", action="store_true", help="write no dm-verity tree")
    parser.add_argument("--verity-block-size", default="4096", metavar="SIZE",
                        help="dm-verity data and hash block size (default 4096)")
    parser.add_argument("--verity-hash", choices=("sha256", "sha512"), default="sha512",
                        help="dm-verity hash (default sha512, as containerd)")
    parser.add_argument("--salt", metavar="HEX", default="",
                        help="dm-verity salt in hex (default none, as containerd)")
    parser.add_argument("--erofs-compression", metavar="COMP",
                        help="mkfs.erofs compressor, e.g. lz4hc,12 (adds -C 65536)")
    parser.add_argument("--erofs-layout", choices=("metadata-first", "interleaved"),
                        help="metadata-first (the default unless compressed): all inodes and "
                        "directories in the first chunks, then the files' data, so that lazy "
                        "path lookups fetch nothing else (chunk-based files: Linux >= 5.15); "
                        "interleaved: mkfs.erofs's own layout, metadata between the data")
    parser.add_argument("--erofs-writer", choices=("lazyfs", "mkfs"),
                        help="what writes the EROFS image: lazyfs (the default for "
                        "uncompressed images: streamed from the directory or tar, no size "
                        "limit) or mkfs (mkfs.erofs; always for --erofs-compression, "
                        "--erofs-layout interleaved and --mkfs-opts)")
    parser.add_argument("--startup-order", metavar="FILE",
                        help="a list recorded with `lazyfs run/mount --record FILE` from a "
                        "conversion of SRC (or SRC itself, a converted layer or image): the "
                        "file blocks that start read go right after the metadata, in the "
                        "order it read them, and the new layer carries its prefetch list")
    parser.add_argument("--mkfs-opts", metavar="OPTS", default="",
                        help='extra mkfs.erofs options, e.g. --mkfs-opts="--all-root -x-1"')
    parser.add_argument("--reproducible", action="store_true",
                        help="fixed UUIDs and timestamps: the same input gives the same bytes")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing blob and descriptor (or image name)")
    parser.add_argument("-j", "--jobs", type=int, default=0, metavar="N",
                        help="encoder threads for a layer (default: one per core); layers "
                        "converted at once for an image (default 2)")
    image = parser.add_argument_group("whole images")
    image.add_argument("--oci-layout", metavar="DIR[:TAG]",
                       help="write the converted image into this OCI layout")
    image.add_argument("--push", metavar="REF", help="push the converted image to this tag")
    image.add_argument("--platform", metavar="OS/ARCH", help="convert only this platform")
    image.add_argument("--creds", metavar="USER:PASS", help="registry credentials")
    image.add_argument("--push-creds", metavar="USER:PASS",
                       help="credentials for --push (default: --creds on the same registry)")
    image.add_argument("--insecure-registry", action="store_true",
                       help="plain HTTP to the registries")
    image.add_argument("--mirror", action="append", metavar="HOST",
                       help="a registry mirror to try first (repeatable)")
    image.add_argument("--prefetch", metavar="FILE",
                       help="a prefetch list (`lazyfs run --record FILE`) to carry in the "
                       "annotations of the layers it was recorded from; mounts use it")
    parser.set_defaults(func=run)


_IMAGE_OPTIONS = ("oci_layout", "push", "platform", "creds", "push_creds", "mirror",
                  "prefetch")


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """The ConvertOptions of the command line. Raises UserError for a bad value."""
    from converter.encoder import EncodeOptions
    from converter.erofs.writer import ErofsWriter
    from converter.layer import ConvertOptions
    from converter.layer_image import choose_writer
    from converter.mkfs import ErofsLayout

    chunk_size = parse_size(args.chunk_size, "--chunk-size")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise UserError(f"--chunk-size {args.chunk_size}: must be 1 byte to 4 GiB - 1")
    block = parse_size(args.verity_block_size, "--verity-block-size")
    if block < 512 or block > 512 * 1024 or block & (block - 1):
        raise UserError(f"--verity-block-size {block}: must be a power of two from 512 to 512K")
    try:
        salt = bytes.fromhex(args.salt)
    except ValueError:
        raise UserError(f"--salt {args.salt!r}: not hexadecimal") from None
    if len(salt) > 256:
        raise UserError(f"--salt: {len(salt)} bytes, dm-verity allows at most 256")
    if not 1 <= args.zstd_level <= 22:
        raise UserError(f"--zstd-level {args.zstd_level}: must be 1..22")
    if args.jobs < 0:
        raise UserError(f"--jobs {args.jobs}: must be >= 0")
    try:
        mkfs_opts = tuple(shlex.split(args.mkfs_opts))
    except ValueError as exc:
        raise UserError(f"--mkfs-opts {args.mkfs_opts!r}: {exc}") from None
    encode = EncodeOptions(
        chunk_size=chunk_size, zstd_level=args.zstd_level, verity=not args.no_verity,
        verity_data_block_size=block, verity_hash_block_size=block,
        verity_hash=args.verity_hash, verity_salt=salt, threads=args.jobs,
    )
    layout = None if args.erofs_layout is None else ErofsLayout(args.erofs_layout)
    writer = None if args.erofs_writer is None else ErofsWriter(args.erofs_writer)
    startup = None if args.startup_order is None else _recorded_list(args.startup_order,
                                                                     "--startup-order")
    if startup is not None and getattr(args, "prefetch", None) is not None:
        raise UserError("--startup-order and --prefetch: give one (a layer written in start-up "
                        "order carries its own prefetch list)")
    # Contradictions, before any work.
    choose_writer(writer, args.erofs_compression, layout, mkfs_opts, startup is not None)
    return ConvertOptions(encode=encode, erofs_compression=args.erofs_compression,
                          erofs_layout=layout, erofs_writer=writer, mkfs_opts=mkfs_opts,
                          reproducible=args.reproducible, force=args.force,
                          startup_order=startup,
                          startup_order_source=args.startup_order or "--startup-order")


def _recorded_list(path: str, option: str) -> PrefetchList:
    """The prefetch list in the file `path`. Raises UserError."""
    from lazyfs.format.prefetch_list import parse_prefetch_list

    try:
        return parse_prefetch_list(Path(path).read_bytes(), path)
    except OSError as exc:
        raise UserError(f"{option} {path}: {exc.strerror}") from None


def _image_options(args: argparse.Namespace) -> list[str]:
    used = [f"--{name.replace('_', '-')}" for name in _IMAGE_OPTIONS if getattr(args, name)]
    return used + (["--insecure-registry"] if args.insecure_registry else [])


def _is_image(args: argparse.Namespace) -> bool:
    """Whether SRC is a whole image. With -o and no image option, SRC is meant as a layer,
    so only an image on disk counts (a missing path is not taken for a registry name)."""
    from converter.image.sources import is_image_on_disk, is_image_source

    if args.output is not None and not _image_options(args):
        return is_image_on_disk(args.src)
    return is_image_source(args.src)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if _is_image(args):
        if args.output is not None:
            raise UserError(f"{args.src} is an image: write it with --oci-layout DIR[:TAG] "
                            "and/or --push REF, not -o")
        return run_image_convert(args, options)
    if _image_options(args):
        raise UserError(f"{', '.join(_image_options(args))}: only for a whole image; "
                        f"{args.src} is a layer")
    if args.output is None:
        raise UserError("give the blob to write: -o OUT")
    from converter.layer import convert_layer

    start = time.monotonic()
    with ProgressLine() as progress, sigterm_as_interrupt():
        result = convert_layer(Path(args.src), args.output, options, progress.update)
    write_stdout(summary(result, time.monotonic() - start))
    return 0


def _layout_target(text: str) -> tuple[Path, str | None]:
    """DIR or DIR:TAG (DIR itself may contain ':' when it exists). Raises UserError."""
    from lazyfs.format.reference import validate_tag

    path, sep, tag = text.rpartition(":")
    if not sep or "/" in tag or Path(text).exists() or not path:
        return Path(text), None
    try:
        return Path(path), validate_tag(tag)
    except ValueError as exc:
        raise UserError(f"OCI layout {text}: {exc}") from None


def run_image_convert(args: argparse.Namespace, layer_options: ConvertOptions) -> int:
    """Convert the whole image SRC; print the new image's digest and return 0.

    --creds counts for the push too when it goes to the source's registry. Progress lines go
    to stderr. Raises UserError, ConvertError and the fetch layer's errors (one line each).
    """
    import trio

    from converter.image.convert import ImageConvertResult, convert_image, parse_push_reference
    from converter.image.sources import RegistrySource, open_image_source
    from lazyfs.fetch.registry_options import RegistryOptions, parse_credentials
    from lazyfs.format.platform import parse_platform

    creds = None if args.creds is None else parse_credentials(args.creds, "--creds")
    push_creds = (None if args.push_creds is None
                  else parse_credentials(args.push_creds, "--push-creds"))
    insecure = args.insecure_registry
    layout, tag = _layout_target(args.oci_layout) if args.oci_layout else (None, None)
    try:
        platform = parse_platform(args.platform) if args.platform else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    image_source = open_image_source(args.src,
                                     RegistryOptions(creds, insecure, tuple(args.mirror or ())))
    prefetch = None
    if args.prefetch is not None:
        prefetch = _recorded_list(args.prefetch, "--prefetch")
    push = args.push
    if (push is not None and push_creds is None and isinstance(image_source, RegistrySource)
            and image_source.reference.registry == parse_push_reference(push).registry):
        push_creds = creds  # the same registry: the same account

    async def main() -> ImageConvertResult:
        async with image_source:
            return await convert_image(
                image_source, dest_layout=layout, push=push, layer_options=layer_options,
                platform=platform, jobs=args.jobs or 2, dest_tag=tag, overwrite=args.force,
                push_registry=RegistryOptions(push_creds, insecure),
                prefetch=prefetch, prefetch_source=args.prefetch or "",
            )

    print(trio.run(main).digest)
    return 0


def summary(result: ConvertResult, seconds: float) -> str:
    """The end-of-conversion summary: what went in, what came out, how long it took."""
    encoded = result.encoded
    annotations = encoded.annotations
    ratio = encoded.image_size / encoded.blob_size if encoded.blob_size else 0.0
    phases = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    rate = encoded.image_size / seconds / 1e6 if seconds > 0 else 0.0
    chunk_size = result.options.encode.chunk_size
    lines = [
        f"converted {result.source_kind.value} {result.source} -> {result.blob_path}",
        f"  image       {encoded.image_size} bytes ({human_size(encoded.image_size)}), "
        f"{encoded.image_digest}",
        f"  blob        {encoded.blob_size} bytes ({human_size(encoded.blob_size)}), "
        f"{encoded.blob_digest}",
        f"  ratio       {ratio:.2f} (image / blob)",
        f"  chunks      {encoded.chunk_count} of {human_size(chunk_size)}, chunk table at "
        f"{annotations.chunk_table_offset} ({annotations.chunk_digest})",
        f"  dm-verity   {annotations.root_digest or 'none'}"
        + (f" at {annotations.verity_offset}" if annotations.verity_offset is not None else ""),
        f"  descriptor  {result.descriptor_path}",
        *([f"  start-up    blocks first up to byte {result.startup_end} of the image; "
           f"prefetch list of {len(result.prefetch.chunks)} chunks in the descriptor"]
          if result.prefetch is not None else []),
        f"  time        {seconds:.1f} s ({phases}), {rate:.0f} MB/s of image",
    ]
    return "\n".join(lines) + "\n"
