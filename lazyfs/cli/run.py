"""`lazyfs run IMAGE_REF [options] -- CMD…`: start a container from an image and measure it.

The image is mounted lazily (a daemon fetches and verifies only the chunks the command
reads), or with --eager pulled whole first (every blob downloaded, digest-checked and
decompressed, then the EROFS images mounted directly); either way the layers are stacked with
overlayfs under a temporary writable upper layer and CMD runs chrooted in it, in new mount and
PID namespaces, with /proc, a minimal /dev and a writable /tmp. Afterwards a report on stderr
gives the wall time from start to CMD's exit and, per layer, the bytes and requests fetched
and the share of its chunks and bytes. The exit status is CMD's. Everything is torn down on
the way out, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import trio

from lazyfs.cli import UserError
from lazyfs.cli._images import (
    ImageSet,
    add_registry_arguments,
    cache_size_of,
    count_layers,
    image_record,
    platform_of,
    registry_options,
    resolve_images,
    writable_upper,
)
from lazyfs.cli._run_report import LayerReport, RunReport, format_report, lazy_layer_report
from lazyfs.cli.convert import sigterm_as_interrupt
from lazyfs.cli.mounts import read_stats
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.fuse import image_mount, kernel_mount
from lazyfs.fuse.background import spawn_daemon, stop_mount, undo_mounts
from lazyfs.fuse.container import ContainerSpec, container_env, interrupts_ignored, run_container
from lazyfs.fuse.daemon import DaemonConfig, DaemonStartError
from lazyfs.fuse.state import (
    ImageRecord,
    MountRecord,
    StateError,
    ensure_state_dir,
    find_record,
    private_dir,
    process_start_ticks,
    write_record,
)
from lazyfs.image.eager_pull import PulledLayer, pull_layers
from lazyfs.image.errors import LayerOpenError
from lazyfs.image.registry_source import ResolvedImage


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eager",
        action="store_true",
        help="download and decompress every layer first, then mount the EROFS images directly",
    )
    parser.add_argument(
        "--trace", metavar="FILE", help="append the lazy run's chunk accesses to FILE (JSON lines)"
    )
    parser.add_argument(
        "--writable",
        metavar="DIR",
        help="keep the container's changes in "
        "DIR/upper (default: a temporary upper layer, deleted afterwards)",
    )
    parser.add_argument("--report", metavar="FILE", help="also write the report to FILE as JSON")
    parser.add_argument(
        "--cache-size",
        default="256M",
        metavar="SIZE",
        help="decoded chunk cache of the lazy mount (default 256M)",
    )
    parser.add_argument(
        "--readahead", type=int, metavar="N", help="chunks the lazy mount reads ahead"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow layers without trusted digests"
    )
    add_registry_arguments(parser)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser(
        "run",
        usage="lazyfs run [OPTIONS] IMAGE_REF [OPTIONS] [-- CMD [ARG ...]]",
        help="run a command in an image, mounted lazily (or pulled eagerly), and time it",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " ") if __doc__ else None,
    )
    run.add_argument("image", metavar="IMAGE_REF", help="a converted image in a registry")
    run.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- CMD",
        help="the command and its arguments (default: the image's entrypoint and command)",
    )
    _add_options(run)
    run.set_defaults(func=cmd_run)


def split_command(args: argparse.Namespace) -> None:
    """Options may also follow IMAGE_REF, up to `--`: parse them out of the command."""
    rest = list(args.command)
    if "--" in rest:
        index = rest.index("--")
        options, args.command = rest[:index], rest[index + 1 :]
    elif rest and rest[0].startswith("-"):
        options, args.command = rest, []
    else:
        return
    parser = argparse.ArgumentParser(prog="lazyfs run", add_help=False)
    _add_options(parser)
    parser.parse_args(options, namespace=args)


def cmd_run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    split_command(args)
    if os.geteuid() != 0:
        raise UserError("lazyfs run needs root: it mounts file systems and creates namespaces")
    if args.eager and (args.trace or args.readahead is not None):
        flag = "--trace" if args.trace else "--readahead"
        raise UserError(f"{flag} applies to the lazy mount; not with --eager")
    if args.readahead is not None and args.readahead < 0:
        raise UserError("--readahead must be 0 or more")
    cache_size = cache_size_of(args)
    trace = os.path.abspath(args.trace) if args.trace else None
    for path in (trace, args.report):
        if path is not None:
            try:
                with open(path, "a"):
                    pass
            except OSError as exc:
                raise UserError(f"{path}: {exc.strerror}") from None
    options = registry_options(args)
    found = resolve_images([args.image], options, platform_of(args), insecure=args.insecure)
    image = found.images[0]
    argv = args.command or [*image.config.entrypoint, *image.config.cmd]
    if not argv:
        raise UserError(f"{args.image}: the image has no command; give one after --")
    mode = "eager" if args.eager else "lazy"
    print(
        f"lazyfs run: {image.pinned} ({image.platform}, {count_layers(len(image.layers))}), {mode}",
        file=sys.stderr,
        flush=True,
    )
    ensure_state_dir()
    if args.writable:
        upper, workdir = writable_upper(args.writable)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-run-"))
    root = work / "root"
    root.mkdir()
    if not args.writable:
        upper, workdir = image_mount.writable_dirs(str(work / "rw"))
    target = image_record(args.image, image, str(root), upper, workdir)
    report = RunReport(mode=mode, image=image.pinned, platform=image.platform)
    spec = ContainerSpec(
        str(root), argv, container_env(image.config.env), image.config.working_dir or "/"
    )
    try:
        with sigterm_as_interrupt():
            if args.eager:
                record = _eager_record(target, work)
                pulled = trio.run(_eager_mount, record, target, image, options)
            else:
                record = _lazy_mount(found, target, work, cache_size, trace, args.readahead)
            report.mounted_s = time.monotonic() - started
            report.exit_code = run_container(spec)
            report.total_s = time.monotonic() - started
            report.command_s = report.total_s - report.mounted_s
            if args.eager:
                report.layers = _eager_layers(pulled)
            else:
                report.layers = _lazy_layers(image, record)
    finally:
        with interrupts_ignored():
            _teardown(root, work, eager=args.eager, relay_log=report.mounted_s > 0)
    sys.stderr.write(format_report(report))
    if args.report:
        Path(args.report).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report.exit_code


# -- lazy -----------------------------------------------------------------------------------------


def _lazy_mount(
    found: ImageSet,
    target: ImageRecord,
    work: Path,
    cache_size: int,
    trace: str | None,
    readahead: int | None,
) -> MountRecord:
    """Start a mount daemon for the image; returns its record once everything is mounted."""
    root = target.mountpoint
    config = DaemonConfig(
        sources=found.sources,
        mountpoint=root,
        images=[target],
        blob_sizes=found.blob_sizes,
        cache_size_bytes=cache_size,
        readahead_chunks=readahead,
        trace_file=trace,
        log_file=str(private_dir(root, ".log")),
        temp_dir=str(work),
    )
    try:
        spawn_daemon(config)
    except (DaemonStartError, LayerOpenError) as exc:
        raise UserError(str(exc)) from None
    record = find_record(root)
    if record is None:
        raise UserError(f"{root}: the mount daemon exited; see {config.log_file}")
    return record


def _lazy_layers(image: ResolvedImage, record: MountRecord) -> list[LayerReport]:
    """Per-layer numbers from the daemon's stats file (none if it cannot be read)."""
    try:
        stats: dict[str, Any] = read_stats(record)
    except UserError as exc:
        print(f"lazyfs run: no layer statistics: {exc}", file=sys.stderr)
        return []
    layers = stats.get("layers", {})
    return [
        lazy_layer_report(layer.name, layer.digest, layer.size, layers.get(layer.name, {}))
        for layer in image.distinct_layers
    ]


