"""`lazyfs bench IMAGE_REF [options] -- CMD…`: the container start-up experiment.

Runs CMD in the image with `lazyfs run` in each mode asked (lazy: fetching only what CMD
reads; prefetch: lazily, replaying a prefetch list; eager: every layer pulled first; warm: a
second start from the disk cache), --repeat times each, interleaved, every cold run with empty
caches (the page cache dropped where the user may, a disk cache of the run's own), optionally
through an emulated link to the registry (--link RTT,RATE). Prints per mode the median, least
and greatest time to the command's exit, the time until mounted, the bytes and requests
fetched and the ratios against eager; --json, --csv and --plot write every run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from lazyfs.cli import UserError, parse_options_in_command, sigterm_as_interrupt
from lazyfs.cli._images import add_registry_arguments, platform_of, registry_options
from lazyfs.sizes import human_size

if TYPE_CHECKING:
    from lazyfs.bench.results import Environment, ModeSummary, RunResult

DEFAULT_MODES = "lazy,prefetch,eager,warm"
DEFAULT_REPEAT = 3


def _add_options(parser: argparse.ArgumentParser) -> None:
    from lazyfs.bench.results import MODE_HELP

    parser.add_argument(
        "--modes", default=DEFAULT_MODES, metavar="MODE,…",
        help="the modes to run, in this order: " + "; ".join(
            f"{mode}: {text}" for mode, text in MODE_HELP.items()) + f" (default {DEFAULT_MODES})")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, metavar="N",
                        help=f"runs of each mode, interleaved (default {DEFAULT_REPEAT})")
    parser.add_argument(
        "--link", metavar="RTT,RATE",
        help="reach the registry through an emulated link, shared by all connections, e.g. "
        "20ms,100mbit (units us/ms/s, bit/kbit/mbit/gbit; a registry in plain HTTP); default: "
        "the real network")
    parser.add_argument("--prefetch", metavar="FILE",
                        help="the prefetch list of the prefetch runs (default: the image's, "
                        "else one a first lazy run records)")
    parser.add_argument("--json", metavar="FILE", help="write every run and the environment "
                        "to FILE as JSON")
    parser.add_argument("--csv", metavar="FILE", help="write every run, a row each, to FILE")
    parser.add_argument("--plot", metavar="FILE", help="draw the start times and a lazy run's "
                        "fetches over time into FILE (.png or .svg; needs lazyfs[plot])")
    parser.add_argument("--insecure", action="store_true",
                        help="allow layers without trusted digests")
    parser.add_argument("--readahead", type=int, metavar="N",
                        help="chunks the lazy mounts read ahead (as lazyfs run's)")
    parser.add_argument("--cache-size", metavar="SIZE",
                        help="decoded chunk cache of the lazy mounts (as lazyfs run's)")
    add_registry_arguments(parser)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = subparsers.add_parser(
        "bench",
        usage="lazyfs bench [OPTIONS] IMAGE_REF [OPTIONS] -- CMD [ARG ...]",
        help="time a command's start in an image: lazy, with a prefetch list, eager, warm",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " ") if __doc__ else None,
    )
    bench.add_argument("image", metavar="IMAGE_REF", help="an image in a registry")
    bench.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD",
                       help="the command to time and its arguments")
    _add_options(bench)
    bench.set_defaults(func=cmd_bench)


def _registry_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The registry options every run of the bench is given."""
    options: list[str] = ["--insecure-registry"] if args.insecure_registry else []
    for flag, value in (("--platform", args.platform), ("--creds", args.creds)):
        if value is not None:
            options += [flag, str(value)]
    for mirror in args.mirror:
        options += ["--mirror", mirror]
    return tuple(options)


def _run_options(args: argparse.Namespace) -> tuple[str, ...]:
    """What every `lazyfs run` of the bench is given besides its mode's options."""
    options = list(_registry_args(args)) + (["--insecure"] if args.insecure else [])
    for flag, value in (("--readahead", args.readahead), ("--cache-size", args.cache_size)):
        if value is not None:
            options += [flag, str(value)]
    return tuple(options)


