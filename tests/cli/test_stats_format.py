"""`lazyfs stats` text: the daemon, the shared chunk cache, then each layer."""

from __future__ import annotations

from lazyfs.cli.mounts import format_stats

STATS = {
    "daemon": {"pid": 42, "uptime_s": 3.5, "reads": 7, "read_bytes": 4096},
    "cache": {"capacity_bytes": 256 << 20, "size_bytes": 3 << 20, "entries": 12, "hits": 30,
              "misses": 12, "evictions": 2},
    "layers": {"layer.blob": {"source": "http://h/layer.blob", "chunk_count": 40,
                              "chunks_fetched": 12, "bytes_fetched": 1 << 20,
                              "blob_size": 4 << 20}},
}


def test_cache_section_between_daemon_and_layers() -> None:
    lines = format_stats(STATS, "/mnt/x").splitlines()
    start = lines.index("chunk cache")
    assert lines[start + 1:start + 5] == [
        "  capacity                  256.0 MiB",
        "  used                      3.0 MiB in 12 entries",
        "  hits / misses             30 / 12",
        "  evictions                 2",
    ]
    assert lines[0].startswith("/mnt/x (daemon 42")
    assert lines.index("layer layer.blob (http://h/layer.blob)") > start
    assert not any("cache hits" in line for line in lines)  # counted once, by the cache


def test_stats_without_a_cache_section_still_print() -> None:
    stats = {key: value for key, value in STATS.items() if key != "cache"}
    assert "chunk cache" not in format_stats(stats, "/mnt/x")


def test_start_up_phases_are_shown_in_order_when_present() -> None:
    phases = {"cli_start_s": 0.05, "daemon_start_s": 0.1, "metadata_s": 0.02,
              "fuse_init_s": 0.003, "kernel_mount_s": 0.04, "ready_s": 0.213,
              "first_read_s": None}
    stats = {**STATS, "daemon": {**STATS["daemon"], "phases": phases}}
    lines = format_stats(stats, "/mnt/x").splitlines()
    start = lines.index("start-up phases")
    assert lines[start + 1:start + 7] == [
        "  command start             0.050 s",
        "  daemon start              0.100 s",
        "  layer metadata            0.020 s",
        "  FUSE init                 0.003 s",
        "  kernel mount              0.040 s",
        "  ready (total)             0.213 s",
    ]
    assert lines[start + 7] == "chunk cache"  # no line for the read not seen yet
    assert "start-up phases" not in format_stats(STATS, "/mnt/x")


def test_background_loads_are_shown_once_they_ran() -> None:
    layer = STATS["layers"]["layer.blob"]
    assert "background" not in format_stats(STATS, "/mnt/x")
    idle = {**STATS, "layers": {"layer.blob": {**layer, "background": {"state": "idle"}}}}
    assert "background" not in format_stats(idle, "/mnt/x")
    background = {"state": "filling", "listed_chunks": 9, "prefetched_chunks": 7,
                  "prefetch_requests": 3, "prefetch_bytes": 3 << 20, "filled_chunks": 4,
                  "fill_requests": 4, "fill_bytes": 1 << 20, "skipped_chunks": 2}
    running = {**STATS, "layers": {"layer.blob": {**layer, "background": background}}}
    lines = format_stats(running, "/mnt/x").splitlines()
    start = lines.index("  background                filling")
    assert lines[start + 1:start + 4] == [
        "    prefetched              7 of 9 listed chunks, 3.0 MiB in 3 requests",
        "    filled                  4 chunks, 1.0 MiB in 4 requests",
        "    skipped (had them)      2 chunks",
    ]


def test_disk_cache_section_shows_hits_misses_evictions_and_bytes() -> None:
    stats = {**STATS, "disk_cache": {"directory": "/var/cache/lazyfs", "capacity_bytes": 1 << 30,
                                     "hits": 5, "misses": 3, "bytes_read": 2 << 20,
                                     "bytes_written": 1 << 20, "writes": 4, "evictions": 6,
                                     "bad_entries": 1}}
    lines = format_stats(stats, "/mnt/x").splitlines()
    start = lines.index("disk cache /var/cache/lazyfs")
    assert lines[start + 1:start + 6] == [
        "  capacity                  1.0 GiB",
        "  hits / misses             5 / 3",
        "  read / written            2.0 MiB / 1.0 MiB in 4 writes",
        "  evictions                 6",
        "  bad entries dropped       1",
    ]
    assert start > lines.index("chunk cache")
    without = format_stats(STATS, "/mnt/x").splitlines()
    assert not any(line.startswith("disk cache") for line in without)


def test_disk_cache_section_shows_the_warm_start_chunks_when_counted() -> None:
    disk = {"directory": "/var/cache/lazyfs", "hits": 9, "misses": 3, "bad_entries": 0}
    lines = format_stats({**STATS, "disk_cache": disk}, "/mnt/x").splitlines()
    assert lines[-1].startswith("  fetch latency")  # the layer's lines still come last
    assert not any("warm start" in line for line in lines)  # a stats file from before them
    for count in (7, 0):
        warm = {**STATS, "disk_cache": {**disk, "warm_start_chunks": count}}
        lines = format_stats(warm, "/mnt/x").splitlines()
        start = lines.index("  bad entries dropped       0")
        assert lines[start + 1] == f"  warm start chunks         {count}"
        assert lines[start + 2] == "layer layer.blob (http://h/layer.blob)"


def test_what_fails_right_now_is_shown_only_when_something_does() -> None:
    layer = {**STATS["layers"]["layer.blob"], "verify_failures": 1, "refetches": 2,
             "bad_chunks": [5], "failing_chunks": [], "unreachable_sources": ["http://h/"]}
    lines = format_stats({**STATS, "layers": {"layer.blob": layer}}, "/mnt/x").splitlines()
    assert "  verification failures     1 (2 chunks fetched again)" in lines
    assert "  bad chunks                5" in lines
    assert "  unreachable               http://h/" in lines
    assert not any("held-off" in line for line in lines)
    quiet = format_stats(STATS, "/mnt/x")
    assert "bad chunks" not in quiet and "unreachable" not in quiet
