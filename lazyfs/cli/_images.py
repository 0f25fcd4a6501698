"""What `lazyfs mount` and `lazyfs run` share for images in registries: the registry options,
the checks of the options both give a mount (cache sizes, disk cache, writable directory) and
an image's early start (`lazyfs.startup.begin`). Light to import: the parsers are built before
a mount begins, so what needs trio or httpx is imported where it is used."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.cache.defaults import CACHE_DIR_ENV, DEFAULT_CACHE_BYTES, default_cache_dir
from lazyfs.cli import UserError
from lazyfs.cli.sizes import parse_size
from lazyfs.fetch.base import SpeedLimit
from lazyfs.format.platform import Platform, parse_platform
from lazyfs.layer.tuning import DEFAULT_READ_TIMEOUT_S, ImageTuning
from lazyfs.oci.names import host_platform
from lazyfs.startup.cache_directory import StartupError
from lazyfs.startup.cache_directory import prepare_cache_directory as prepare_private_directory

if TYPE_CHECKING:
    from lazyfs.cache.disk import DiskCacheOptions
    from lazyfs.fetch.registry_options import RegistryOptions
    from lazyfs.startup.begin import EarlyStart

REFERENCE_RULE = (
    "SOURCE is an image reference ([REGISTRY/]REPOSITORY[:TAG][@DIGEST]) when it is not a URL "
    "(no '://'), names no existing file or directory, and parses as a reference; otherwise it "
    "is a layer blob (http(s) URL, file:// URL or path)."
)
DEFAULT_CACHE_SIZE = f"{DEFAULT_CACHE_BYTES >> 20}M"
DEFAULT_LOW_SPEED = f"{SpeedLimit().bytes_per_s >> 10}K"
DEFAULT_PULL = "missing"


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("images in registries")
    group.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the manifest to pick from a multi-platform image (default: this machine's)",
    )
    group.add_argument(
        "--creds",
        metavar="USER:PASS",
        help="registry credentials (default: those of `docker login`, else anonymous)",
    )
    group.add_argument(
        "--insecure-registry",
        action="store_true",
        help="talk plain HTTP to registries and mirrors (e.g. 127.0.0.1:5000)",
    )
    group.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="HOST",
        help="try this registry mirror first, for manifests and blobs "
        "(repeatable; content is checked against digests either way)",
    )


def add_disk_cache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("disk cache (shared by every mount on this machine)")
    add_cache_dir_argument(group)
    group.add_argument(
        "--disk-cache-size",
        metavar="SIZE",
        help="evict least recently used data beyond SIZE (K/M/G; default a tenth of the free "
        "space, at most 20G)",
    )
    group.add_argument(
        "--no-disk-cache", action="store_true", help="neither read nor write the disk cache"
    )


def add_cache_dir_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"the disk cache (default ${CACHE_DIR_ENV}, else /var/cache/lazyfs for root, "
        "~/.cache/lazyfs for other users)",
    )


def add_pull_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pull",
        choices=("always", "missing", "never"),
        default=DEFAULT_PULL,
        help="when to ask the registry which manifest an image's tag names: only when the disk "
        "cache remembers none (missing, the default, as `docker run` does), every time "
        "(always), or never (the disk cache alone)",
    )


def disk_cache_of(args: argparse.Namespace) -> DiskCacheOptions | None:
    """The disk cache options of the command line (None: --no-disk-cache). Raises UserError."""
    from lazyfs.cache.disk import DiskCacheOptions

    pull = getattr(args, "pull", "always")
    if args.no_disk_cache:
        if args.cache_dir or args.disk_cache_size:
            raise UserError("--no-disk-cache: not with --cache-dir or --disk-cache-size")
        if pull == "never":
            raise UserError("--pull never resolves images from the disk cache alone; "
                            "not with --no-disk-cache")
        return None
    size = None
    if args.disk_cache_size is not None:
        size = parse_size(args.disk_cache_size, "--disk-cache-size")
    directory = cache_directory_of(args)
    assert directory is not None
    return DiskCacheOptions(directory, size, pull)


def cache_directory_of(args: argparse.Namespace) -> str | None:
    """The disk cache directory of the command line (None: --no-disk-cache), created if
    missing and made private, before anything is read from it. Raises UserError for one that
    another user could change."""
    if args.no_disk_cache:
        return None
    return prepare_cache_directory(
        os.path.abspath(args.cache_dir) if args.cache_dir else default_cache_dir())


def prepare_cache_directory(directory: str) -> str:
    """`directory`, created if missing and made private, for a disk cache
    (`lazyfs.startup.begin.prepare_cache_directory`). Raises UserError."""
    try:
        return str(prepare_private_directory(directory))
    except StartupError as exc:
        raise UserError(str(exc)) from None


def begin_image_of(args: argparse.Namespace, text: str, *,
                   first_frames: bool = True) -> EarlyStart:
    """The warm start and early requests of the image `text`, begun now with the command's
    options (`lazyfs.startup.begin.begin_image`); none when the platform asked for is bad
    (reported with the other checks). Raises UserError (an unusable cache directory)."""
    # `lazyfs mount` and `lazyfs run` only: the other commands do not import the requests.
    from lazyfs.startup.begin import EarlyStart, begin_image

    try:
        platform = platform_of(args)
    except UserError:
        return EarlyStart()
    return begin_image(text, platform=platform, insecure_registry=args.insecure_registry,
                       mirrors=bool(args.mirror), pull=getattr(args, "pull", "always"),
                       cache_dir=cache_path_of(args), warm_bytes=warm_bytes_of(args),
                       first_frames=first_frames)


def cache_path_of(args: argparse.Namespace) -> Path | None:
    """`cache_directory_of`, as a path."""
    directory = cache_directory_of(args)
    return None if directory is None else Path(directory)


def warm_bytes_of(args: argparse.Namespace) -> int | None:
    """What a warm start may load: half the chunk cache (what the daemon would load ahead of
    reads); None when the daemon loads nothing ahead, or the size is bad (reported with the
    other checks)."""
    if args.no_prefetch:
        return None
    try:
        return cache_size_of(args) // 2
    except UserError:
        return None


def count_layers(count: int) -> str:
    return f"{count} layer" if count == 1 else f"{count} layers"


def add_read_arguments(parser: argparse.ArgumentParser) -> None:
    """How reads of a lazy mount behave when the network does not: timeouts and retries."""
    group = parser.add_argument_group("reads and faults")
    group.add_argument(
        "--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="SECONDS",
        help="a read returns its bytes or fails with EIO within this long, whatever the "
        "network does, and resolving an image asks its registry for no longer; on slow links "
        f"allow a chunk's time (default {DEFAULT_READ_TIMEOUT_S:g})",
    )
    group.add_argument(
        "--low-speed-limit", default=DEFAULT_LOW_SPEED, metavar="RATE",
        help="a fetch that receives less than RATE bytes per second (K/M suffixes) for "
        f"--low-speed-time is abandoned and retried (default {DEFAULT_LOW_SPEED})",
    )
    group.add_argument(
        "--low-speed-time", type=float, default=SpeedLimit().time_s, metavar="SECONDS",
        help=f"see --low-speed-limit (default {SpeedLimit().time_s:g})",
    )
    group.add_argument(
        "--retry-bad-after", type=float, default=ImageTuning().bad_retry_after_s,
        metavar="SECONDS",
        help="a chunk that failed verification (after refetching it) fails at once for this "
        "long, doubling while it keeps failing, then is fetched again "
        f"(default {ImageTuning().bad_retry_after_s:g})",
    )


def tuning_of(args: argparse.Namespace) -> ImageTuning:
    """The layers' ImageTuning from --readahead, --read-timeout and --retry-bad-after.
    Raises UserError."""
    if args.readahead is not None and args.readahead < 0:
        raise UserError("--readahead must be 0 or more")
    if not args.read_timeout > 0:
        raise UserError("--read-timeout must be more than 0 seconds")
    if not args.retry_bad_after >= 0:
        raise UserError("--retry-bad-after must be 0 seconds or more")
    defaults = ImageTuning()
    readahead = defaults.readahead_chunks if args.readahead is None else args.readahead
    return ImageTuning(readahead_chunks=readahead, read_timeout_s=args.read_timeout,
                       bad_retry_after_s=args.retry_bad_after)


def low_speed_of(args: argparse.Namespace) -> SpeedLimit:
    """--low-speed-limit and --low-speed-time. Raises UserError."""
    rate = parse_size(args.low_speed_limit, "--low-speed-limit")
    if not args.low_speed_time > 0:
        raise UserError("--low-speed-time must be more than 0 seconds")
    return SpeedLimit(rate, args.low_speed_time)


def cache_size_of(args: argparse.Namespace) -> int:
    """--cache-size in bytes. Raises UserError."""
    cache_size = parse_size(args.cache_size, "--cache-size")
    if cache_size <= 0:
        raise UserError("--cache-size must be positive")
    return cache_size


def writable_upper(directory: str) -> tuple[str, str]:
    """The (upper, work) directories of --writable DIR, created if missing. Raises UserError."""
    from lazyfs.mount.service import writable_dirs

    try:
        return writable_dirs(directory)
    except OSError as exc:
        raise UserError(f"--writable {directory}: {exc.strerror}") from None


def registry_options(args: argparse.Namespace, *,
                     deadline_s: float | None = None) -> RegistryOptions:
    """The RegistryOptions of the command line; with `deadline_s` (the --read-timeout of a
    command that resolves images), resolving an image asks its registry for at most that
    long, retries included. Raises CredentialsError, UserError."""
    # Registries need httpx: imported only when an image is named, not for a layer blob.
    from lazyfs.fetch.registry_options import RegistryOptions, parse_credentials

    if deadline_s is not None and not deadline_s > 0:
        raise UserError("--read-timeout must be more than 0 seconds")
    credentials = None if args.creds is None else parse_credentials(args.creds)
    return RegistryOptions(credentials, args.insecure_registry, tuple(args.mirror),
                           deadline_s=deadline_s)


def platform_of(args: argparse.Namespace) -> Platform:
    if args.platform is None:
        return host_platform()
    try:
        return parse_platform(args.platform)
    except ValueError as exc:
        raise UserError(f"--platform: {exc}") from None
