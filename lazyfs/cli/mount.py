"""`lazyfs mount`: check the arguments and call the mount service (`lazyfs.mount.service`),
which resolves images and starts the daemon; `umount`, `stats` and `mounts` in `mounts.py`.

The mount's warm start and first requests begin before anything else (`lazyfs.startup.begin`),
so this module and the parsers it builds import nothing heavy: trio, pyfuse3 and httpx are
imported while those requests travel.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING

from lazyfs.cli import CommandParser, UserError, exit_at_once
from lazyfs.cli._images import (
    DEFAULT_CACHE_SIZE,
    REFERENCE_RULE,
    add_disk_cache_arguments,
    add_pull_argument,
    add_read_arguments,
    add_registry_arguments,
    begin_image_of,
    cache_path_of,
    cache_size_of,
    count_layers,
    disk_cache_of,
    low_speed_of,
    platform_of,
    registry_options,
    tuning_of,
    warm_bytes_of,
    writable_upper,
)
from lazyfs.cli._prefetch import add_prefetch_arguments, prefetch_options_of
from lazyfs.fetch.base import ReaderOptions
from lazyfs.fuse.phases import process_started_monotonic
from lazyfs.oci.names import is_image_reference
from lazyfs.startup.begin import EarlyStart, begin_layer

if TYPE_CHECKING:
    from lazyfs.mount.daemon import DaemonConfig
    from lazyfs.mount.service import MountOptions

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mount = subparsers.add_parser(
        "mount",
        help="mount a seekable EROFS layer, or an image, fetched and verified on demand",
        description="Mount the layer at SOURCE (an http(s) URL, file:// URL or path) read-only "
        "at MOUNTPOINT, an empty directory; or the image SOURCE names in a registry: every "
        "layer is mounted as EROFS and they are stacked with overlayfs at MOUNTPOINT, "
        "read-only unless --writable. The manifest is pinned by digest (printed), and it "
        "authenticates every layer. " + REFERENCE_RULE + " Further IMAGE_REF MOUNTPOINT "
        "pairs mount more images in the same daemon: layers they share are fetched and "
        "cached once (separate mount commands share nothing). Runs in the background once "
        "mounted.",
    )
    mount.add_argument("source", metavar="SOURCE", help="blob URL or path, or image reference")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                       help="empty directory (not with --block-only)")
    mount.add_argument("more", metavar="IMAGE_REF MOUNTPOINT", nargs="*",
                       help="more images to mount with the same daemon")
    mount.add_argument("--writable", metavar="DIR", help="images: keep changes in DIR/upper "
                       "(work dir DIR/work) instead of read-only")
    mount.add_argument("--descriptor", metavar="FILE|URL", help="the layer's OCI descriptor")
    mount.add_argument("--chunk-table-offset", type=int, metavar="OFFSET")
    mount.add_argument("--chunk-digest", metavar="sha512:HEX")
    mount.add_argument("--verity-offset", type=int, metavar="OFFSET")
    mount.add_argument("--root-digest", metavar="ALG:HEX")
    mount.add_argument("--insecure", action="store_true",
                       help="allow a layer without trusted digests")
    mount.add_argument("--block-only", metavar="DIR", help="only expose the layer's EROFS "
                       "image as a file in DIR (no EROFS mount)")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="stay in the foreground, log to stderr")
    mount.add_argument("--cache-size", default=DEFAULT_CACHE_SIZE, metavar="SIZE",
                       help=f"decoded chunk cache, bytes or with K/M/G (default "
                       f"{DEFAULT_CACHE_SIZE})")
    mount.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                       help="HTTP header for every request (repeatable), e.g. "
                       "'Authorization: Bearer ...'")
    mount.add_argument("--trace", metavar="FILE", help="append a JSON line per chunk access")
    mount.add_argument("--readahead", type=int, metavar="N",
                       help="chunks to read ahead after sequential reads (0: no reading "
                       "ahead at all, nor chunks that follow a miss)")
    mount.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more output")
    add_prefetch_arguments(mount)
    add_disk_cache_arguments(mount)
    add_pull_argument(mount)
    add_read_arguments(mount)
    add_registry_arguments(mount)
    mount.set_defaults(func=cmd_mount)
    if isinstance(mount, CommandParser):
        mount.intermixed = True  # `lazyfs mount URL --trace F MNT`


# -- mount --------------------------------------------------------------------------------------


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _HEADER_NAME.match(name) or "\n" in value or "\r" in value:
        raise UserError(f"--header {text!r}: expected 'Name: value'")
    return name, value


def _absolute(location: str | None) -> str | None:
    """Paths made absolute, so the daemon does not depend on the caller's directory."""
    if location is None or "://" in location:
        return location
    return os.path.abspath(location)


def _common_checks(args: argparse.Namespace) -> MountOptions:
    """The options every mount has, checked."""
    from lazyfs.mount.service import MountOptions

    cache_size = cache_size_of(args)
    tuning = tuning_of(args)
    trace = _absolute(args.trace)
    if trace is not None:
        try:
            with open(trace, "a"):
                pass
        except OSError as exc:
            raise UserError(f"--trace {trace}: {exc.strerror}") from None
    return MountOptions(cache_size, tuning, trace, disk_cache_of(args), low_speed_of(args),
                        prefetch=prefetch_options_of(args))


def begin(args: argparse.Namespace) -> EarlyStart:
    """The mount's warm start and first requests, begun now (`lazyfs.startup.begin`): for a
    layer URL (not one located by offsets given here), or for one image. Raises UserError
    (an unusable cache directory)."""
    if is_image_reference(args.source):
        return EarlyStart() if args.more else begin_image_of(
            args, args.source, first_frames=not args.block_only)
    if "://" not in args.source or args.chunk_table_offset is not None:
        return EarlyStart()
    try:
        headers = dict(parse_header(header) for header in args.header)
    except UserError:
        return EarlyStart()  # reported with the other checks
    return begin_layer(args.source, descriptor=_absolute(args.descriptor), headers=headers,
                       cache_dir=cache_path_of(args), warm_bytes=warm_bytes_of(args),
                       first_frame=not args.block_only)


