"""`lazyfs mount`, `umount`, `stats` and `mounts`: start, stop and look at mount daemons.

The commands only check arguments and talk to the daemon; the daemon itself (start-up order,
teardown, the ready pipe) lives in `lazyfs.fuse.daemon`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import trio

from lazyfs.cli import UserError
from lazyfs.cli.convert import human_size, parse_size
from lazyfs.fuse import kernel_mount
from lazyfs.fuse.daemon import DaemonConfig, DaemonStartError, run_daemon, spawn_daemon, stop_mount
from lazyfs.fuse.state import (
    MountRecord,
    StateError,
    daemon_alive,
    ensure_state_dir,
    iter_records,
    load_record,
    private_dir,
)
from lazyfs.image.errors import LayerOpenError
from lazyfs.image.open import LayerSource

STATS_TIMEOUT_S = 10.0
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mount = subparsers.add_parser(
        "mount",
        help="mount a seekable EROFS layer, fetched and verified on demand",
        description="Mount the layer at SOURCE (an http(s) URL, file:// URL or path) read-only "
        "at MOUNTPOINT, an empty directory. Runs in the background once mounted.",
    )
    mount.add_argument("source", metavar="SOURCE", help="blob URL or path")
    mount.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        nargs="?",
        help="empty directory (not with --block-only)",
    )
    mount.add_argument("--descriptor", metavar="FILE|URL", help="the layer's OCI descriptor")
    mount.add_argument("--chunk-table-offset", type=int, metavar="OFFSET")
    mount.add_argument("--chunk-digest", metavar="sha512:HEX")
    mount.add_argument("--verity-offset", type=int, metavar="OFFSET")
    mount.add_argument("--root-digest", metavar="ALG:HEX")
    mount.add_argument(
        "--insecure", action="store_true", help="allow a layer without trusted digests"
    )
    mount.add_argument(
        "--block-only",
        metavar="DIR",
        help="only expose the layer's EROFS image as a file in DIR (no EROFS mount)",
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    mount.add_argument(
        "--cache-size",
        default="256M",
        metavar="SIZE",
        help="decoded chunk cache, bytes or with K/M/G (default 256M)",
    )
    mount.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="HTTP header for every request (repeatable), e.g. 'Authorization: Bearer ...'",
    )
    mount.add_argument("--trace", metavar="FILE", help="append a JSON line per chunk access")
    mount.add_argument("--readahead", type=int, metavar="N", help="chunks to read ahead")
    mount.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more output"
    )
    mount.set_defaults(func=cmd_mount)

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


# -- mount --------------------------------------------------------------------------------------


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _HEADER_NAME.match(name) or "\n" in value or "\r" in value:
        raise UserError(f"--header {text!r}: expected 'Name: value'")
    return name, value


def _absolute(location: str | None) -> str | None:
    """Paths made absolute, so the daemon does not depend on the caller's directory."""
    if location is None or "://" in location:
        return location
    return os.path.abspath(location)


def check_mountpoint(path: str, what: str = "mountpoint") -> str:
    """Return the canonical path of an empty, unmounted directory. Raises UserError."""
    target = kernel_mount.canonical(path)
    try:
        record = load_record(target)
    except StateError as exc:
        raise UserError(str(exc)) from None
    if record is not None:
        if daemon_alive(record):
            raise UserError(f"{target}: already a lazyfs mount (daemon {record.pid})")
        raise UserError(
            f"{target}: a lazyfs mount whose daemon died is still recorded here; "
            f"run `lazyfs umount {path}` first"
        )
    if kernel_mount.is_mountpoint(target):
        raise UserError(f"{target}: something is already mounted there")
    if not os.path.isdir(target):
        raise UserError(f"{target}: {what} must be an existing empty directory")
    if os.listdir(target):
        raise UserError(f"{target}: {what} is not empty")
    return target


