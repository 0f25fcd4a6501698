"""The `lazyfs` command. Each subcommand lives in its own module of this package.

A module takes part by defining `register(subparsers)`, which adds its parsers and sets
`func` to a function taking the parsed arguments and returning the exit code, and by being
listed in `COMMANDS`. Only the module of the command given is imported (the others get a
parser that shows their help line), so `lazyfs --version` or `lazyfs mount` do not pay for
importing what `lazyfs convert` needs. A user error is raised as a `LazyfsError` (`UserError`
here) and printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import NoReturn

from lazyfs import __version__
from lazyfs.errors import LazyfsError

log = logging.getLogger("lazyfs")


class UserError(LazyfsError):
    """Something the user can fix: printed as one line, exit code 2."""


# command: (module of this package that registers it, its help line), in `--help` order.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("bench", "time a command's start in an image: lazy, with a prefetch list, eager, "
              "warm"),
    "cache": ("cache", "list, measure, trim or empty the disk cache"),
    "convert": ("convert", "convert a layer or a whole image into seekable EROFS"),
    "inspect": ("inspect", "show the layout, chunks and dm-verity parameters of a blob"),
    "mount": ("mount", "mount a seekable EROFS layer, or an image, fetched and verified on "
              "demand"),
    "mounts": ("mounts", "list active lazyfs mounts"),
    "pull": ("pull", "make a seekable EROFS image runnable by containerd, its layers mounted "
             "lazily"),
    "run": ("run", "run a command in an image, mounted lazily (or pulled eagerly), and time "
            "it"),
    "snapshotter": ("snapshotter", "serve containerd's snapshots API: seekable EROFS layers "
                    "mounted lazily"),
    "snapshotter-stats": ("snapshotter", "show what the snapshotter's remote layers fetched"),
    "stats": ("mounts", "show what a mount fetched, cached, verified"),
    "trace": ("trace", "summarize or plot the chunk accesses a --trace file holds"),
    "umount": ("mounts", "unmount a lazyfs mount"),
    "unpack": ("unpack", "decode a seekable EROFS blob into its raw EROFS image"),
    "verify": ("verify", "check every byte of a blob (and optionally its files against the "
               "source)"),
}


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


def parse_options_in_command(args: argparse.Namespace, prog: str,
                             add_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Options may also follow IMAGE_REF, up to `--`: parse them out of `args.command` (the
    positionals' REMAINDER), with the parser `add_options` makes; what follows `--` is the
    command."""
    rest = list(args.command)
    if "--" in rest:
        index = rest.index("--")
        options, args.command = rest[:index], rest[index + 1:]
    elif rest and rest[0].startswith("-"):
        options, args.command = rest, []
    else:
        return
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    add_options(parser)
    parser.parse_args(options, namespace=args)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `command` of that one (the others only list
    their help line, without importing their modules)."""
    parser = argparse.ArgumentParser(
        prog="lazyfs",
        description="Mount seekable EROFS container layers on demand, verified block by block.",
    )
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=CommandParser)
    modules = sorted({module for module, _ in COMMANDS.values()})
    if command is not None:
        modules = [COMMANDS[command][0]] if command in COMMANDS else []
    registered: set[str] = set()
    for name in modules:
        before = set(subparsers.choices)
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
        registered |= set(subparsers.choices) - before
    for name, (_, help_line) in COMMANDS.items():
        if name not in registered:
            subparsers.add_parser(name, help=help_line)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command named in `argv`: its first argument that is not an option (the options
    before the command take no values)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="lazyfs: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    # httpx logs every request at INFO: that is per-read noise below -vv.
    quiet_level = logging.DEBUG if verbosity >= 2 else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet_level)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so `kill` also gets the cleanup that leaves no partial files."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_at_once(code: int) -> NoReturn:
    """End the process now, output flushed, without the interpreter's teardown: tens of
    milliseconds with trio, pyfuse3 and httpx loaded, spent after a command's work is done
    and handed to a daemon, where the time until the shell's next command is the point."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    name = command if command in COMMANDS else args.command  # `run` keeps CMD in args.command
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
        print(f"lazyfs {name}: error: {exc}", file=sys.stderr)
        return 2
