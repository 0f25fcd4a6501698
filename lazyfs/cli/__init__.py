"""The `lazyfs` command. Each subcommand lives in its own module of this package.

A module takes part by defining `register(subparsers)`, which adds its parser and sets
`func` to a function taking the parsed arguments and returning the exit code. A user error is
raised as a `LazyfsError` (`UserError` here) and printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

from lazyfs import __version__
from lazyfs.errors import LazyfsError

log = logging.getLogger("lazyfs")


class UserError(LazyfsError):
    """Something the user can fix: printed as one line, exit code 2."""


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. With `intermixed` set (by the subcommand), its options may
    come anywhere among its positionals (`lazyfs mount URL --trace F MNT`), as
    `parse_intermixed_args` allows; otherwise it parses as usual."""

    intermixed = False
    _parsing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if not self.intermixed or self._parsing:
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args calls back into parse_known_args, twice.
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyfs",
        description="Mount seekable EROFS container layers on demand, verified block by block.",
    )
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=CommandParser)
    package = importlib.import_module(__name__)
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="lazyfs: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    # httpx logs every request at INFO: that is per-read noise below -vv.
    quiet_level = logging.DEBUG if verbosity >= 2 else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet_level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lazyfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into something like `head` that stopped reading: not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except LazyfsError as exc:
        print(f"lazyfs {args.command}: error: {exc}", file=sys.stderr)
        return 2
