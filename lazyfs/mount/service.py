"""The mount service's public calls: plan the lazy mount of one layer or of whole images
(`check_mountpoint`, `resolve`, then `layer_config` or `image_config`), start its daemon
(`start`) or serve it in this process (`serve`), find a mount, read its statistics, take it
down. For the command line and any other program that mounts: no argparse, errors are
`LazyfsError`s with one-line messages. What a mount began before (`lazyfs.startup.begin`:
early requests, a warm start) is handed over here, as `early`.

A mount is a daemon process (`background.spawn_daemon`) serving the FUSE file system of its
layers and owning the kernel mounts on top; its record in the state directory
(`state.MountRecord`) is how any process finds and stops it. The synchronous calls here run
trio themselves: call them from plain threads, not from inside a trio run (use
`resolve_images` and `background.stop_mount` there), and fork daemons before trio runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from lazyfs.cache.disk import DiskCacheOptions
from lazyfs.errors import LazyfsError
from lazyfs.format.platform import Platform
from lazyfs.mount import kernel, stack
from lazyfs.mount.background import preload_daemon_modules, spawn_daemon, stop_mount
from lazyfs.mount.daemon import DaemonConfig, DaemonStartError, run_daemon
from lazyfs.mount.host import MountOptions as MountOptions  # how the layers are served
from lazyfs.mount.state import (
    LOG_SUFFIX,
    MountRecord,
    daemon_alive,
    ensure_state_dir,
    find_record,
    private_dir,
    retire_log,
)
from lazyfs.startup.open import LayerSource

if TYPE_CHECKING:
    from lazyfs.fetch.registry_options import RegistryOptions
    from lazyfs.mount.images import ImageSet
    from lazyfs.startup.begin import EarlyStart

STATS_TIMEOUT_S = 10.0
DEFAULT_OPTIONS = MountOptions()


class MountpointError(LazyfsError):
    """A mountpoint that cannot take a new mount (missing, not empty, already mounted)."""


class NotMountedError(LazyfsError):
    """No lazyfs mount at the path given."""


class StatsError(LazyfsError):
    """A mount's statistics cannot be read (daemon gone, not answering)."""


# -- planning -------------------------------------------------------------------------------------


def check_mountpoint(path: str, what: str = "mountpoint") -> str:
    """Return the canonical path of an empty, unmounted directory. Raises MountpointError,
    StateError (an unreadable record)."""
    target = kernel.canonical(path)
    record = find_record(target)
    if record is not None:
        if daemon_alive(record):
            raise MountpointError(f"{target}: already a lazyfs mount (daemon {record.pid})")
        raise MountpointError(
            f"{target}: a lazyfs mount whose daemon died is still recorded here; "
            f"run `lazyfs umount {path}` first"
        )
    if kernel.is_mountpoint(target):
        raise MountpointError(f"{target}: something is already mounted there")
    if not os.path.isdir(target):
        raise MountpointError(f"{target}: {what} must be an existing empty directory")
    if os.listdir(target):
        raise MountpointError(f"{target}: {what} is not empty")
    return target


def writable_dirs(directory: str) -> tuple[str, str]:
    """The (upper, work) directories for a writable image in `directory`, created if
    missing. Raises OSError."""
    return stack.writable_dirs(kernel.canonical(directory))


def layer_config(
    source: LayerSource,
    mountpoint: str,
    *,
    block_only: bool = False,
    options: MountOptions = DEFAULT_OPTIONS,
    early: EarlyStart | None = None,
) -> DaemonConfig:
    """A daemon serving one layer blob: EROFS-mounted at `mountpoint`, or with `block_only`
    only its verified image file in the directory `mountpoint`; it starts with the answers
    of the `early` requests for the layer, once they arrive."""
    if early is not None:
        source = replace(source, primed=early.layer_answers(preload_daemon_modules))
    return DaemonConfig(sources=[source], mountpoint=mountpoint, block_only=block_only,
                        options=options)


def image_config(
    found: ImageSet,
    references: Sequence[str],
    mountpoints: Sequence[str],
    *,
    writable: tuple[str, str] | None = None,
    block_only: bool = False,
    options: MountOptions = DEFAULT_OPTIONS,
    temp_dir: str | None = None,
) -> DaemonConfig:
    """A daemon serving the resolved images `found` (from `references`): each stacked at its
    mountpoint, read-only unless `writable` gives (upper, work) directories; with
    `block_only`, only the layers' image files in `mountpoints[0]`. `temp_dir` is scratch
    space removed with the mount."""
    from lazyfs.mount.images import image_record  # images only: not on a layer's path

    upper, work = writable if writable is not None else (None, None)
    images = [
        image_record(reference, image, mountpoint, upper, work)
        for reference, image, mountpoint in zip(references, found.images, mountpoints, strict=False)
    ]
    return DaemonConfig(
        sources=found.sources,
        mountpoint=mountpoints[0],
        images=[] if block_only else images,
        block_only=block_only,
        options=options,
        temp_dir=temp_dir,
        disk_keys=tuple(found.disk_keys),
        disk_writes=tuple(found.disk_writes),
    )


