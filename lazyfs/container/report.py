"""What a run measured: time to mount, to the command's exit, and what each layer cost."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """What one distinct layer cost. `chunks_fetched` and `chunk_count` are None for an
    eager run, which fetches every chunk (the whole blob); `chunks_from_disk` were read
    from the disk cache instead of fetched."""

    name: str
    digest: str
    blob_size: int
    bytes_fetched: int
    requests: int
    chunks_fetched: int | None = None
    chunk_count: int | None = None
    chunks_from_disk: int = 0


@dataclass
class RunReport:
    """One run: `mounted_s` from the start of `lazyfs run` until the image was mounted,
    `total_s` until the command exited; `phases`, of a lazy run, where its mount's start-up
    time went, as `lazyfs stats` shows it (seconds, None for a phase not passed)."""

    mode: str
    image: str
    platform: str
    exit_code: int = 0
    mounted_s: float = 0.0
    command_s: float = 0.0
    total_s: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)
    phases: dict[str, float | None] = field(default_factory=dict)


def lazy_layer_report(name: str, digest: str, size: int, stats: Mapping[str, Any]) -> LayerReport:
    """A layer's report from its entry in the daemon's stats file (zeros if it has none)."""
    return LayerReport(
        name,
        digest,
        int(stats.get("blob_size") or size),
        int(stats.get("bytes_fetched", 0)),
        int(stats.get("requests", 0)),
        int(stats.get("chunks_fetched", 0)),
        int(stats.get("chunk_count", 0)),
        int(stats.get("chunks_from_disk", 0)),
    )
