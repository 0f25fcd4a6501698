"""Counters and the chunk access trace, for `lazyfs stats` and startup experiments."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import IO, Any

import trio

_LATENCY_SAMPLES = 4096


def percentile(samples: list[float], fraction: float) -> float | None:
    """The `fraction` quantile (nearest rank) of `samples`, or None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class LatencyRecorder:
    """The most recent latencies (seconds), bounded, for percentiles."""

    samples: list[float] = field(default_factory=list)
    count: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        if len(self.samples) >= _LATENCY_SAMPLES:
            self.samples[self.count % _LATENCY_SAMPLES] = seconds
        else:
            self.samples.append(seconds)

    def summary_ms(self) -> dict[str, float | int | None]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        return {"count": self.count, "p50_ms": ms(percentile(self.samples, 0.5)),
                "p90_ms": ms(percentile(self.samples, 0.9)),
                "p99_ms": ms(percentile(self.samples, 0.99))}


@dataclass
class ImageStats:
    """What one layer did: chunk traffic, verification outcomes (the shared chunk cache
    counts its own hits and misses)."""

    chunk_count: int
    chunks_fetched: set[int] = field(default_factory=set)
    chunk_fetches: int = 0
    chunks_from_disk: int = 0
    readahead_chunks: int = 0
    verify_failures: int = 0
    fetch_failures: int = 0
    refetches: int = 0
    tree_blocks_fetched: int = 0
    fetch_latency: LatencyRecorder = field(default_factory=LatencyRecorder)


@dataclass
class BackgroundStats:
    """What background loading did for one layer (shown by `lazyfs stats`)."""

    listed_chunks: int = 0
    prefetched_chunks: int = 0
    prefetch_requests: int = 0
    prefetch_bytes: int = 0
    filled_chunks: int = 0
    fill_requests: int = 0
    fill_bytes: int = 0
    skipped_chunks: int = 0
    state: str = "idle"

    def snapshot(self) -> dict[str, Any]:
        return dict(vars(self))


class TraceWriter:
    """Writes one JSON line per chunk access: time since mount, layer, chunk, bytes, outcome.

    Lines are buffered by the file object; a line is a few dozen bytes, so writing it costs a
    memory copy on the event loop, and the buffer is flushed every `flush_every` lines, and
    by `flush_periodically` (the mount runs it: a live trace is at most a second behind).
    """

    def __init__(self, stream: IO[str], started: float | None = None,
                 flush_every: int = 256) -> None:
        self._stream = stream
        self._started = time.monotonic() if started is None else started
        self._flush_every = flush_every
        self._pending = 0

    @classmethod
    def open(cls, path: str) -> TraceWriter:
        return cls(open(path, "a", encoding="utf-8", buffering=1 << 16))

    def record(self, **fields: Any) -> None:
        fields = {"t": round(time.monotonic() - self._started, 6), **fields}
        self._stream.write(json.dumps(fields, separators=(",", ":")) + "\n")
        self._pending += 1
        if self._pending >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        self._pending = 0
        self._stream.flush()

    async def flush_periodically(self, interval_s: float) -> None:
        """Flush what was written every `interval_s`, until cancelled."""
        while True:
            await trio.sleep(interval_s)
            if self._pending:
                self.flush()

    def close(self) -> None:
        self._stream.flush()
        self._stream.close()