def _writable(path: str, option: str) -> None:
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path}: {exc.strerror}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    parse_options_in_command(args, "lazyfs bench", _add_options)
    from lazyfs.bench.experiment import BenchError, BenchRequest, run_bench
    from lazyfs.bench.link import LinkSpecError, parse_link
    from lazyfs.bench.results import MODES, write_csv, write_json

    if not args.command:
        raise UserError("give the command to time after --: lazyfs bench IMAGE -- CMD [ARG ...]")
    modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise UserError(f"--modes {args.modes}: a list of distinct modes of {', '.join(MODES)}")
    if args.repeat < 1:
        raise UserError("--repeat must be 1 or more")
    if args.prefetch and "prefetch" not in modes:
        raise UserError("--prefetch FILE is the list of the prefetch mode; add it to --modes")
    if args.prefetch and not os.path.isfile(args.prefetch):
        raise UserError(f"--prefetch {args.prefetch}: no such file")
    try:
        link = parse_link(args.link) if args.link else None
    except LinkSpecError as exc:
        raise UserError(f"--link {exc}") from None
    if args.plot:
        from lazyfs.bench.plot import PlotError, check_plot_file

        try:
            check_plot_file(args.plot)
        except PlotError as exc:
            raise UserError(f"--plot: {exc}") from None
    for path, option in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot")):
        if path:
            _writable(path, option)
    if os.geteuid() != 0:
        raise UserError("lazyfs bench needs root: its runs mount file systems and create "
                        "namespaces (lazyfs run)")
    request = BenchRequest(
        image=args.image, command=tuple(args.command), modes=modes, repeat=args.repeat,
        link=link, prefetch_file=args.prefetch,
        registry=registry_options(args), platform=platform_of(args), insecure=args.insecure,
        registry_args=_registry_args(args), run_options=_run_options(args),
        trace=bool(args.plot))
    progress = _ProgressLine()
    try:
        with sigterm_as_interrupt():
            outcome = run_bench(request, progress.show, done=progress.done)
    except BenchError as exc:
        progress.clear()
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        progress.clear()
        raise
    progress.clear()
    from lazyfs.bench.results import summarize

    print(format_table(outcome.environment, summarize(outcome.results, modes)))
    if args.json:
        write_json(args.json, outcome.environment, outcome.results)
    if args.csv:
        write_csv(args.csv, outcome.environment, outcome.results)
    if args.plot:
        from lazyfs.bench.plot import plot_bench

        plot_bench(args.plot, outcome.environment, outcome.results, outcome.traces)
    for path, what in ((args.json, "runs"), (args.csv, "runs"), (args.plot, "plot")):
        if path:
            print(f"lazyfs bench: {what} written to {path}", file=sys.stderr)
    return 0


class _ProgressLine:
    """Where the bench is, on stderr: one line rewritten on a terminal, else a line each."""

    def __init__(self) -> None:
        self.terminal = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = ""
        self._shown = False

    def show(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        line = f"lazyfs bench: {text}" + (f"  ({self.last})" if self.last else "") + (
            f"  [{elapsed:.0f} s]")
        if self.terminal:
            width = max(20, _terminal_width() - 1)
            sys.stderr.write("\r\033[K" + line[:width])
            self._shown = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self, result: RunResult) -> None:
        self.last = (f"last: {result.mode} {result.total_s:.2f} s, "
                     f"{human_size(result.bytes_fetched)}")

    def clear(self) -> None:
        if self.terminal and self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 80


def _seconds(value: float) -> str:
    return f"{value:.2f} s"


def format_table(environment: Environment, rows: list[ModeSummary]) -> str:
    """The table: two lines on the image, the command and the link, then a row per mode."""
    chunk = environment.chunk_size
    layers = len(environment.layers)
    head = (f"lazyfs bench: {environment.image} ({environment.image_digest[:19]}…, "
            f"{environment.platform}, {layers} layer{'s' if layers != 1 else ''}"
            + (f", {human_size(chunk)} chunks" if chunk else "") + ")")
    link = environment.link
    where = ("link " + (f"{link['rtt_ms']:g} ms RTT, " + (f"{link['rate_mbit']:g} Mbit/s"
                                                          if link["rate_mbit"] else "unshaped"))
             if link else "the real network")
    lines = [head, f"  {' '.join(environment.command)}; {where}; {environment.repeat} run"
             f"{'s' if environment.repeat != 1 else ''} per mode"
             + ("" if environment.page_cache_dropped else "; page cache NOT dropped")
             + (f"; prefetch list: {environment.prefetch_list}"
                if environment.prefetch_list else "")]
    columns = (f"  {'mode':<9} {'to exit':>8} {'min':>8} {'max':>8} {'mounted':>8} "
               f"{'fetched':>10} {'requests':>8} {'vs eager':>9} {'bytes':>7}")
    lines += [columns]
    for row in rows:
        speedup = "-" if row.speedup is None else (
            "1.0x" if row.mode == "eager" else f"{row.speedup:.1f}x")
        share = "-" if row.bytes_share is None else f"{100 * row.bytes_share:.0f}%"
        lines.append(
            f"  {row.mode:<9} {_seconds(row.total_s.median):>8} {_seconds(row.total_s.min):>8} "
            f"{_seconds(row.total_s.max):>8} {_seconds(row.mounted_s.median):>8} "
            f"{human_size(row.bytes_fetched.median):>10} {row.requests.median:>8.0f} "
            f"{speedup:>9} {share:>7}")
    lines.append("  (medians; min and max of the time to exit; vs eager: how many times faster "
                 "than eager; bytes: share of eager's)")
    return "\n".join(lines)
