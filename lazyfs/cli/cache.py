"""`lazyfs cache ls|stats|prune|clear`: look at and trim the disk cache that every mount on
this machine shares (running daemons go on using it; what is removed is fetched again). A
cache that fails answers in one line, whatever failed; a damaged index is started afresh on
the way (`lazyfs.cache.disk_index`), said in one line before the answer."""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator

from lazyfs.cache.disk import default_cache_dir, default_capacity
from lazyfs.cache.disk_store import DiskStore
from lazyfs.cli import UserError
from lazyfs.cli._images import add_cache_dir_argument
from lazyfs.cli.sizes import parse_size
from lazyfs.sizes import human_size


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


@contextlib.contextmanager
def _opened(args: argparse.Namespace, *, open_index: bool = True) -> Iterator[DiskStore]:
    """The store of the cache the command names, closed after the block; without
    `open_index`, the block opens the index. An error of the cache's files or index is a
    UserError (one line); so is a cache that cannot be used (DiskCacheError)."""
    directory = os.path.abspath(args.cache_dir) if args.cache_dir else default_cache_dir()
    if not os.path.exists(os.path.join(directory, "index.sqlite")):
        raise UserError(f"{directory}: no disk cache here (give --cache-dir DIR)")
    try:
        store = DiskStore(directory, 0, open_index=open_index)
        try:
            yield store
        finally:
            store.close()
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"disk cache {directory}: {reason}") from None


def cmd_ls(args: argparse.Namespace) -> int:
    with _opened(args) as store:
        rows = store.layers()
    if not rows:
        return 0
    print(f"{'chunks':>15}  {'bytes':>10}  {'last used':<16}  layer")
    for row in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_used))
        chunks = f"{row.cached_chunks}/{row.chunk_count}"
        print(f"{chunks:>15}  {human_size(row.cached_bytes):>10}  {used:<16}  {row.label}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _opened(args) as store:
        totals = store.totals()
        cap = default_capacity(str(store.directory), totals.size_bytes)
        overhead = store.overhead_bytes()
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(totals.entries.items()))
    print(f"directory      {store.directory}")
    print(f"used           {human_size(totals.size_bytes)} ({totals.size_bytes} bytes)")
    print(f"default cap    {human_size(cap)} (--disk-cache-size overrides it per mount)")
    print(f"index          {human_size(overhead)} of each cap (the index's files, the directories)")
    print(f"entries        {sum(totals.entries.values())}{f' ({kinds})' if kinds else ''}")
    print(f"evictions      {totals.evictions}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    keep = parse_size(args.to, "--to")
    with _opened(args) as store:
        evicted = store.prune(keep)
        left = store.totals().size_bytes
    print(f"evicted {evicted} entries; {human_size(left)} left")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    with _opened(args, open_index=False) as store:
        # The files before the index is opened: on a full file system, sqlite can open it
        # (it writes when it does) only once they are gone.
        store.drop_files()
        store.open_index_in_background()
        store.clear()
    return 0
