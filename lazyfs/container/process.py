"""Run a command chrooted in a mounted image, in new mount and PID namespaces.

The namespaces, /proc, /dev and the chroot are set up by `_container_init.py`, a standalone
script run with this Python; this side starts it with our standard streams (so the command's
output appears as it runs) and stops it on Ctrl-C or SIGTERM: first the command gets a chance
to exit on its own, then SIGTERM, then SIGKILL, which takes the whole namespace down with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

INIT_SCRIPT = Path(__file__).with_name("_container_init.py")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# After an interrupt: how long the command may take to exit by itself, then after SIGTERM.
GRACE_S = 2.0
TERM_WAIT_S = 5.0
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class ContainerSpec:
    """What to run where: `root` is the mounted image, `cwd` a path inside it."""

    root: str
    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"


def container_env(image_env: Sequence[str]) -> dict[str, str]:
    """The command's environment: the image's `Env`, with PATH and HOME defaulted as container
    runtimes do, and the caller's TERM so that terminal programs work."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    for item in image_env:
        name, sep, value = item.partition("=")
        if sep and name:
            env[name] = value
    return env


def run_container(spec: ContainerSpec) -> int:
    """Run the command; return its exit status (128+N if signal N ended it, 125 if the
    container could not be set up). On Ctrl-C (KeyboardInterrupt) the command is stopped and
    its status returned all the same; everything in the namespace is gone when this returns.
    Raises OSError if the init script cannot be started.
    """
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", str(INIT_SCRIPT), json.dumps(asdict(spec))],
        close_fds=True,
    )
    try:
        return _shell_status(process.wait())
    except KeyboardInterrupt:
        return _shell_status(stop_container(process))
    finally:
        if process.poll() is None:  # an exception we did not expect: never leave it running
            process.kill()
            process.wait()


def _shell_status(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a shell reports it: 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def stop_container(process: subprocess.Popen[bytes]) -> int:
    """Stop the container after an interrupt; return its status as Popen does."""
    with interrupts_ignored():
        steps: list[tuple[int | None, float]] = [
            (signal.SIGTERM, TERM_WAIT_S),
            (signal.SIGKILL, TERM_WAIT_S),
        ]
        if _interrupt_reached_the_command():
            steps.insert(0, (None, GRACE_S))
        for signum, wait_s in steps:
            if signum is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
            try:
                return process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        return process.wait()


def _interrupt_reached_the_command() -> bool:
    """Whether a Ctrl-C came from our terminal, which also sent it to the command (we are in
    the terminal's foreground process group), rather than from `kill` to us alone."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for a while: a second Ctrl-C must not cut a shutdown short."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
