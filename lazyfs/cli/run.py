"""`lazyfs run IMAGE_REF [options] -- CMD…`: start a container from an image and measure it.

The image is mounted lazily (a daemon fetches and verifies only the chunks the command
reads), or with --eager pulled whole first (every blob downloaded, digest-checked and
decompressed, then the EROFS images mounted directly); either way the layers are stacked with
overlayfs under a temporary writable upper layer and CMD runs chrooted in it, in new mount and
PID namespaces, with /proc, a minimal /dev and a writable /tmp. Afterwards a report on stderr
gives the wall time from start to CMD's exit and, per layer, the bytes and requests fetched
and the share of its chunks and bytes. The exit status is CMD's. Everything is torn down on
the way out, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from lazyfs.cli import UserError, parse_options_in_command, sigterm_as_interrupt
from lazyfs.cli._images import (
    DEFAULT_CACHE_SIZE,
    add_disk_cache_arguments,
    add_pull_argument,
    add_read_arguments,
    add_registry_arguments,
    begin_image_of,
    cache_size_of,
    count_layers,
    disk_cache_of,
    low_speed_of,
    platform_of,
    registry_options,
    tuning_of,
)
from lazyfs.cli._prefetch import (
    add_prefetch_arguments,
    prefetch_options_of,
    uses_prefetch_options,
)
from lazyfs.fuse.phases import process_started_monotonic
from lazyfs.startup.begin import EarlyStart


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eager",
        action="store_true",
        help="download and decompress every layer first, then mount the EROFS images directly",
    )
    parser.add_argument(
        "--trace", metavar="FILE", help="append the lazy run's chunk accesses to FILE (JSON lines)"
    )
    parser.add_argument(
        "--writable",
        metavar="DIR",
        help="keep the container's changes in "
        "DIR/upper (default: a temporary upper layer, deleted afterwards)",
    )
    parser.add_argument("--report", metavar="FILE", help="also write the report to FILE as JSON")
    parser.add_argument(
        "--cache-size",
        default=DEFAULT_CACHE_SIZE,
        metavar="SIZE",
        help=f"decoded chunk cache of the lazy mount (default {DEFAULT_CACHE_SIZE})",
    )
    parser.add_argument(
        "--readahead", type=int, metavar="N",
        help="chunks the lazy mount reads ahead after sequential reads (0: none, nor chunks "
        "that follow a miss)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow layers without trusted digests"
    )
    add_prefetch_arguments(parser)
    add_disk_cache_arguments(parser)
    add_pull_argument(parser)
    parser.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more output"
    )
    add_read_arguments(parser)
    add_registry_arguments(parser)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser(
        "run",
        usage="lazyfs run [OPTIONS] IMAGE_REF [OPTIONS] [-- CMD [ARG ...]]",
        help="run a command in an image, mounted lazily (or pulled eagerly), and time it",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " ") if __doc__ else None,
    )
    run.add_argument("image", metavar="IMAGE_REF", help="a converted image in a registry")
    run.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- CMD",
        help="the command and its arguments (default: the image's entrypoint and command)",
    )
    _add_options(run)
    run.set_defaults(func=cmd_run)


def split_command(args: argparse.Namespace) -> None:
    """Options may also follow IMAGE_REF, up to `--`: parse them out of the command."""
    parse_options_in_command(args, "lazyfs run", _add_options)


def cmd_run(args: argparse.Namespace) -> int:
    # From the command's own start: its imports are part of the time a start takes.
    started = process_started_monotonic() or time.monotonic()
    split_command(args)
    if os.geteuid() != 0:
        raise UserError("lazyfs run needs root: it mounts file systems and creates namespaces")
    if args.eager and (args.trace or args.readahead is not None or uses_prefetch_options(args)):
        flag = ("--trace" if args.trace else "--readahead" if args.readahead is not None
                else uses_prefetch_options(args))
        raise UserError(f"{flag} applies to the lazy mount; not with --eager")
    if args.eager and args.pull == "never":
        raise UserError("--pull never: an eager run downloads every layer from the registry")
    # A lazy run's warm start and first requests begin before the rest of lazyfs is imported.
    early = EarlyStart() if args.eager else begin_image_of(args, args.image)
    # What only the run itself needs comes after: the warm start loads meanwhile.
    from lazyfs.container.run import RunRequest, prepare, run
    from lazyfs.mount.service import MountOptions

    cache_size = cache_size_of(args)
    trace = os.path.abspath(args.trace) if args.trace else None
    for path in (trace, args.report):
        if path is not None:
            try:
                with open(path, "a"):
                    pass
            except OSError as exc:
                raise UserError(f"{path}: {exc.strerror}") from None
    request = RunRequest(
        reference=args.image,
        command=tuple(args.command),
        registry=registry_options(args, deadline_s=args.read_timeout),
        platform=platform_of(args),
        eager=args.eager,
        insecure=args.insecure,
        writable=args.writable,
        mount=MountOptions(cache_size, tuning_of(args), trace, disk_cache_of(args),
                           low_speed_of(args), prefetch=prefetch_options_of(args)),
    )
    recorded_before = _modified(args.record)
    prepared = prepare(request, early)
    image = prepared.image
    print(
        f"lazyfs run: {image.pinned} ({image.platform}, {count_layers(len(image.layers))}), "
        f"{request.mode}",
        file=sys.stderr,
        flush=True,
    )
    with sigterm_as_interrupt():
        report = run(prepared, started=started, notify=_notify, early=early)
    from lazyfs.cli._run_report import format_report  # once the command has run

    sys.stderr.write(format_report(report))
    if args.record and _modified(args.record) not in (None, recorded_before):
        _notify(f"prefetch list written to {args.record}")
    if args.report:
        Path(args.report).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report.exit_code


def _modified(path: str | None) -> int | None:
    """When `path` was last written (ns), None if it does not exist."""
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def _notify(message: str) -> None:
    print(f"lazyfs run: {message}", file=sys.stderr)
