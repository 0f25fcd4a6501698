"""Run one command in a mounted root file system, in new mount and PID namespaces.

A standalone script, started by `lazyfs.container.process` with the host's Python (`-I -S`, so
it imports nothing from the environment); argv[1] is a JSON object with `root`, `argv`,
`env` and `cwd`. Three processes:

  supervisor  unshares the namespaces and forks the namespace's init; forwards SIGTERM,
              SIGHUP and SIGQUIT to it and exits with its status.
  init        PID 1 of the new namespace: mounts /proc, a /dev with the usual device nodes
              (and /dev/shm) on tmpfs, makes sure /tmp exists, chroots, forks the command,
              forwards signals to it, reaps orphans, and exits with the command's status.
              When it exits the kernel kills whatever the command left behind; when the
              supervisor dies it gets SIGKILL (PR_SET_PDEATHSIG), so nothing outlives us.
  command     exec'd with default signal handling.

SIGINT is ignored by the supervisor and init: a Ctrl-C at the terminal reaches the command
directly (it is in the terminal's foreground process group), and only once.

Exit status: the command's; 128+N if a signal N ended it; 125 if the container could not be
set up, 126 or 127 if the command could not be executed (as a shell reports).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import stat
import sys
from types import FrameType
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
SETUP_FAILED, CANNOT_EXECUTE, NOT_FOUND = 125, 126, 127

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        libc.mount(
            source and source.encode(),
            target.encode(),
            fstype and fstype.encode(),
            ctypes.c_ulong(flags),
            data and data.encode(),
        ),
        f"mount {fstype or source} at {target}",
    )


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _supervise(child: int, reap_all: bool) -> int:
    """Forward signals to `child` until it exits; return its exit code. PID 1 also reaps
    every orphan the command leaves it."""

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.waitpid(-1 if reap_all else child, 0)
        except ChildProcessError:
            return SETUP_FAILED
        if pid == child:
            return _exit_code(status)


def _prepare_root(root: str) -> None:
    proc = os.path.join(root, "proc")
    os.makedirs(proc, exist_ok=True)
    _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = os.path.join(root, "dev")
    os.makedirs(dev, exist_ok=True)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
    for name, (major, minor) in DEVICES.items():
        path = os.path.join(dev, name)
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod applies the umask
    for name, target in LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    shm = os.path.join(dev, "shm")
    os.mkdir(shm, 0o1777)
    _mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    tmp = os.path.join(root, "tmp")
    if not os.path.isdir(tmp):
        os.mkdir(tmp)
        os.chmod(tmp, 0o1777)


def _namespace_init(spec: dict[str, Any]) -> int:
    """PID 1: set up the root, start the command, wait for it."""
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _prepare_root(spec["root"])
        os.chroot(spec["root"])
        os.chdir(spec["cwd"] or "/")
    except OSError as exc:
        print(f"lazyfs run: cannot set up the container: {exc}", file=sys.stderr, flush=True)
        return SETUP_FAILED
    command = os.fork()
    if command == 0:
        for signum in (signal.SIGINT, *FORWARDED):
            signal.signal(signum, signal.SIG_DFL)
        argv, env = spec["argv"], spec["env"]
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            print(f"lazyfs run: {argv[0]}: {exc.strerror}", file=sys.stderr, flush=True)
            os._exit(NOT_FOUND if exc.errno == errno.ENOENT else CANNOT_EXECUTE)
    return _supervise(command, reap_all=True)


def main() -> int:
    spec = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare")
        # Nothing mounted in here may propagate back to the host.
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        print(f"lazyfs run: cannot create namespaces: {exc}", file=sys.stderr, flush=True)
        return SETUP_FAILED
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        code = SETUP_FAILED
        try:
            code = _namespace_init(spec)
        finally:
            os._exit(code)
    return _supervise(child, reap_all=False)


if __name__ == "__main__":
    sys.exit(main())
