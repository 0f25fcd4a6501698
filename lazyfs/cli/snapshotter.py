"""`lazyfs snapshotter`: serve containerd's snapshots API as a proxy plugin, and
`lazyfs snapshotter-stats`: what its remote layers fetched.

The snapshotter's settings come from its configuration file (`lazyfs.node.config`, where
each key names the option that overrides it) and from these options, which win. With
--image-service-address and --containerd-address it also serves CRI's image service, for
kubelet's `--image-service-endpoint` (`lazyfs.node.image_service`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from lazyfs.cli import UserError
from lazyfs.cli._images import (
    add_disk_cache_arguments,
    add_registry_arguments,
    prepare_cache_directory,
)
from lazyfs.cri.image_service import CRI_NAMESPACE
from lazyfs.fetch.registry_options import parse_credentials
from lazyfs.fuse.operations import STATS_FILE_NAME
from lazyfs.node.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_ROOT,
    KEYS,
    SCHEMA,
    Setting,
    config_path,
    image_service_config,
    load_settings,
    snapshotter_config,
)
from lazyfs.node.image_service import with_image_service
from lazyfs.node.systemd import notify_systemd
from lazyfs.snapshotter.daemon import SnapshotterConfig, run_snapshotter
from lazyfs.snapshotter.layers import FUSE_DIR


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
    parser.add_argument(
        "--config", metavar="FILE",
        help=f"read the settings from this TOML file (default {DEFAULT_CONFIG_PATH}, when it "
        "exists); the options below override its keys",
    )
    parser.add_argument("--address", metavar="SOCKET", help=_help("snapshotter.address"))
    parser.add_argument("--root", metavar="DIR", help=_help("snapshotter.root"))
    parser.add_argument("--cache-size", metavar="SIZE", help=_help("cache.size"))
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help=_help("metrics.address"))
    parser.add_argument(
        "--remount-retries", metavar="N",
        help=_help("timeouts.remount_retries", "; a call that needs the layer retries it too"),
    )
    parser.add_argument("--remount-max-delay", metavar="SECONDS",
                        help=_help("timeouts.remount_max_delay"))
    parser.add_argument(
        "--no-prefetch", action="store_true",
        help="do not replay the prefetch lists layers carry in their annotations (by "
        "default each is fetched in the background once its layer is mounted, reads first)",
    )
    reads = parser.add_argument_group("reads and their limits")
    reads.add_argument("--read-timeout", metavar="SECONDS", help=_help("timeouts.read_timeout"))
    reads.add_argument("--low-speed-limit", metavar="RATE",
                       help=_help("timeouts.low_speed_limit"))
    reads.add_argument("--low-speed-time", metavar="SECONDS",
                       help=_help("timeouts.low_speed_time"))
    reads.add_argument("--connections-per-layer", metavar="N",
                       help=_help("limits.connections_per_layer"))
    reads.add_argument("--fetches-per-layer", metavar="N", help=_help("limits.fetches_per_layer"))
    reads.add_argument("--decode-threads", metavar="N", help=_help("limits.decode_threads"))
    add_disk_cache_arguments(parser)
    add_registry_arguments(parser)
    add_image_service_arguments(parser)
    registries = parser.add_argument_group("more on registries")
    registries.add_argument("--plain-http", action="append", default=[], metavar="HOST",
                            help=_help("registry.plain_http", "; repeatable"))
    registries.add_argument("--credentials-file", metavar="FILE",
                            help=_help("registry.credentials_file"))
    parser.set_defaults(func=cmd_snapshotter)

    stats = subparsers.add_parser(
        "snapshotter-stats", help="show what the snapshotter's remote layers fetched"
    )
    stats.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR")
    stats.add_argument("--json", action="store_true", help="the raw JSON")
    stats.set_defaults(func=cmd_stats)


def add_image_service_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kubernetes nodes (CRI)")
    group.add_argument(
        "--image-service-address", metavar="SOCKET",
        help="also serve CRI's image service on this unix socket, for kubelet's "
        "--image-service-endpoint: seekable EROFS images are pulled lazily (into containerd's "
        f"namespace {CRI_NAMESPACE}), every other image and call goes to containerd's CRI "
        "plugin; needs --containerd-address",
    )
    group.add_argument(
        "--containerd-address", metavar="SOCKET",
        help="containerd's socket, whose CRI plugin the image service works with",
    )
    group.add_argument(
        "--image-service-namespace", metavar="NS",
        help="the containerd namespace the CRI plugin keeps its images in (default "
        f"{CRI_NAMESPACE})",
    )


def _help(key_id: str, more: str = "") -> str:
    """An option's help: what its key of the configuration file means, and the default."""
    key = KEYS[key_id]
    return f"{key.help}{more} (default {key.default}; the file's {key.label})"


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the command line that override a key, by key id, as parsed (texts,
    a list of texts for a repeatable option, True for an `--no-...` one)."""
    given = {}
    for key in SCHEMA:
        value = getattr(args, key.option.removeprefix("--").replace("-", "_"))
        if value not in (None, False, []):
            given[key.id] = value
    return given


def settings_of(args: argparse.Namespace, default_path: str = DEFAULT_CONFIG_PATH
                ) -> dict[str, Setting]:
    """The settings of the configuration file, those of the options in their place. Raises
    ConfigError naming the file and key, or the option."""
    return load_settings(config_path(args.config, default_path), flags_given(args))


def config_of(args: argparse.Namespace, default_path: str = DEFAULT_CONFIG_PATH,
              settings: dict[str, Setting] | None = None) -> SnapshotterConfig:
    """The snapshotter's configuration (of `settings`, else `settings_of(args)`), with
    --creds and --insecure-registry, which have no key. Raises ConfigError, UserError."""
    if settings is None:
        settings = settings_of(args, default_path)
    credentials = None if args.creds is None else parse_credentials(args.creds)
    return snapshotter_config(settings, credentials=credentials,
                              insecure=args.insecure_registry)


def cmd_snapshotter(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UserError("lazyfs snapshotter needs root: it mounts FUSE and EROFS file systems")
    if args.platform is not None:
        raise UserError("--platform: the snapshotter mounts the platform containerd pulled")
    settings = settings_of(args)
    config = config_of(args, settings=settings)
    if config.disk_cache is not None:
        directory = prepare_cache_directory(config.disk_cache.directory)
        config = replace(config, disk_cache=replace(config.disk_cache, directory=directory))
    config, services = with_image_service(config, image_service_config(settings))

    def on_ready() -> None:
        print(f"lazyfs: snapshotter ready on {config.address}", file=sys.stderr, flush=True)
        notify_systemd(b"READY=1")

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
