"""`lazyfs umount`, `stats` and `mounts`: stop and look at mount daemons, found through their
records (by any mountpoint of the mount: several images may share one daemon)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lazyfs.mount.service import find_mount, read_stats, unmount
from lazyfs.mount.state import MountRecord, StateError, daemon_alive, iter_records
from lazyfs.sizes import human_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    umount = subparsers.add_parser(
        "umount",
        help="unmount a lazyfs mount",
        description="Unmount MOUNTPOINT and stop its daemon.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument(
        "-l", "--lazy", action="store_true", help="detach a busy mount now, clean up when unused"
    )
    umount.set_defaults(func=cmd_umount)

    stats = subparsers.add_parser("stats", help="show what a mount fetched, cached, verified")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--json", action="store_true", help="the raw JSON")
    stats.set_defaults(func=cmd_stats)

    mounts = subparsers.add_parser("mounts", help="list active lazyfs mounts")
    mounts.set_defaults(func=cmd_mounts)


def cmd_umount(args: argparse.Namespace) -> int:
    kept_log = unmount(args.mountpoint, lazy=args.lazy)
    if kept_log is not None:
        print(f"lazyfs: the daemon's log is kept (warnings, errors or an unclean stop): "
              f"{kept_log}", file=sys.stderr)
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _share(part: float, whole: float | None) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_stats(stats: dict[str, Any], mountpoint: str, record: MountRecord | None = None) -> str:
    daemon = stats.get("daemon", {})
    latency = daemon.get("read_latency", {})
    lines = [
        f"{mountpoint} (daemon {daemon.get('pid')}, up {daemon.get('uptime_s', 0):.1f} s)",
        f"  ready after               {_s(daemon.get('ready_after_s'))}",
        f"  first read after          {_s(daemon.get('first_read_after_s'))}",
        f"  reads                     {daemon.get('reads', 0)} "
        f"({human_size(daemon.get('read_bytes', 0))}), {daemon.get('read_errors', 0)} failed",
        f"  read latency              p50 {_ms(latency.get('p50_ms'))}, "
        f"p90 {_ms(latency.get('p90_ms'))}, p99 {_ms(latency.get('p99_ms'))}",
    ]
    lines += _phase_lines(daemon.get("phases"))
    lines += _cache_lines(stats.get("cache"))
    lines += _disk_cache_lines(stats.get("disk_cache"))
    for image in record.images if record is not None else []:
        lines += [
            f"image {image.reference} at {image.mountpoint}",
            f"  manifest                  {image.manifest_digest} ({image.platform})",
            f"  layers, top first         {' '.join(reversed(image.layers))}",
        ]
    for name, layer in stats.get("layers", {}).items():
        fetch = layer.get("fetch_latency", {})
        fetched, blob_size = layer.get("bytes_fetched", 0), layer.get("blob_size")
        chunks, chunk_count = layer.get("chunks_fetched", 0), layer.get("chunk_count")
        lines += [
            f"layer {name} ({layer.get('source', '?')})",
            f"  fetched                   {human_size(fetched)} in "
            f"{layer.get('requests', 0)} requests, {layer.get('retries', 0)} retries, "
            f"{layer.get('fetch_failures', 0)} failed ({_share(fetched, blob_size)} of the "
            f"{human_size(blob_size or 0)} blob)",
            f"  chunks fetched            {chunks} of {chunk_count if chunk_count else '?'} "
            f"({_share(chunks, chunk_count)}; {layer.get('readahead_chunks', 0)} by readahead)",
            f"  chunks from disk cache    {layer.get('chunks_from_disk', 0)}",
            f"  verification failures     {layer.get('verify_failures', 0)} "
            f"({layer.get('refetches', 0)} chunks fetched again)",
            f"  fetch latency             p50 {_ms(fetch.get('p50_ms'))}, "
            f"p90 {_ms(fetch.get('p90_ms'))}, p99 {_ms(fetch.get('p99_ms'))}",
        ]
        lines += _failure_lines(layer)
        lines += _background_lines(layer.get("background"))
    return "\n".join(lines)


def _failure_lines(layer: dict[str, Any]) -> list[str]:
    """What fails at once right now (each for a while): shown only when something does."""
    shown = []
    for key, label in (("bad_chunks", "bad chunks"), ("failing_chunks", "held-off chunks"),
                       ("unreachable_sources", "unreachable")):
        if layer.get(key):
            shown.append(f"  {label:<26}{' '.join(str(item) for item in layer[key])}")
    return shown


_PHASE_LABELS = (
    ("cli_start_s", "command start"),
    ("daemon_start_s", "daemon start"),
    ("metadata_s", "layer metadata"),
    ("fuse_init_s", "FUSE init"),
    ("kernel_mount_s", "kernel mount"),
    ("ready_s", "ready (total)"),
    ("first_read_s", "first read after"),
)


def _phase_lines(phases: dict[str, Any] | None) -> list[str]:
    """Where the start-up time went, phase by phase; none in an older stats file."""
    if not phases:
        return []
    lines = ["start-up phases"]
    for key, label in _PHASE_LABELS:
        if phases.get(key) is not None:
            lines.append(f"  {label:<26}{_s(phases[key])}")
    return lines


def _background_lines(background: dict[str, Any] | None) -> list[str]:
    """Prefetch list and fill progress of a layer; nothing when neither ran."""
    if not background or background.get("state", "idle") == "idle":
        return []
    return [
        f"  background                {background.get('state')}",
        f"    prefetched              {background.get('prefetched_chunks', 0)} of "
        f"{background.get('listed_chunks', 0)} listed chunks, "
        f"{human_size(background.get('prefetch_bytes', 0))} in "
        f"{background.get('prefetch_requests', 0)} requests",
        f"    filled                  {background.get('filled_chunks', 0)} chunks, "
        f"{human_size(background.get('fill_bytes', 0))} in "
        f"{background.get('fill_requests', 0)} requests",
        f"    skipped (had them)      {background.get('skipped_chunks', 0)} chunks",
    ]


def _cache_lines(cache: dict[str, Any] | None) -> list[str]:
    """The chunk cache that all layers of the mount share; none in an older stats file."""
    if cache is None:
        return []
    return [
        "chunk cache",
        f"  capacity                  {human_size(cache.get('capacity_bytes', 0))}",
        f"  used                      {human_size(cache.get('size_bytes', 0))} in "
        f"{cache.get('entries', 0)} entries",
        f"  hits / misses             {cache.get('hits', 0)} / {cache.get('misses', 0)}",
        f"  evictions                 {cache.get('evictions', 0)}",
    ]


def _disk_cache_lines(disk: dict[str, Any] | None) -> list[str]:
    """What this daemon did with the disk cache that every mount shares; none without one.
    The warm start's chunks (also counted as hits) are shown when the stats file has them."""
    if disk is None:
        return []
    lines = [
        f"disk cache {disk.get('directory', '?')}",
        f"  capacity                  {human_size(disk.get('capacity_bytes', 0))}",
        f"  hits / misses             {disk.get('hits', 0)} / {disk.get('misses', 0)}",
        f"  read / written            {human_size(disk.get('bytes_read', 0))} / "
        f"{human_size(disk.get('bytes_written', 0))} in {disk.get('writes', 0)} writes",
        f"  evictions                 {disk.get('evictions', 0)}",
        f"  bad entries dropped       {disk.get('bad_entries', 0)}",
    ]
    if "warm_start_chunks" in disk:
        lines.append(f"  warm start chunks         {disk['warm_start_chunks']}")
    if disk.get("off"):
        lines.append(f"  off                       {disk['off']}")
    return lines


def cmd_stats(args: argparse.Namespace) -> int:
    record = find_mount(args.mountpoint)
    stats = read_stats(record)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_stats(stats, record.mountpoint, record))
    return 0


def cmd_mounts(args: argparse.Namespace) -> int:
    rows = []
    for item in list(iter_records()):
        if isinstance(item, StateError):
            rows.append(("?", "unreadable", "-", str(item)))
            continue
        if not daemon_alive(item):
            state = "dead (run lazyfs umount)"
        elif not item.ready:
            state = "starting"
        else:
            state = "block-only" if item.block_only else "mounted"
        if item.images:
            for image in item.images:
                pinned = f"{image.reference.partition('@')[0]}@{image.manifest_digest}"
                rows.append((image.mountpoint, state, str(item.pid), pinned))
        else:
            rows.append((item.mountpoint, state, str(item.pid), " ".join(item.sources)))
    if not rows:
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[3]
        )
    return 0
