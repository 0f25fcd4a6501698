"""What a bench measured: every run (`RunResult`), the environment it ran in (`Environment`),
the figures per mode (`summarize`), and the files `--json` and `--csv` write.

The JSON document (`SCHEMA`) holds `environment`, `runs` (in the order they ran) and `summary`
(per mode, in the order asked); the CSV file a row per run, the environment repeated in each
row's last columns, so that either loads into a spreadsheet or a data frame as it is.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "lazyfs-bench/1"

MODES = ("lazy", "prefetch", "eager", "warm")
MODE_HELP = {
    "lazy": "mounted lazily, fetching only what the command reads (no prefetch list)",
    "prefetch": "lazily, replaying the image's prefetch list or the one given with --prefetch "
    "(recorded by a first run when there is neither)",
    "eager": "every layer pulled whole first, then mounted",
    "warm": "a second start from the disk cache a first (untimed) start filled",
}


@dataclass(frozen=True)
class LayerInfo:
    """A layer of the image: its name in mounts, digest, blob size, and for a seekable EROFS
    layer its chunk size and count (None for an ordinary layer)."""

    name: str
    digest: str
    size_bytes: int
    chunk_size: int | None = None
    chunk_count: int | None = None


@dataclass(frozen=True)
class Environment:
    """Where and on what the bench ran."""

    lazyfs_version: str
    image: str
    reference: str
    image_digest: str
    platform: str
    layers: tuple[LayerInfo, ...]
    command: tuple[str, ...]
    modes: tuple[str, ...]
    repeat: int
    link: dict[str, float] | None
    prefetch_list: str | None
    page_cache_dropped: bool
    kernel: str
    machine: str
    python: str
    cpu_count: int
    started_at: str

    @property
    def chunk_size(self) -> int | None:
        """The layers' chunk size when they share one, else None."""
        sizes = {layer.chunk_size for layer in self.layers}
        return sizes.pop() if len(sizes) == 1 else None

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["chunk_size"] = self.chunk_size
        return values


@dataclass
class RunResult:
    """One timed run, as `lazyfs run --report` told it: seconds from the run's start until
    the image was mounted (`mounted_s`) and until the command exited (`total_s`), what the
    layers fetched. `trace_offset_s`: for a traced run, where its trace's time 0 lies on the
    run's clock."""

    mode: str
    run: int
    order: int
    started_at: str
    exit_code: int
    total_s: float
    mounted_s: float
    command_s: float
    bytes_fetched: int
    requests: int
    chunks_fetched: int | None
    chunks_from_disk: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float | None] = field(default_factory=dict)
    trace_offset_s: float | None = None


def result_of_report(report: dict[str, Any], mode: str, run: int, order: int,
                     started_at: str) -> RunResult:
    """A RunResult from the JSON of `lazyfs run --report`. Raises KeyError, TypeError,
    ValueError for a report that lacks what a run reports."""
    layers = [dict(layer) for layer in report["layers"]]
    chunked = [layer for layer in layers if layer.get("chunk_count") is not None]
    phases = {str(name): (None if value is None else float(value))
              for name, value in (report.get("phases") or {}).items()}
    offset = None
    if phases.get("cli_start_s") is not None and phases.get("daemon_start_s") is not None:
        # The trace counts from the daemon's start: the command's start-up and the fork after.
        offset = float(phases["cli_start_s"] or 0) + float(phases["daemon_start_s"] or 0)
    return RunResult(
        mode=mode, run=run, order=order, started_at=started_at,
        exit_code=int(report["exit_code"]),
        total_s=float(report["total_s"]), mounted_s=float(report["mounted_s"]),
        command_s=float(report["command_s"]),
        bytes_fetched=sum(int(layer["bytes_fetched"]) for layer in layers),
        requests=sum(int(layer["requests"]) for layer in layers),
        chunks_fetched=(sum(int(layer["chunks_fetched"] or 0) for layer in chunked)
                        if chunked else None),
        chunks_from_disk=sum(int(layer.get("chunks_from_disk") or 0) for layer in layers),
        layers=layers, phases=phases, trace_offset_s=offset)