def build_config(args: argparse.Namespace, early: EarlyStart | None = None) -> DaemonConfig:
    """The daemon's configuration for a layer blob or, if SOURCE is one, for images, with
    the answers of the `early` requests."""
    from lazyfs.mount.service import check_mountpoint, layer_config
    from lazyfs.startup.open import LayerSource

    if is_image_reference(args.source):
        return build_image_config(args, early)
    image_only = [
        flag
        for flag, value in (
            ("IMAGE_REF MOUNTPOINT", args.more),
            ("--writable", args.writable),
            ("--platform", args.platform),
            ("--creds", args.creds),
            ("--mirror", args.mirror),
            ("--insecure-registry", args.insecure_registry),
        )
        if value
    ]
    if image_only:
        raise UserError(f"{image_only[0]} applies to images; {args.source} is a layer blob")
    if args.block_only and args.mountpoint:
        raise UserError("--block-only DIR replaces MOUNTPOINT; give one of them")
    if not args.block_only and not args.mountpoint:
        raise UserError("give MOUNTPOINT (or --block-only DIR)")
    options = _common_checks(args)
    if not args.block_only and os.geteuid() != 0:
        raise UserError("lazyfs mount needs root: it mounts FUSE and EROFS file systems")
    mountpoint = check_mountpoint(args.block_only or args.mountpoint)
    source = LayerSource(
        blob=_absolute(args.source) or args.source,
        descriptor=_absolute(args.descriptor),
        chunk_table_offset=args.chunk_table_offset,
        chunk_digest=args.chunk_digest,
        verity_offset=args.verity_offset,
        root_digest=args.root_digest,
        insecure=args.insecure,
        reader_options=ReaderOptions(
            headers=dict(parse_header(header) for header in args.header)
        ),
    )
    return layer_config(source, mountpoint, block_only=bool(args.block_only), options=options,
                        early=early)


def build_image_config(args: argparse.Namespace,
                       early: EarlyStart | None = None) -> DaemonConfig:
    """Resolve the images (pinned manifests, seekable layers) and plan their mounts (the
    first one's with the answers of the `early` requests)."""
    from lazyfs.mount.service import MountpointError, check_mountpoint, image_config, resolve

    blob_only = [
        flag
        for flag, value in (
            ("--descriptor", args.descriptor),
            ("--chunk-table-offset", args.chunk_table_offset is not None),
            ("--chunk-digest", args.chunk_digest),
            ("--verity-offset", args.verity_offset is not None),
            ("--root-digest", args.root_digest),
            ("--header", args.header),
        )
        if value
    ]
    if blob_only:
        raise UserError(f"{blob_only[0]} applies to layer blobs; {args.source} is an image")
    pairs = [args.source, *([args.mountpoint] if args.mountpoint else []), *args.more]
    if args.block_only:
        if len(pairs) != 1:
            raise UserError("--block-only DIR replaces MOUNTPOINT; give one image")
        if args.writable:
            raise UserError("--writable needs an overlay; not with --block-only")
    elif len(pairs) % 2:
        raise UserError(f"give a MOUNTPOINT for {pairs[-1]}")
    references, targets = pairs[0::2], pairs[1::2]
    for reference in references[1:]:
        if not is_image_reference(reference):
            raise UserError(f"{reference}: only images can be mounted together, not layers")
    if args.writable and len(references) > 1:
        raise UserError("--writable works with one image at a time")
    options = _common_checks(args)
    if os.geteuid() != 0:
        raise UserError("lazyfs mount needs root: it mounts FUSE, EROFS and overlay file systems")
    mountpoints = [check_mountpoint(path) for path in targets or [args.block_only]]
    if len(set(mountpoints)) != len(mountpoints):
        raise MountpointError("each image needs a mountpoint of its own")
    writable = writable_upper(args.writable) if args.writable else None
    found = resolve(references, registry_options(args, deadline_s=args.read_timeout),
                    platform_of(args), insecure=args.insecure, disk=options.disk_cache,
                    early=early)
    return image_config(found, references, mountpoints, writable=writable,
                        block_only=bool(args.block_only), options=options)


def _pinned_lines(config: DaemonConfig) -> str:
    """What was mounted, by digest: `MOUNTPOINT: REF@DIGEST (PLATFORM, N layers)`."""
    return "".join(
        f"{image.mountpoint}: {image.reference.partition('@')[0]}@{image.manifest_digest} "
        f"({image.platform}, {count_layers(len(image.layers))})\n"
        for image in config.images
    )


def cmd_mount(args: argparse.Namespace) -> int:
    early = begin(args)
    from lazyfs.mount.service import log_path, serve, start

    config = build_config(args, early)
    config.command_started = process_started_monotonic()
    if args.foreground:

        def on_ready() -> None:
            sys.stdout.write(_pinned_lines(config))
            sys.stdout.flush()
            print(f"lazyfs: mounted {config.mountpoint}", file=sys.stderr)

        serve(config, on_ready=on_ready, early=early)
        return 0
    config.log_file = log_path(config.mountpoint)
    if getattr(args, "verbose", 0):
        print(f"lazyfs: daemon log: {config.log_file}", file=sys.stderr)
    start(config, early)
    sys.stdout.write(_pinned_lines(config))
    # The daemon owns the mount: nothing of this process needs tearing down.
    exit_at_once(0)