def resolve(
    references: Sequence[str],
    registry: RegistryOptions,
    platform: Platform | None = None,
    *,
    insecure: bool = False,
    disk: DiskCacheOptions | None = None,
    early: EarlyStart | None = None,
) -> ImageSet:
    """`images.resolve_images` from synchronous code (`platform` defaults to this
    machine's); with `disk`, images resolved before resolve again while their registry is
    unreachable; `early`: the early requests for the first reference, whose answers it takes
    (once they arrive, within the registry's deadline). Raises ImageResolveError,
    FetchError."""
    from lazyfs.mount.images import resolve_images
    from lazyfs.oci.names import host_platform

    primed = None
    if early is not None:
        primed = early.image_answers(preload_daemon_modules, registry.deadline_s)
    return trio.run(
        lambda: resolve_images(references, registry, platform or host_platform(),
                               insecure=insecure, disk=disk, primed=primed)
    )


# -- starting and stopping ------------------------------------------------------------------------


def log_path(mountpoint: str) -> str:
    """Where the background daemon of `mountpoint` logs (in the state directory, created)."""
    ensure_state_dir()
    return str(private_dir(mountpoint, LOG_SUFFIX))


def serve(config: DaemonConfig, on_ready: Callable[[], None],
          early: EarlyStart | None = None) -> None:
    """Serve the mount in this process until SIGTERM/SIGINT/SIGHUP or an outside unmount;
    `on_ready` runs once everything is mounted; it starts with what the `early` warm start
    loaded. Raises what made start-up fail (after undoing it): DaemonStartError,
    LayerOpenError, MountError, ..."""
    if early is not None:
        config.warm_chunks, config.warm_feed = early.warm_chunks()
    run_daemon(config, on_ready)


def start(config: DaemonConfig, early: EarlyStart | None = None) -> MountRecord:
    """Start a background daemon for `config` (logging to `config.log_file`, by default
    `log_path(config.mountpoint)`) and wait until everything is mounted; it starts with what
    the `early` warm start loaded, and takes over the loader. Returns the mount's record.
    Raises DaemonStartError with the daemon's reason, and the daemon's errors."""
    if early is not None:
        config.warm_chunks, config.warm_feed = early.warm_chunks()
    if config.log_file is None:
        config.log_file = log_path(config.mountpoint)
    try:
        spawn_daemon(config)
    finally:
        config.warm_chunks = {}  # the daemon has its copy: this process keeps none
        if config.warm_feed is not None:  # nor its ends of the loader's pipes
            config.warm_feed.close()
            config.warm_feed = None
    record = find_record(kernel.canonical(config.mountpoint))
    if record is None:
        raise DaemonStartError(
            f"{config.mountpoint}: the mount daemon exited; see {config.log_file}"
        )
    return record


def find_mount(path: str) -> MountRecord:
    """The record of the lazyfs mount at `path` (any of its mountpoints). Raises
    NotMountedError, StateError."""
    target = kernel.canonical(path)
    record = find_record(target)
    if record is None:
        hint = " (not by lazyfs)" if kernel.is_mountpoint(target) else ""
        raise NotMountedError(f"{target}: no lazyfs mount here{hint}; `lazyfs mounts` lists them")
    return record


def unmount(path: str, *, lazy: bool = False, missing_ok: bool = False) -> Path | None:
    """Unmount the lazyfs mount at `path` and stop its daemon (see `background.stop_mount`);
    its log goes too unless the user may need it (`state.retire_log`: warnings or errors,
    or a daemon that had died). Returns the log kept, if any. Raises NotMountedError
    (unless `missing_ok`), MountBusyError (unless `lazy`), MountError, StateError."""
    try:
        record = find_mount(path)
    except NotMountedError:
        if missing_ok:
            return None
        raise
    was_running = daemon_alive(record)
    trio.run(lambda: stop_mount(record, lazy=lazy))
    return retire_log(record, stopped_cleanly=was_running)


def read_stats(record: MountRecord) -> dict[str, Any]:
    """The daemon's statistics (its stats file), read with a deadline: a hung daemon must not
    hang the caller. Raises StatsError."""
    if not daemon_alive(record):
        raise StatsError(f"{record.mountpoint}: the daemon is not running; run `lazyfs umount`")

    def load() -> bytes:
        with open(record.stats_file, "rb") as stream:
            return stream.read()

    async def load_with_deadline() -> bytes:
        with trio.fail_after(STATS_TIMEOUT_S):
            return await trio.to_thread.run_sync(load, abandon_on_cancel=True)

    try:
        return json.loads(trio.run(load_with_deadline))  # type: ignore[no-any-return]
    except trio.TooSlowError:
        raise StatsError(
            f"{record.mountpoint}: no answer from the daemon within {STATS_TIMEOUT_S:.0f} s"
        ) from None
    except OSError as exc:
        raise StatsError(f"{record.stats_file}: {exc.strerror}") from None
