"""The background-fetch options `lazyfs mount` and `lazyfs run` share: --prefetch FILE,
--no-prefetch, --fill [--fill-rate RATE], --record FILE; checked here, so that a bad file is
one line from the command, not a daemon that failed to start."""

from __future__ import annotations

import argparse
import os

from lazyfs.cli import UserError
from lazyfs.cli.sizes import parse_size
from lazyfs.format.prefetch_list import PrefetchListError, parse_prefetch_list
from lazyfs.layer.tuning import DEFAULT_FILL_RATE_BYTES, PrefetchOptions

DEFAULT_FILL_RATE = f"{DEFAULT_FILL_RATE_BYTES >> 20}M"


def add_prefetch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("background fetching")
    group.add_argument(
        "--prefetch",
        metavar="FILE",
        help="fetch the chunks a prefetch list names (from --record) in the background, in "
        "order, while reads go first; replaces the lists images carry",
    )
    group.add_argument(
        "--no-prefetch",
        action="store_true",
        help="ignore the prefetch lists images carry in their layer annotations, and do not "
        "load what the disk cache holds of a layer ahead of reads",
    )
    group.add_argument(
        "--fill",
        action="store_true",
        help="fetch every chunk in the background (after the prefetch list), rate-capped, "
        "until the chunk cache is full",
    )
    group.add_argument(
        "--fill-rate",
        default=DEFAULT_FILL_RATE,
        metavar="RATE",
        help=f"bytes per second --fill fetches at most, K/M/G (default {DEFAULT_FILL_RATE})",
    )
    group.add_argument(
        "--record",
        metavar="FILE",
        help="write the chunks read, in first-read order, to FILE as a prefetch list when "
        "the mount ends",
    )


def uses_prefetch_options(args: argparse.Namespace) -> str | None:
    """The first background-fetch option given, for messages ("not with --eager")."""
    for flag, value in (("--prefetch", args.prefetch), ("--no-prefetch", args.no_prefetch),
                        ("--fill", args.fill), ("--record", args.record)):
        if value:
            return flag
    return None


def prefetch_options_of(args: argparse.Namespace) -> PrefetchOptions:
    """The PrefetchOptions of the command line; the list file read and parsed, the record
    file's directory checked. Raises UserError."""
    if args.prefetch and args.no_prefetch:
        raise UserError("--prefetch FILE and --no-prefetch: give one of them")
    prefetch_list = None
    if args.prefetch:
        try:
            with open(args.prefetch, "rb") as stream:
                data = stream.read()
        except OSError as exc:
            raise UserError(f"--prefetch {args.prefetch}: {exc.strerror}") from None
        try:
            prefetch_list = parse_prefetch_list(data, args.prefetch)
        except PrefetchListError as exc:
            raise UserError(str(exc)) from None
    rate = parse_size(args.fill_rate, "--fill-rate")
    if rate <= 0:
        raise UserError("--fill-rate must be positive")
    record = os.path.abspath(args.record) if args.record else None
    if record is not None:
        directory = os.path.dirname(record)
        if os.path.isdir(record) or not os.access(directory, os.W_OK):
            raise UserError(f"--record {args.record}: not a file in a writable directory")
    return PrefetchOptions(
        prefetch_list=prefetch_list,
        list_source=args.prefetch or "",
        use_image_lists=not args.no_prefetch,
        from_disk=not args.no_prefetch,
        fill=args.fill,
        fill_rate_bytes=rate,
        record_file=record,
    )
