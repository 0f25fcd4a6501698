"""`lazyfs cache ls|stats|prune|clear`: look at and trim the disk cache that every mount on
this machine shares (running daemons go on using it; what is removed is fetched again)."""

from __future__ import annotations

import argparse
import os
import time

from lazyfs.cache.disk import default_cache_dir, default_capacity
from lazyfs.cache.disk_store import DiskStore
from lazyfs.cli import UserError
from lazyfs.cli._images import add_cache_dir_argument
from lazyfs.cli.sizes import human_size, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = subparsers.add_parser(
        "cache",
        help="list, measure, trim or empty the disk cache",
        description="The disk cache keeps verified frames and layer metadata for every mount "
        "on this machine, so that a layer mounted again reads what was read before without "
        "fetching it, also while its source is unreachable.",
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("ls", help="layers in the cache: chunks and bytes kept")
    stats = actions.add_parser("stats", help="size, cap, entries, evictions")
    prune = actions.add_parser("prune", help="evict least recently used data down to a size")
    prune.add_argument("--to", required=True, metavar="SIZE", help="bytes to keep (K/M/G)")
    clear = actions.add_parser("clear", help="delete everything in the cache")
    for parser, func in ((listing, cmd_ls), (stats, cmd_stats), (prune, cmd_prune),
                         (clear, cmd_clear)):
        add_cache_dir_argument(parser)
        parser.set_defaults(func=func)


def _open(args: argparse.Namespace) -> DiskStore:
    directory = os.path.abspath(args.cache_dir) if args.cache_dir else default_cache_dir()
    if not os.path.exists(os.path.join(directory, "index.sqlite")):
        raise UserError(f"{directory}: no disk cache here (give --cache-dir DIR)")
    return DiskStore(directory, 0)


def cmd_ls(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        rows = store.layers()
    finally:
        store.close()
    if not rows:
        return 0
    print(f"{'chunks':>15}  {'bytes':>10}  {'last used':<16}  layer")
    for row in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_used))
        chunks = f"{row.cached_chunks}/{row.chunk_count}"
        print(f"{chunks:>15}  {human_size(row.cached_bytes):>10}  {used:<16}  {row.label}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        totals = store.totals()
        cap = default_capacity(str(store.directory), totals.size_bytes)
    finally:
        store.close()
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(totals.entries.items()))
    print(f"directory      {store.directory}")
    print(f"used           {human_size(totals.size_bytes)} ({totals.size_bytes} bytes)")
    print(f"default cap    {human_size(cap)} (--disk-cache-size overrides it per mount)")
    print(f"entries        {sum(totals.entries.values())}{f' ({kinds})' if kinds else ''}")
    print(f"evictions      {totals.evictions}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    keep = parse_size(args.to, "--to")
    store = _open(args)
    try:
        evicted = store.prune(keep)
        left = store.totals().size_bytes
    finally:
        store.close()
    print(f"evicted {evicted} entries; {human_size(left)} left")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        store.clear()
    finally:
        store.close()
    return 0
