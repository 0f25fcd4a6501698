"""Prometheus metrics of the snapshotter, per layer: bytes and requests fetched, cache hits
and misses, verification failures (read from each layer's counters at scrape time) and a
histogram of chunk fetch latency (observed as fetches complete, through the trace hook).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lazyfs.layer.stats import TraceWriter

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COUNTERS = (
    ("bytes_fetched", "lazyfs_layer_fetched_bytes", "Bytes fetched from the registry"),
    ("requests", "lazyfs_layer_fetch_requests", "HTTP range requests sent"),
    ("cache_hits", "lazyfs_layer_cache_hits", "Chunk reads served by the cache"),
    ("cache_misses", "lazyfs_layer_cache_misses", "Chunk reads that had to fetch"),
    ("verify_failures", "lazyfs_layer_verification_failures",
     "Chunks that failed their SHA-512 or dm-verity check"),
    ("fetch_failures", "lazyfs_layer_fetch_failures", "Chunk fetches that failed"),
)


class LayerMetrics(TraceWriter):
    """The trace hook of every layer: fetch latencies into a histogram (thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "lazyfs_layer_fetch_latency_seconds",
            "Time to fetch one chunk (or run of chunks) from the registry",
            ["layer"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.digests: dict[str, str] = {}  # layer file name -> digest

    def record(self, **fields: Any) -> None:
        if fields.get("event") == "fetch" and "latency_ms" in fields:
            layer = self.digests.get(str(fields.get("layer")), str(fields.get("layer")))
            self.latency.labels(layer=layer).observe(float(fields["latency_ms"]) / 1000)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class LayerStatsSource(Protocol):
    """What the collector reads: per-layer figures keyed by layer digest."""

    def stats(self) -> Mapping[str, Mapping[str, Any]]: ...


class LayerCollector(Collector):
    def __init__(self, host: LayerStatsSource,
                 awaiting_remount: Callable[[], int] = lambda: 0) -> None:
        self.host = host
        self.awaiting_remount = awaiting_remount
        self._lock = threading.Lock()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self._lock:
            stats = dict(self.host.stats())
        families = {
            key: CounterMetricFamily(name, help_text, labels=["layer"])
            for key, name, help_text in _COUNTERS
        }
        mounted = GaugeMetricFamily("lazyfs_layers_mounted", "Remote layers mounted now")
        mounted.add_metric([], len(stats))
        waiting = GaugeMetricFamily(
            "lazyfs_layers_remount_pending",
            "Remote layers of committed snapshots not mounted again yet, with a background "
            "retry pending")
        waiting.add_metric([], self.awaiting_remount())
        for digest, values in stats.items():
            for key, family in families.items():
                family.add_metric([digest], float(values.get(key, 0)))
        yield from families.values()
        yield mounted
        yield waiting


def serve_metrics(address: tuple[str, int], host: LayerStatsSource, registry: CollectorRegistry,
                  awaiting_remount: Callable[[], int] = lambda: 0) -> None:
    """Serve /metrics on `address` (HOST, PORT) from a daemon thread; `awaiting_remount`
    counts the layers waiting for a background retry."""
    registry.register(LayerCollector(host, awaiting_remount))
    start_http_server(address[1], addr=address[0], registry=registry)
    log.info("metrics on http://%s:%d/metrics", *address)
