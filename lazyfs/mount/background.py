"""Running the mount daemon in the background, and stopping it from another process.

`spawn_daemon` forks the daemon and waits on a pipe until it reports ready (or why not);
`stop_mount` takes a mount down from its record, with the daemon's help while it is alive and
without it (umount, losetup, fusermount3) when it died.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import select
import shutil
import signal
import sys
import time

import trio

from lazyfs.mount import kernel, stack
from lazyfs.mount.daemon import DaemonConfig, DaemonStartError, run_daemon
from lazyfs.mount.heap import bound_heap
from lazyfs.mount.state import MountRecord, daemon_alive, remove_record

log = logging.getLogger(__name__)

# What a daemon imports on its way to ready that the command has not (httpx's transport, the
# decoder): imported before the fork, while a head start's answers travel, they are there
# from the daemon's first instant instead of after it.
DAEMON_MODULES = ("lazyfs.fetch.local", "httpcore", "zstandard")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_READY = b"ready\n"


def _user_facing() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for the user (bad input, unreachable source,
    a refused mount); anything else is a bug, reported with a pointer to the log."""
    from lazyfs.cache.disk import DiskCacheError
    from lazyfs.fetch.errors import FetchError
    from lazyfs.format.errors import FormatError
    from lazyfs.layer.errors import LayerOpenError

    return (
        DiskCacheError,
        LayerOpenError,
        FormatError,
        FetchError,
        kernel.MountError,
        DaemonStartError,
        OSError,
    )


def preload_daemon_modules() -> None:
    """Import what a daemon will need (`DAEMON_MODULES`) into this process, to be forked."""
    for name in DAEMON_MODULES:
        importlib.import_module(name)


def spawn_daemon(config: DaemonConfig, timeout_s: float = START_TIMEOUT_S) -> int:
    """Fork a daemon for `config` and wait until it reports ready. Returns its pid.

    Call before trio or pyfuse3 run in this process. The child starts a new session and
    writes to `config.log_file`. Raises DaemonStartError with the child's reason, or on
    timeout (after telling the child to stop and undo what it set up).
    """
    if config.log_file is None:
        raise ValueError("a background daemon needs a log file")
    read_fd, write_fd = os.pipe()
    config.forked_at = time.monotonic()
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
    feed = config.warm_feed
    # The head start's connections whose answers are still arriving stay open too: the
    # daemon reads the rest of them.
    arriving = {rest.fd for source in config.sources if source.primed is not None
                for rest in source.primed.rests.values()}
    _close_all_but({ready_fd, *arriving,
                    *((feed.records, feed.stop) if feed is not None else ())})
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

    bound_heap()
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


def _close_all_but(keep: set[int]) -> None:
    """Close every descriptor from 3 on but those in `keep`."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


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
        # Asked to detach lazily: waiting for a busy mount to become free is pointless.
        attempts = 1 if lazy else kernel.UNMOUNT_ATTEMPTS
        await kernel.unmount_kernel_mounts(record, lazy_fallback=lazy, attempts=attempts)
        os.kill(record.pid, signal.SIGTERM)
        if not await _wait_for_exit(record, timeout_s):
            log.warning("daemon %d did not stop within %.0f s; killing it", record.pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            await _wait_for_exit(record, 5.0)
    await undo_mounts(record, lazy=lazy)


async def undo_mounts(record: MountRecord, *, lazy: bool = False) -> None:
    """Take down whatever the record lists without a daemon's help (after a clean stop,
    nothing is left): overlays, EROFS mounts, loop devices, FUSE, the private directories
    and the record. Raises MountBusyError (unless `lazy`) or MountError."""
    await kernel.unmount_kernel_mounts(record, lazy_fallback=lazy)
    await kernel.fuse_unmount_lazy(record.fuse_dir)
    if not record.block_only:
        with contextlib.suppress(OSError):
            os.rmdir(record.fuse_dir)
    stack.remove_layer_dirs(record)
    remove_temp_dir(record)
    remove_record(record.mountpoint)


def remove_temp_dir(record: MountRecord) -> None:
    """Delete the record's scratch directory, unless something is still mounted below it
    (a lazily detached busy mount): deleting through a mount would delete its files."""
    if record.temp_dir is None or not os.path.isdir(record.temp_dir):
        return
    if kernel.mounts_at_or_below(record.temp_dir):
        log.warning("%s: still has mounts below it; not removed", record.temp_dir)
        return
    shutil.rmtree(record.temp_dir, ignore_errors=True)


async def _wait_for_exit(record: MountRecord, timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        while daemon_alive(record):
            await trio.sleep(0.05)
        return True
    return False