def build_config(args: argparse.Namespace) -> DaemonConfig:
    if args.block_only and args.mountpoint:
        raise UserError("--block-only DIR replaces MOUNTPOINT; give one of them")
    if not args.block_only and not args.mountpoint:
        raise UserError("give MOUNTPOINT (or --block-only DIR)")
    cache_size = parse_size(args.cache_size, "--cache-size")
    if cache_size <= 0:
        raise UserError("--cache-size must be positive")
    if args.readahead is not None and args.readahead < 0:
        raise UserError("--readahead must be 0 or more")
    if not args.block_only and os.geteuid() != 0:
        raise UserError("lazyfs mount needs root: it mounts FUSE and EROFS file systems")
    mountpoint = check_mountpoint(args.block_only or args.mountpoint)
    trace = _absolute(args.trace)
    if trace is not None:
        try:
            with open(trace, "a"):
                pass
        except OSError as exc:
            raise UserError(f"--trace {trace}: {exc.strerror}") from None
    source = LayerSource(
        blob=_absolute(args.source) or args.source,
        descriptor=_absolute(args.descriptor),
        chunk_table_offset=args.chunk_table_offset,
        chunk_digest=args.chunk_digest,
        verity_offset=args.verity_offset,
        root_digest=args.root_digest,
        insecure=args.insecure,
        headers=dict(parse_header(header) for header in args.header),
    )
    return DaemonConfig(
        sources=[source],
        mountpoint=mountpoint,
        block_only=bool(args.block_only),
        cache_size_bytes=cache_size,
        readahead_chunks=args.readahead,
        trace_file=trace,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    config = build_config(args)
    try:
        if args.foreground:
            run_daemon(
                config,
                on_ready=lambda: print(f"lazyfs: mounted {config.mountpoint}", file=sys.stderr),
            )
            return 0
        ensure_state_dir()
        config.log_file = str(private_dir(config.mountpoint, ".log"))
        if getattr(args, "verbose", 0):
            print(f"lazyfs: daemon log: {config.log_file}", file=sys.stderr)
        spawn_daemon(config)
    except (DaemonStartError, LayerOpenError, kernel_mount.MountError) as exc:
        raise UserError(str(exc)) from None
    return 0


# -- umount, stats, mounts ----------------------------------------------------------------------


def _record_of(path: str) -> MountRecord:
    target = kernel_mount.canonical(path)
    try:
        record = load_record(target)
    except StateError as exc:
        raise UserError(str(exc)) from None
    if record is None:
        hint = " (not by lazyfs)" if kernel_mount.is_mountpoint(target) else ""
        raise UserError(f"{target}: no lazyfs mount here{hint}; `lazyfs mounts` lists them")
    return record


def cmd_umount(args: argparse.Namespace) -> int:
    record = _record_of(args.mountpoint)
    try:
        trio.run(lambda: stop_mount(record, lazy=args.lazy))
    except kernel_mount.MountError as exc:
        raise UserError(str(exc)) from None
    return 0


def read_stats(record: MountRecord) -> dict[str, Any]:
    """The daemon's stats file, read with a deadline (a hung daemon must not hang us)."""
    if not daemon_alive(record):
        raise UserError(f"{record.mountpoint}: the daemon is not running; run `lazyfs umount`")

    def load() -> bytes:
        with open(record.stats_file, "rb") as stream:
            return stream.read()

    async def load_with_deadline() -> bytes:
        with trio.fail_after(STATS_TIMEOUT_S):
            return await trio.to_thread.run_sync(load, abandon_on_cancel=True)

    try:
        return json.loads(trio.run(load_with_deadline))  # type: ignore[no-any-return]
    except trio.TooSlowError:
        raise UserError(
            f"{record.mountpoint}: no answer from the daemon within {STATS_TIMEOUT_S:.0f} s"
        ) from None
    except OSError as exc:
        raise UserError(f"{record.stats_file}: {exc.strerror}") from None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def format_stats(stats: dict[str, Any], mountpoint: str) -> str:
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
    for name, layer in stats.get("layers", {}).items():
        fetch = layer.get("fetch_latency", {})
        lines += [
            f"layer {name} ({layer.get('source', '?')})",
            f"  fetched                   {human_size(layer.get('bytes_fetched', 0))} in "
            f"{layer.get('requests', 0)} requests, {layer.get('retries', 0)} retries, "
            f"{layer.get('fetch_failures', 0)} failed",
            f"  chunks fetched            {layer.get('chunks_fetched', 0)} of "
            f"{layer.get('chunk_count', '?')} ({layer.get('readahead_chunks', 0)} by readahead)",
            f"  cache hits / misses       {layer.get('cache_hits', 0)} / "
            f"{layer.get('cache_misses', 0)}",
            f"  verification failures     {layer.get('verify_failures', 0)}",
            f"  fetch latency             p50 {_ms(fetch.get('p50_ms'))}, "
            f"p90 {_ms(fetch.get('p90_ms'))}, p99 {_ms(fetch.get('p99_ms'))}",
        ]
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    record = _record_of(args.mountpoint)
    stats = read_stats(record)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_stats(stats, record.mountpoint))
    return 0


def cmd_mounts(args: argparse.Namespace) -> int:
    rows = []
    try:
        items = list(iter_records())
    except StateError as exc:
        raise UserError(str(exc)) from None
    for item in items:
        if isinstance(item, StateError):
            rows.append(("?", "unreadable", "-", str(item)))
            continue
        if not daemon_alive(item):
            state = "dead (run lazyfs umount)"
        elif not item.ready:
            state = "starting"
        else:
            state = "block-only" if item.block_only else "mounted"
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