@dataclass(frozen=True)
class Spread:
    """Median, least and greatest of a figure over a mode's runs."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class ModeSummary:
    """A mode's runs in figures. `speedup` is eager's median time to exit over this mode's
    (how many times faster than eager), `bytes_share` this mode's median bytes over eager's;
    None without eager runs (or with nothing to divide by)."""

    mode: str
    runs: int
    total_s: Spread
    mounted_s: Spread
    bytes_fetched: Spread
    requests: Spread
    speedup: float | None
    bytes_share: float | None


def summarize(results: Sequence[RunResult], modes: Sequence[str]) -> list[ModeSummary]:
    """The summary of each mode of `modes` that has runs, in that order."""
    by_mode = {mode: [result for result in results if result.mode == mode] for mode in modes}

    def spread(runs: list[RunResult], key: str) -> Spread:
        return Spread.of([float(getattr(run, key)) for run in runs])

    eager = by_mode.get("eager") or []
    eager_total = spread(eager, "total_s").median if eager else None
    eager_bytes = spread(eager, "bytes_fetched").median if eager else None
    summaries = []
    for mode, runs in by_mode.items():
        if not runs:
            continue
        total, fetched = spread(runs, "total_s"), spread(runs, "bytes_fetched")
        summaries.append(ModeSummary(
            mode, len(runs), total, spread(runs, "mounted_s"), fetched, spread(runs, "requests"),
            speedup=eager_total / total.median if eager_total and total.median else None,
            bytes_share=fetched.median / eager_bytes if eager_bytes else None))
    return summaries


def median_run(results: Sequence[RunResult], mode: str) -> RunResult | None:
    """The run of `mode` whose time to exit is the median (the lower of the middle two)."""
    runs = sorted((result for result in results if result.mode == mode),
                  key=lambda result: result.total_s)
    return runs[(len(runs) - 1) // 2] if runs else None


def document(environment: Environment, results: Sequence[RunResult]) -> dict[str, Any]:
    """The `--json` document."""
    return {
        "schema": SCHEMA,
        "environment": environment.as_dict(),
        "runs": [asdict(result) for result in results],
        "summary": {summary.mode: asdict(summary)
                    for summary in summarize(results, environment.modes)},
    }


def write_json(path: str | Path, environment: Environment, results: Sequence[RunResult]) -> None:
    """Write the `--json` document. Raises OSError."""
    Path(path).write_text(json.dumps(document(environment, results), indent=2) + "\n")


CSV_RUN_COLUMNS = ("mode", "run", "order", "started_at", "exit_code", "total_s", "mounted_s",
                   "command_s", "bytes_fetched", "requests", "chunks_fetched",
                   "chunks_from_disk")
CSV_ENVIRONMENT_COLUMNS = ("lazyfs_version", "image", "image_digest", "platform", "chunk_size",
                           "link_rtt_ms", "link_rate_mbit", "kernel", "machine",
                           "page_cache_dropped", "prefetch_list", "command")


def write_csv(path: str | Path, environment: Environment, results: Sequence[RunResult]) -> None:
    """Write the `--csv` file: a header, then a row per run. Raises OSError."""
    link = environment.link or {}
    shared = {
        "lazyfs_version": environment.lazyfs_version, "image": environment.image,
        "image_digest": environment.image_digest, "platform": environment.platform,
        "chunk_size": environment.chunk_size, "link_rtt_ms": link.get("rtt_ms"),
        "link_rate_mbit": link.get("rate_mbit"), "kernel": environment.kernel,
        "machine": environment.machine, "page_cache_dropped": environment.page_cache_dropped,
        "prefetch_list": environment.prefetch_list,
        "command": " ".join(environment.command),
    }
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=[*CSV_RUN_COLUMNS, *CSV_ENVIRONMENT_COLUMNS])
        writer.writeheader()
        for result in results:
            row = {column: getattr(result, column) for column in CSV_RUN_COLUMNS}
            writer.writerow({**row, **{key: "" if value is None else value
                                       for key, value in shared.items()}})
