"""`lazyfs trace summary FILE` and `lazyfs trace plot FILE OUT`: what a `--trace` file of
`lazyfs mount` or `lazyfs run` holds. The summary counts, per layer and in all, the chunk
accesses (cache hits, fetches, disk cache loads, failed checks), the chunks and bytes, the
fetches by reason, the fetch latencies, and shows the hot spots over each layer's chunks; the
plot draws the bytes fetched over time, the accesses over the blob and the latencies.
"""

from __future__ import annotations

import argparse
import json
import sys

from lazyfs.bench.trace import LayerSummary, TraceError, TraceEvent, TraceSummary, heat_strip
from lazyfs.cli import UserError
from lazyfs.sizes import human_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trace = subparsers.add_parser(
        "trace", help="summarize or plot the chunk accesses a --trace file holds",
        description=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    actions = trace.add_subparsers(dest="action", metavar="ACTION", required=True)
    summary = actions.add_parser("summary", help="chunks, bytes, latencies and hot spots")
    summary.add_argument("file", metavar="FILE", help="a trace (JSON lines)")
    summary.add_argument("--json", action="store_true", help="the summary as JSON")
    summary.set_defaults(func=cmd_summary)
    plot = actions.add_parser("plot", help="draw the trace into OUT (.png or .svg; needs "
                              "lazyfs[plot])")
    plot.add_argument("file", metavar="FILE", help="a trace (JSON lines)")
    plot.add_argument("out", metavar="OUT", help="the plot file, .png or .svg")
    plot.set_defaults(func=cmd_plot)


def _read(path: str) -> list[TraceEvent]:
    from lazyfs.bench.trace import read_trace

    try:
        return read_trace(path)
    except TraceError as exc:
        raise UserError(str(exc)) from None


def cmd_summary(args: argparse.Namespace) -> int:
    from lazyfs.bench.trace import summarize

    events = _read(args.file)
    summary = summarize(events)
    if args.json:
        json.dump(summary.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_summary(args.file, summary))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lazyfs.bench.plot import PlotError, check_plot_file, plot_trace

    try:
        check_plot_file(args.out)
    except PlotError as exc:
        raise UserError(str(exc)) from None
    events = _read(args.file)
    try:
        plot_trace(args.out, events, title=args.file)
    except OSError as exc:
        raise UserError(f"{args.out}: {exc.strerror}") from None
    print(f"lazyfs trace: plot written to {args.out}", file=sys.stderr)
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(summary: LayerSummary, width: int) -> str:
    events = summary.events
    latency = summary.latency_ms
    return (f"  {summary.layer:<{width}} {summary.accesses:>8} {events.get('hit', 0):>6} "
            f"{events.get('fetch', 0):>7} {events.get('disk', 0):>6} {events.get('bad', 0):>4} "
            f"{summary.chunks_touched:>7} {human_size(summary.bytes_fetched):>10} "
            f"{_ms(latency.get('p50')):>7} {_ms(latency.get('p90')):>7} "
            f"{_ms(latency.get('p99')):>7} {_ms(latency.get('max')):>8}")


def format_summary(path: str, summary: TraceSummary) -> str:
    """The summary as text: a line on the trace, a table with a row per layer and one for
    all, the fetches by reason, then the hot spots of each layer."""
    total = summary.total
    layers = len(summary.layers)
    lines = [f"{path}: {total.accesses} chunk accesses, {layers} layer"
             f"{'s' if layers != 1 else ''}, from {total.first_t:.3f} s to {total.last_t:.3f} s"]
    width = max(12, *(len(layer.layer) for layer in summary.layers))
    lines.append(f"  {'layer':<{width}} {'accesses':>8} {'hits':>6} {'fetches':>7} {'disk':>6} "
                 f"{'bad':>4} {'chunks':>7} {'fetched':>10} {'p50 ms':>7} {'p90 ms':>7} "
                 f"{'p99 ms':>7} {'max ms':>8}")
    lines += [_row(layer, width) for layer in summary.layers]
    if layers > 1:
        lines.append(_row(total, width))
    if total.fetches_by_reason:
        lines.append("fetches by reason: " + ", ".join(
            f"{reason} {count} ({human_size(total.bytes_by_reason[reason])})"
            for reason, count in sorted(total.fetches_by_reason.items(),
                                        key=lambda item: -item[1])))
    if total.bytes_from_disk:
        lines.append(f"loaded from the disk cache: {human_size(total.bytes_from_disk)}")
    lines.append("hot spots over each layer (accesses per stretch of its chunks, darker is "
                 "more):")
    for layer in summary.layers:
        per_cell = -(-layer.chunks_seen // max(1, len(layer.heat)))
        lines.append(f"  {layer.layer:<{width}} |{heat_strip(layer.heat)}| chunks 0-"
                     f"{layer.chunks_seen - 1}, {per_cell} per cell")
        lines.append(f"  {'':<{width}} hottest: " + ", ".join(
            f"chunk {chunk} ({count})" for chunk, count in layer.hottest))
    return "\n".join(lines) + "\n"
