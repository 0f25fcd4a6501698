"""The mount daemon: one trio nursery owns the FUSE loop, the layers' background work and
the kernel mounts, from start-up to an orderly teardown on SIGTERM, SIGINT or SIGHUP.

Start-up order: open and authenticate every layer, mount FUSE on a private directory (or the
user's block-only directory), start serving, then mount EROFS from the block file while the
loop serves the kernel's reads. Teardown runs the other way round and also after a failure
half-way: each step is recorded in the mount record first, so whatever came up goes down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from lazyfs.fuse import kernel_mount
from lazyfs.fuse.operations import DaemonStats, LayerOperations
from lazyfs.fuse.state import (
    MountRecord,
    daemon_alive,
    private_dir,
    process_start_ticks,
    remove_record,
    write_record,
)
from lazyfs.image.cache import DEFAULT_CACHE_BYTES, ChunkCache
from lazyfs.image.open import LayerSource, open_layer
from lazyfs.image.remote_image import RemoteImage
from lazyfs.image.stats import TraceWriter

log = logging.getLogger(__name__)

# SIGHUP: a foreground mount whose terminal goes away unmounts instead of dying mid-mount.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class WorkerLimits:
    """Concurrency limits sized together (FUSE workers >= HTTP connections >= decode threads),
    so no stage queues work that the next cannot take."""

    decode_threads: int
    http_connections: int
    parallel_fetches: int
    fuse_workers: int

    @classmethod
    def for_layers(cls, layer_count: int, cpu_count: int | None = None) -> WorkerLimits:
        decode_threads = max(2, cpu_count or os.cpu_count() or 1)
        http_connections = max(8, decode_threads)
        parallel_fetches = max(1, http_connections // 2)
        # Each layer has its own connection pool; leave workers for metadata-only requests
        # (getattr, lookup, the stats file) while every connection is busy.
        fuse_workers = http_connections * max(1, layer_count) + 4
        return cls(decode_threads, http_connections, parallel_fetches, fuse_workers)


@dataclass
class DaemonConfig:
    """What to mount, and where. `mountpoint` is the EROFS mountpoint, or with `block_only`
    the directory where the block files appear."""

    sources: list[LayerSource]
    mountpoint: str
    block_only: bool = False
    cache_size_bytes: int = DEFAULT_CACHE_BYTES
    readahead_chunks: int | None = None
    trace_file: str | None = None
    log_file: str | None = None
    allow_other: bool = field(default_factory=lambda: os.geteuid() == 0)


def fuse_options(config: DaemonConfig) -> set[str]:
    options = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
    if config.allow_other:
        # Only root may pass allow_other without user_allow_other in /etc/fuse.conf; it lets
        # other users read the block-only files, and the kernel read EROFS data on their behalf.
        options.add("allow_other")
    return options


class Daemon:
    """One mount's lifetime. `run(on_ready)` returns after teardown; it raises what made
    start-up fail (after undoing what had come up)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.limits = WorkerLimits.for_layers(len(config.sources))
        self.stats = DaemonStats()
        mountpoint = kernel_mount.canonical(config.mountpoint)
        fuse_dir = mountpoint if config.block_only else str(private_dir(mountpoint, ".fuse"))
        self.record = MountRecord(
            mountpoint=mountpoint,
            pid=os.getpid(),
            pid_start_ticks=process_start_ticks(os.getpid()),
            fuse_dir=fuse_dir,
            sources=[s.blob for s in config.sources],
            block_only=config.block_only,
            log_file=config.log_file,
            started_at=time.time(),
        )
        self.images: list[RemoteImage] = []
        self._fuse_mounted = False
        self._fuse_serving = False
        self._fuse_done = trio.Event()
        self._stopping = False
        self._created_fuse_dir = False

    def run(self, on_ready: Callable[[], None]) -> None:
        trio.run(self._main, on_ready)

    async def _main(self, on_ready: Callable[[], None]) -> None:
        trace = TraceWriter.open(self.config.trace_file) if self.config.trace_file else None
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                    await self._start(nursery, trace)
                    on_ready()
                    await self._fuse_done.wait()
                    nursery.cancel_scope.cancel()  # background fetches, the signal watcher
            except BaseExceptionGroup as group:
                raise _sole_exception(group) from None
            finally:
                with trio.CancelScope(shield=True):
                    await self._teardown()
                if trace is not None:
                    trace.close()
        if not self.record.ready:
            raise DaemonStartError("stopped by a signal before the mount was ready")
        log.info("%s: unmounted", self.record.mountpoint)

    async def _start(self, nursery: trio.Nursery, trace: TraceWriter | None) -> None:
        config, record = self.config, self.record
        cache = ChunkCache(config.cache_size_bytes)
        cpu_limiter = trio.CapacityLimiter(self.limits.decode_threads)
        options: dict[str, int] = {"parallel_fetches": self.limits.parallel_fetches}
        if config.readahead_chunks is not None:
            options["readahead_chunks"] = config.readahead_chunks
        write_record(record)  # `lazyfs mounts` shows it starting, `umount` can stop it
        for source in config.sources:
            source.reader_options.setdefault("max_connections", self.limits.http_connections)
            image = await open_layer(
                source,
                cache=cache,
                nursery=nursery,
                trace=trace,
                cpu_limiter=cpu_limiter,
                **options,
            )
            self.images.append(image)
            log.info(
                "%s: %d bytes in %d chunks",
                source.blob,
                image.size,
                image.metadata.table.chunk_count,
            )
        ops = LayerOperations(self.images, self.stats)
        record.block_files = [os.path.join(record.fuse_dir, image.name) for image in self.images]

        if not config.block_only:
            os.makedirs(os.path.dirname(record.fuse_dir), mode=0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(record.fuse_dir, 0o700)
                self._created_fuse_dir = True
        write_record(record)  # before mounting: a crash from here on leaves a trail
        try:
            pyfuse3.init(ops, record.fuse_dir, fuse_options(config))
        except RuntimeError as exc:  # libfuse printed its reason to stderr (the daemon log)
            raise kernel_mount.MountError(
                f"cannot mount the FUSE file system at {record.fuse_dir}: {exc}"
            ) from None
        self._fuse_mounted = True
        nursery.start_soon(self._serve_fuse)
        log.info("serving %s at %s", ", ".join(record.block_files), record.fuse_dir)

        if not config.block_only:
            for block_file in record.block_files:
                erofs = await kernel_mount.mount_erofs(
                    block_file, record.mountpoint, on_loop_attached=self._loop_attached
                )
                record.erofs_mounts.append(erofs)
                write_record(record)
        record.ready = True
        write_record(record)
        self.stats.mark_ready()
        log.info("%s: ready after %.3f s", record.mountpoint, self.stats.ready_after_s or 0)

    def _loop_attached(self, device: str) -> None:
        self.record.loop_devices.append(device)
        write_record(self.record)

    async def _serve_fuse(self) -> None:
        self._fuse_serving = True
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=self.limits.fuse_workers)
        finally:
            self._fuse_serving = False
            self._fuse_done.set()
        if not self._stopping:
            log.warning(
                "%s: the FUSE file system was unmounted from outside; stopping",
                self.record.fuse_dir,
            )

    async def _watch_signals(
        self, signals: AsyncIterator[int], cancel_scope: trio.CancelScope
    ) -> None:
        async for signum in signals:
            log.info(
                "%s: %s received; unmounting", self.record.mountpoint, signal.Signals(signum).name
            )
            self._stopping = True
            if not self.record.ready or not self._fuse_serving:
                # Still starting up: cancel it (a mount(8) waiting on FUSE is killed with it)
                # and let the teardown undo what came up.
                cancel_scope.cancel()
                return
            # Kernel mounts go first, while FUSE still serves the reads of files open on
            # them; only then may the loop stop.
            try:
                await kernel_mount.unmount_kernel_mounts(self.record, lazy_fallback=True)
            except kernel_mount.MountError as exc:
                log.error("%s", exc)
            pyfuse3.terminate()
            return

    async def _teardown(self) -> None:
        """Undo whatever came up, in reverse order; keep going past failures."""
        record = self.record
        try:
            await kernel_mount.unmount_kernel_mounts(record, lazy_fallback=True)
        except kernel_mount.MountError as exc:
            log.error("%s", exc)
        if self._fuse_mounted:
            # After a bug stopped the loop or after terminate(): unmount(2) here, not by
            # the kernel reaping /dev/fuse, so nothing is left at the mountpoint.
            pyfuse3.close(unmount=True)
            self._fuse_mounted = False
        for image in self.images:
            await image.aclose()
        if self._created_fuse_dir:
            with contextlib.suppress(OSError):
                os.rmdir(record.fuse_dir)
        remove_record(record.mountpoint)