# -- eager ----------------------------------------------------------------------------------------


def _eager_record(target: ImageRecord, work: Path) -> MountRecord:
    """The record of an eager run's mounts (this process is their owner): written before
    anything is mounted, so that `lazyfs umount` can clean up after a killed run."""
    root = target.mountpoint
    record = MountRecord(
        mountpoint=root,
        pid=os.getpid(),
        pid_start_ticks=process_start_ticks(os.getpid()),
        fuse_dir=str(private_dir(root, ".fuse")),  # never created: no FUSE in an eager run
        layers_dir=str(private_dir(root, ".layers")),
        temp_dir=str(work),
        started_at=time.time(),
    )
    write_record(record)
    return record


async def _eager_mount(
    record: MountRecord, target: ImageRecord, image: ResolvedImage, options: RegistryOptions
) -> list[PulledLayer]:
    """Pull every layer into the scratch directory, mount the EROFS images, stack them."""
    assert record.temp_dir is not None
    directory = Path(record.temp_dir) / "layers"
    directory.mkdir()
    async with options.client(image.reference.registry) as client:
        pulled = await pull_layers(
            client, image.reference.repository, image.distinct_layers, directory
        )
    record.sources = [str(layer.image_file) for layer in pulled]
    files = {layer.name: str(layer.image_file) for layer in pulled}
    layer_dirs = await image_mount.mount_layers(record, files)
    await image_mount.mount_overlays(record, [target], layer_dirs)
    record.ready = True
    write_record(record)
    return pulled


def _eager_layers(pulled: list[PulledLayer]) -> list[LayerReport]:
    return [
        LayerReport(layer.name, layer.digest, layer.blob_size, layer.blob_size, requests=1)
        for layer in pulled
    ]


# -- teardown -------------------------------------------------------------------------------------


def _teardown(root: Path, work: Path, *, eager: bool, relay_log: bool) -> None:
    """Unmount everything (the daemon's way for a lazy run), pass on what the daemon logged
    as a problem (if `relay_log`: a failed start has already said why), and delete the
    scratch directory. Reports failures, never raises."""
    try:
        record = find_record(root)
        if record is not None:
            stop = undo_mounts if eager else stop_mount
            trio.run(partial(stop, record, lazy=True))
    except (kernel_mount.MountError, StateError) as exc:
        print(f"lazyfs run: {exc}", file=sys.stderr)
    log_file = private_dir(root, ".log")
    with contextlib.suppress(FileNotFoundError):
        for line in log_file.read_text(errors="replace").splitlines() if relay_log else []:
            if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                print(f"lazyfs run: daemon: {line}", file=sys.stderr)
        log_file.unlink()
    if kernel_mount.mounts_at_or_below(work):
        print(f"lazyfs run: {work} still has mounts below it; not removed", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
