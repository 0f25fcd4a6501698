"""What a `--trace` file says: the chunk accesses a mount (`lazyfs mount --trace`, `lazyfs run
--trace`) wrote as JSON lines (`lazyfs.layer.stats.TraceWriter`: `t` seconds since the daemon
started, `layer`, `chunk`, `event`: hit, fetch, disk or bad; `bytes` of a fetched or
disk-loaded frame, `latency_ms` and `reason` of a fetch).

`read_trace` parses a file, `summarize` counts it per layer (accesses, bytes, fetch latencies,
the hot spots over each layer's chunks), `fetched_over_time` gives the cumulative bytes per
layer for a plot.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.errors import LazyfsError

EVENTS = ("hit", "fetch", "disk", "bad")
HEAT_CELLS = 64
_HEAT_SHADES = " .:-=+*#%@"


class TraceError(LazyfsError):
    """A file that is not a chunk access trace (names the file and the line)."""


@dataclass(frozen=True)
class TraceEvent:
    """One chunk access. `size_bytes` is the frame's compressed size for fetch and disk
    events (0 otherwise), `latency_ms` a fetch's time from request to verified frame."""

    t: float
    layer: str
    chunk: int
    event: str
    size_bytes: int = 0
    latency_ms: float | None = None
    reason: str = ""


def parse_trace(lines: Iterable[str], where: str = "trace") -> list[TraceEvent]:
    """The events of a trace's lines. A last line cut short (a live trace being written) is
    left out; any other line that is not a chunk access raises TraceError naming `where` and
    the line number."""
    events: list[TraceEvent] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, start=1):
        if pending is not None:
            raise TraceError(f"{where}: line {pending[0]}: {pending[1]}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            events.append(_event(record))
        except (ValueError, TypeError, KeyError) as exc:
            reason = ("not JSON" if isinstance(exc, json.JSONDecodeError)
                      else f"not a chunk access ({exc})")
            if line.endswith("\n"):
                raise TraceError(f"{where}: line {number}: {reason}") from None
            pending = (number, reason)  # only fine as the very last line
    return events


def _event(record: Any) -> TraceEvent:
    if not isinstance(record, dict):
        raise TypeError("a JSON object per line")
    latency = record.get("latency_ms")
    return TraceEvent(
        t=float(record["t"]), layer=str(record["layer"]), chunk=int(record["chunk"]),
        event=str(record["event"]), size_bytes=int(record.get("bytes") or 0),
        latency_ms=None if latency is None else float(latency),
        reason=str(record.get("reason") or ""))


def read_trace(path: str | Path) -> list[TraceEvent]:
    """The events of the trace file `path`. Raises TraceError (also for a file that cannot be
    read, or that holds no chunk access)."""
    try:
        with open(path, encoding="utf-8") as stream:
            events = parse_trace(stream, str(path))
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None
    if not events:
        raise TraceError(f"{path}: no chunk accesses in it")
    return events


def quantile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile of `values` (linear between ranks), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class LayerSummary:
    """One layer's part of a trace. `heat` counts accesses per cell of its chunks seen
    (`chunks_seen` = highest chunk index + 1, split into at most HEAT_CELLS cells)."""

    layer: str
    accesses: int = 0
    events: dict[str, int] = field(default_factory=dict)
    chunks_touched: int = 0
    chunks_seen: int = 0
    bytes_fetched: int = 0
    bytes_from_disk: int = 0
    fetches_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_by_reason: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    first_t: float = 0.0
    last_t: float = 0.0
    heat: list[int] = field(default_factory=list)
    hottest: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class TraceSummary:
    """A trace counted: each layer's summary, and the whole trace's."""

    layers: list[LayerSummary]
    total: LayerSummary

    def as_dict(self) -> dict[str, Any]:
        def one(summary: LayerSummary) -> dict[str, Any]:
            values = dict(vars(summary))
            values["hottest"] = [{"chunk": chunk, "accesses": count}
                                 for chunk, count in summary.hottest]
            return values

        return {"layers": [one(layer) for layer in self.layers], "total": one(self.total)}


def _latencies(latencies: list[float]) -> dict[str, float | None]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {"p50": rounded(quantile(latencies, 0.5)), "p90": rounded(quantile(latencies, 0.9)),
            "p99": rounded(quantile(latencies, 0.99)),
            "max": rounded(max(latencies) if latencies else None)}


def _summarize(name: str, events: list[TraceEvent], *, hot_spots: bool) -> LayerSummary:
    summary = LayerSummary(name, accesses=len(events))
    kinds: Counter[str] = Counter(event.event for event in events)
    summary.events = {kind: kinds[kind] for kind in (*EVENTS, *sorted(set(kinds) - set(EVENTS)))
                      if kinds[kind]}
    summary.chunks_touched = len({(event.layer, event.chunk) for event in events})
    fetches = [event for event in events if event.event == "fetch"]
    summary.bytes_fetched = sum(event.size_bytes for event in fetches)
    summary.bytes_from_disk = sum(event.size_bytes for event in events if event.event == "disk")
    for event in fetches:
        reason = event.reason or "fetch"
        summary.fetches_by_reason[reason] = summary.fetches_by_reason.get(reason, 0) + 1
        summary.bytes_by_reason[reason] = (summary.bytes_by_reason.get(reason, 0)
                                           + event.size_bytes)
    summary.latency_ms = _latencies([event.latency_ms for event in fetches
                                     if event.latency_ms is not None])
    summary.first_t = min((event.t for event in events), default=0.0)
    summary.last_t = max((event.t for event in events), default=0.0)
    if hot_spots and events:
        summary.chunks_seen = max(event.chunk for event in events) + 1
        cells = min(HEAT_CELLS, summary.chunks_seen)
        summary.heat = [0] * cells
        for event in events:
            summary.heat[event.chunk * cells // summary.chunks_seen] += 1
        by_chunk = Counter(event.chunk for event in events)
        summary.hottest = sorted(by_chunk.items(), key=lambda item: (-item[1], item[0]))[:5]
    return summary


def summarize(events: Sequence[TraceEvent]) -> TraceSummary:
    """Count `events` per layer (in order of first appearance) and in all."""
    layers: dict[str, list[TraceEvent]] = {}
    for event in events:
        layers.setdefault(event.layer, []).append(event)
    return TraceSummary(
        [_summarize(name, layer_events, hot_spots=True) for name, layer_events in layers.items()],
        _summarize("all layers", list(events), hot_spots=False))


def fetched_over_time(events: Sequence[TraceEvent]) -> dict[str, tuple[list[float], list[int]]]:
    """Per layer (in order of first appearance), the times of its fetches and the bytes
    fetched up to each (cumulative), starting from (first event's time, 0)."""
    series: dict[str, tuple[list[float], list[int]]] = {}
    start = min((event.t for event in events), default=0.0)
    for event in sorted(events, key=lambda event: event.t):
        times, sizes = series.setdefault(event.layer, ([start], [0]))
        if event.event == "fetch":
            times.append(event.t)
            sizes.append(sizes[-1] + event.size_bytes)
    return series


def heat_strip(heat: Sequence[int]) -> str:
    """The cells of a heat map as characters, darker for more accesses (relative to the
    busiest cell; an untouched cell is blank)."""
    top = max(heat, default=0)
    if not top:
        return " " * len(heat)
    shades = len(_HEAT_SHADES) - 1
    return "".join(_HEAT_SHADES[0 if not count else max(1, math.ceil(count / top * shades))]
                   for count in heat)