def run_daemon(config: DaemonConfig, on_ready: Callable[[], None]) -> None:
    """Serve the mount until SIGTERM/SIGINT or an outside unmount; `on_ready` is called once
    everything is mounted. Raises what made start-up fail, after undoing it."""
    Daemon(config).run(on_ready)


def _sole_exception(group: BaseExceptionGroup) -> BaseException:
    """The one real error inside a nursery's group (what the caller should see), or the
    group itself when several tasks failed."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group


# -- running in the background, and stopping --------------------------------------------------

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_READY = b"ready\n"


class DaemonStartError(Exception):
    """The background daemon did not come up; the message says why (one line)."""


def _user_facing() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for the user (bad input, unreachable source,
    a refused mount); anything else is a bug, reported with a pointer to the log."""
    from lazyfs.fetch.errors import FetchError
    from lazyfs.format.errors import FormatError
    from lazyfs.image.errors import LayerOpenError

    return (
        LayerOpenError,
        FormatError,
        FetchError,
        kernel_mount.MountError,
        DaemonStartError,
        OSError,
    )


def spawn_daemon(config: DaemonConfig, timeout_s: float = START_TIMEOUT_S) -> int:
    """Fork a daemon for `config` and wait until it reports ready. Returns its pid.

    Call before trio or pyfuse3 run in this process. The child starts a new session and
    writes to `config.log_file`. Raises DaemonStartError with the child's reason, or on
    timeout (after telling the child to stop and undo what it set up).
    """
    if config.log_file is None:
        raise ValueError("a background daemon needs a log file")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(read_fd)
            code = _daemon_child(config, write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        return _await_ready(read_fd, pid, timeout_s, config.log_file)
    finally:
        os.close(read_fd)


def _daemon_child(config: DaemonConfig, ready_fd: int) -> int:
    # A daemon of its own: no terminal, no inherited descriptors but the ready pipe, and no
    # hold on the caller's working directory (which would keep that file system busy).
    os.setsid()
    os.chdir("/")
    os.closerange(3, ready_fd)
    os.closerange(ready_fd + 1, os.sysconf("SC_OPEN_MAX"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    log_fd = os.open(config.log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    root = logging.getLogger()
    logging.basicConfig(
        force=True,
        stream=sys.stderr,
        level=min(root.level or logging.INFO, logging.INFO),
        format="%(asctime)s lazyfs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )

    def on_ready() -> None:
        _send(ready_fd, _READY)

    try:
        run_daemon(config, on_ready)
        return 0
    except _user_facing() as exc:
        log.log(logging.INFO if isinstance(exc, DaemonStartError) else logging.ERROR, "%s", exc)
        _send(ready_fd, f"error: {exc}\n".encode())
        return 2
    except BaseException as exc:
        log.exception("lazyfs daemon failed")
        _send(ready_fd, f"error: internal error ({exc!r}); details in {config.log_file}\n".encode())
        return 1


def _send(fd: int, message: bytes) -> None:
    """Tell the waiting parent; it may be gone (timed out), which is fine."""
    with contextlib.suppress(OSError):
        os.write(fd, message.replace(b"\n", b" ").rstrip() + b"\n")


def _await_ready(read_fd: int, pid: int, timeout_s: float, log_file: str) -> int:
    deadline = time.monotonic() + timeout_s
    received = b""
    try:
        while b"\n" not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                raise DaemonStartError(
                    f"the mount did not come up within {timeout_s:.0f} s (daemon {pid} told "
                    f"to stop); see {log_file}"
                )
            readable, _, _ = select.select([read_fd], [], [], remaining)
            if readable:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break
                received += chunk
    except KeyboardInterrupt:
        # Ctrl-C on `lazyfs mount` means no mount: the daemon must not come up later.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _reap(pid)
        raise
    line = received.decode(errors="replace").strip()
    if received == _READY:
        return pid
    _reap(pid)
    if line.startswith("error: "):
        raise DaemonStartError(line.removeprefix("error: "))
    raise DaemonStartError(f"the daemon exited during start-up; see {log_file}")


def _reap(pid: int, timeout_s: float = 10.0) -> None:
    """Collect a failed child (it has already undone its mounts when it reports)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)


async def stop_mount(
    record: MountRecord, *, lazy: bool = False, timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """Unmount everything `record` lists and end its daemon.

    With the daemon alive, the kernel mounts are taken down here first (so a busy mountpoint
    is reported to the caller while the daemon keeps serving), then the daemon gets SIGTERM
    and finishes the teardown. A dead or stuck daemon is replaced by umount(8), losetup -d
    and fusermount3 -u -z. Raises MountBusyError (unless `lazy`) or MountError.
    """
    if daemon_alive(record):
        await kernel_mount.unmount_kernel_mounts(record, lazy_fallback=lazy)
        os.kill(record.pid, signal.SIGTERM)
        if not await _wait_for_exit(record, timeout_s):
            log.warning("daemon %d did not stop within %.0f s; killing it", record.pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            await _wait_for_exit(record, 5.0)
    # Whatever the daemon could not finish (or nothing, after a clean stop).
    await kernel_mount.unmount_kernel_mounts(record, lazy_fallback=lazy)
    await kernel_mount.fuse_unmount_lazy(record.fuse_dir)
    if not record.block_only:
        with contextlib.suppress(OSError):
            os.rmdir(record.fuse_dir)
    remove_record(record.mountpoint)


async def _wait_for_exit(record: MountRecord, timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        while daemon_alive(record):
            await trio.sleep(0.05)
        return True
    return False
