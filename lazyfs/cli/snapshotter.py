"""`lazyfs snapshotter`: serve containerd's snapshots API as a proxy plugin, and
`lazyfs snapshotter-stats`: what its remote layers fetched."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lazyfs.cli import UserError
from lazyfs.cli._image_service import add_image_service_arguments, image_service_of
from lazyfs.cli._images import (
    add_disk_cache_arguments,
    add_registry_arguments,
    cache_size_of,
    disk_cache_of,
    registry_options,
)
from lazyfs.fuse.operations import STATS_FILE_NAME
from lazyfs.snapshotter.daemon import SnapshotterConfig, run_snapshotter
from lazyfs.snapshotter.layers import FUSE_DIR
from lazyfs.snapshotter.remount import RemountPolicy

DEFAULT_ROOT = "/var/lib/lazyfs-snapshotter"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "snapshotter",
        help="serve containerd's snapshots API: seekable EROFS layers mounted lazily",
        description="Serve containerd's snapshot service on the unix socket SOCKET, for "
        "containerd's `[proxy_plugins.lazyfs] type = \"snapshot\"`. Layers whose Prepare "
        "labels name a seekable EROFS layer of an image (`lazyfs pull --containerd`, or "
        "the CRI plugin's labels) are mounted lazily and verified; every other layer is an "
        "ordinary overlayfs snapshot. Runs in the foreground until SIGTERM.",
    )
    parser.add_argument("--address", required=True, metavar="SOCKET", help="unix socket path")
    parser.add_argument(
        "--root", default=DEFAULT_ROOT, metavar="DIR",
        help=f"snapshots, layer mounts and the metadata database (default {DEFAULT_ROOT})",
    )
    parser.add_argument(
        "--cache-size", default="256M", metavar="SIZE",
        help="decoded chunk cache shared by all layers (default 256M)",
    )
    parser.add_argument(
        "--metrics-address", metavar="HOST:PORT", help="serve Prometheus metrics there",
    )
    parser.add_argument(
        "--remount-retries", type=int, default=RemountPolicy.attempts, metavar="N",
        help="how often a layer that cannot be mounted again at start-up (its registry down) "
        f"is retried in the background (default {RemountPolicy.attempts}); a call that "
        "needs it retries it too",
    )
    parser.add_argument(
        "--remount-max-delay", type=float, default=RemountPolicy.max_delay_s,
        metavar="SECONDS", help="longest wait between two of those retries, which start a "
        f"second apart and double (default {RemountPolicy.max_delay_s:.0f})",
    )
    parser.add_argument(
        "--no-prefetch", action="store_true",
        help="do not replay the prefetch lists layers carry in their annotations (by "
        "default each is fetched in the background once its layer is mounted, reads first)",
    )
    add_disk_cache_arguments(parser)
    add_registry_arguments(parser)
    add_image_service_arguments(parser)
    parser.set_defaults(func=cmd_snapshotter)

    stats = subparsers.add_parser(
        "snapshotter-stats", help="show what the snapshotter's remote layers fetched"
    )
    stats.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR")
    stats.add_argument("--json", action="store_true", help="the raw JSON")
    stats.set_defaults(func=cmd_stats)


def _metrics_address(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--metrics-address {text}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _remount_policy(retries: int, max_delay_s: float) -> RemountPolicy:
    try:
        return RemountPolicy(attempts=retries, max_delay_s=max_delay_s)
    except ValueError:
        raise UserError(f"--remount-retries {retries} --remount-max-delay {max_delay_s}: "
                        "expected retries >= 0 and a delay > 0") from None


def cmd_snapshotter(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UserError("lazyfs snapshotter needs root: it mounts FUSE and EROFS file systems")
    if args.platform is not None:
        raise UserError("--platform: the snapshotter mounts the platform containerd pulled")
    config = SnapshotterConfig(
        address=os.path.abspath(args.address),
        root=os.path.abspath(args.root),
        registry=registry_options(args),
        cache_size_bytes=cache_size_of(args),
        metrics_address=_metrics_address(args.metrics_address),
        remount=_remount_policy(args.remount_retries, args.remount_max_delay),
        disk_cache=disk_cache_of(args),
        prefetch=not args.no_prefetch,
    )

    config, services = image_service_of(args, config)

    def on_ready() -> None:
        print(f"lazyfs: snapshotter ready on {config.address}", file=sys.stderr, flush=True)

    run_snapshotter(config, on_ready, services)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    path = os.path.join(os.path.abspath(args.root), FUSE_DIR, STATS_FILE_NAME)
    try:
        with open(path, encoding="utf-8") as stream:
            stats = json.load(stream)
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror} (is the snapshotter running there?)") from None
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    layers = stats.get("layers", {})
    print(f"{len(layers)} remote layers mounted")
    for name, values in sorted(layers.items()):
        print(
            f"{name}: {values['bytes_fetched']} of {values['blob_size']} bytes fetched in "
            f"{values['requests']} requests; {values['chunks_fetched']}/{values['chunk_count']}"
            f" chunks; cache {values['cache_hits']} hits, {values['cache_misses']} misses; "
            f"{values['verify_failures']} verification failures"
        )
    return 0
