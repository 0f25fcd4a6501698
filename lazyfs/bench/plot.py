"""Plots of a bench and of a trace, as PNG or SVG (by the file's suffix), with matplotlib: an
optional dependency (`pip install 'lazyfs[plot]'`), imported only here and only when a plot is
asked for.

`plot_bench`: per mode the spread of start times (every run a dot, the median a bar), and for
one lazy run the bytes each layer had fetched over time, with the moments the command started
and exited. `plot_trace`: the bytes fetched over time per layer, where in each layer the
accesses fell over time (hot spots over the blob), and the fetch latencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.bench.results import RunResult, median_run, summarize
from lazyfs.bench.trace import TraceEvent, fetched_over_time
from lazyfs.errors import LazyfsError

if TYPE_CHECKING:
    from lazyfs.bench.results import Environment

FORMATS = (".png", ".svg")
_MIB = 1024 * 1024
_EVENT_COLOURS = {"fetch": "tab:red", "hit": "tab:green", "disk": "tab:blue", "bad": "black"}


class PlotError(LazyfsError):
    """No plot can be made: matplotlib is missing, or the file's format is not PNG or SVG."""


def check_plot_file(path: str) -> None:
    """Raise PlotError unless `path` names a PNG or SVG file and matplotlib can be imported
    (checked before a bench spends its time, not after)."""
    if Path(path).suffix.lower() not in FORMATS:
        raise PlotError(f"{path}: a plot is written as .png or .svg")
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'lazyfs[plot]'") from None
    return pyplot


def plot_bench(path: str, environment: Environment, results: Sequence[RunResult],
               traces: dict[int, list[TraceEvent]]) -> None:
    """Write the bench's plot to `path`. Raises PlotError, OSError."""
    check_plot_file(path)
    pyplot = _pyplot()
    lazy = median_run(results, "lazy")
    trace = traces.get(lazy.order) if lazy is not None else None
    panels = 2 if trace else 1
    figure, axes = pyplot.subplots(1, panels, figsize=(6.4 * panels, 4.2), squeeze=False)
    _spread_panel(axes[0][0], environment, results)
    if trace and lazy is not None:
        _lazy_run_panel(axes[0][1], lazy, trace)
    title = f"{environment.image}: {' '.join(environment.command)}"
    if environment.link:
        title += f"\nlink {environment.link['rtt_ms']:g} ms RTT, " + (
            f"{environment.link['rate_mbit']:g} Mbit/s" if environment.link["rate_mbit"]
            else "unshaped")
    figure.suptitle("\n".join(_shorten(line, 110) for line in title.split("\n")),
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def _spread_panel(axis: Any, environment: Environment, results: Sequence[RunResult]) -> None:
    summaries = summarize(results, environment.modes)
    for position, summary in enumerate(summaries):
        times = [result.total_s for result in results if result.mode == summary.mode]
        mounted = [result.mounted_s for result in results if result.mode == summary.mode]
        # The runs side by side, in the order they ran, within the median's bar.
        spread = [position + 0.4 * (index - (len(times) - 1) / 2) / max(1, len(times))
                  for index in range(len(times))]
        axis.scatter(spread, times, color="tab:blue", zorder=3,
                     label="to the command's exit" if position == 0 else None)
        axis.scatter(spread, mounted, color="tab:orange", marker="x", zorder=3,
                     label="until mounted" if position == 0 else None)
        axis.hlines(summary.total_s.median, position - 0.25, position + 0.25, color="tab:blue")
        note = f"{summary.total_s.median:.2f} s"
        if summary.speedup is not None and summary.mode != "eager":
            note += f"\n{summary.speedup:.1f}x"
        axis.annotate(note, (position + 0.27, summary.total_s.median), fontsize=8,
                      va="center")
    axis.set_xticks(range(len(summaries)), [summary.mode for summary in summaries])
    axis.set_xlim(-0.5, len(summaries) - 0.2)
    axis.set_ylim(bottom=0)
    axis.set_ylabel("seconds from the run's start")
    axis.set_title(f"start times, {environment.repeat} run(s) per mode", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")


def _lazy_run_panel(axis: Any, run: RunResult, trace: list[TraceEvent]) -> None:
    offset = run.trace_offset_s or 0.0
    for layer, (times, sizes) in fetched_over_time(trace).items():
        axis.step([0.0, *(offset + t for t in times), run.total_s],
                  [0, *(size / _MIB for size in sizes), sizes[-1] / _MIB],
                  where="post", label=_shorten(layer, 24))
    axis.axvline(run.mounted_s, color="grey", linestyle="--", linewidth=1)
    axis.axvline(run.total_s, color="black", linestyle="-", linewidth=1)
    top = axis.get_ylim()[1]
    axis.annotate(" command starts", (run.mounted_s, top), fontsize=8, va="top")
    axis.annotate(" exits", (run.total_s, top * 0.9), fontsize=8, va="top")
    axis.set_xlim(0, run.total_s * 1.12)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("seconds from the run's start")
    axis.set_ylabel("MiB of chunks fetched")
    axis.set_title(f"lazy run {run.run} (the median): chunks fetched per layer", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")


def plot_trace(path: str, events: Sequence[TraceEvent], title: str = "") -> None:
    """Write a trace's plot to `path`. Raises PlotError, OSError."""
    check_plot_file(path)
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(1, 3, figsize=(16, 4.4))
    fetched, where, latency = axes
    for layer, (times, sizes) in fetched_over_time(events).items():
        fetched.step(times, [size / _MIB for size in sizes], where="post",
                     label=_shorten(layer, 24))
    fetched.set_xlabel("seconds (trace time)")
    fetched.set_ylabel("MiB fetched")
    fetched.set_title("bytes fetched per layer", fontsize=10)
    fetched.grid(alpha=0.3)
    fetched.legend(fontsize=8, loc="lower right")
    layers = list(dict.fromkeys(event.layer for event in events))
    markers = "o^sDv<>p*h"
    for kind, colour in _EVENT_COLOURS.items():
        for number, layer in enumerate(layers):
            chosen = [event for event in events if event.event == kind and event.layer == layer]
            if chosen:
                where.scatter([event.t for event in chosen], [event.chunk for event in chosen],
                              s=6, color=colour, marker=markers[number % len(markers)],
                              label=f"{kind}, {_shorten(layer, 16)}")
    where.set_xlabel("seconds (trace time)")
    where.set_ylabel("chunk index in its layer")
    where.set_title("accesses over the blob", fontsize=10)
    where.grid(alpha=0.3)
    where.legend(fontsize=7, loc="best", markerscale=2)
    latencies = [event.latency_ms for event in events
                 if event.event == "fetch" and event.latency_ms is not None]
    if latencies:
        latency.hist(latencies, bins=min(50, max(5, len(latencies) // 4)), color="tab:red")
    latency.set_xlabel("fetch latency, ms")
    latency.set_ylabel("fetches")
    latency.set_title(f"fetch latencies ({len(latencies)} fetches)", fontsize=10)
    latency.grid(alpha=0.3)
    if title:
        figure.suptitle(_shorten(title, 140), fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
