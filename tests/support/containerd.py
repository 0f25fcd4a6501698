"""Debian's containerd on a private socket, root and state, with `lazyfs snapshotter` as its
proxy snapshotter `lazyfs`, for tests that run real containers with runc.

`running_containerd(work)` starts both and yields a `Containerd`; on exit (also after a
failure) it kills containers, stops containerd and the snapshotter, and unmounts whatever
is left below `work`. Its CRI plugin is off unless a test gives the plugin's configuration
(`cri_config`, see tests/support/cri.py). Socket paths must stay short (108 bytes): `work`
should be a short temporary directory.

Each `Containerd` works in a namespace of its own: runc keeps container state in
/run/containerd/runc/NAMESPACE/ID and cgroups at /NAMESPACE/ID, the same for every
containerd of the machine, so two test runs at once (or a test and the benchmark) with one
namespace and the same container IDs would break each other's containers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.mounts import cleanup

REPO = Path(__file__).resolve().parents[2]
NAMESPACE_PREFIX = "lazyfs-test"
RUNC_STATE = Path("/run/containerd/runc")
CGROUPS = Path("/sys/fs/cgroup")
START_TIMEOUT_S = 30.0
CONTAINERD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
{cri_disabled}  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"

[debug]
  level = "debug"

[ttrpc]
  address = "{socket}.ttrpc"

[proxy_plugins]
  [proxy_plugins.lazyfs]
    type = "snapshot"
    address = "{snapshotter_socket}"
"""
CRI_PLUGIN = "io.containerd.grpc.v1.cri"


def require_containerd() -> None:
    if os.geteuid() != 0:
        pytest.skip("containerd tests need root")
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian's containerd and runc packages)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {path}:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


@dataclass
class Snapshotter:
    """`lazyfs snapshotter` in the foreground, as a child process."""

    root: Path
    socket: Path
    log: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        argv = [sys.executable, "-m", "lazyfs", "-v", "snapshotter", "--address",
                str(self.socket), "--root", str(self.root), "--insecure-registry", *self.extra]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_socket(self.socket, self.proc, self.log, "lazyfs snapshotter")

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self.proc = None
        return status

    def restart(self) -> None:
        self.stop()
        self.start()


def unique_namespace() -> str:
    return f"{NAMESPACE_PREFIX}-{secrets.token_hex(4)}"


@dataclass
class Containerd:
    work: Path
    snapshotter: Snapshotter
    namespace: str = field(default_factory=unique_namespace)
    proc: subprocess.Popen[bytes] | None = None
    cri_config: str | None = None  # the CRI plugin's TOML tables; None: the plugin is off

    @property
    def socket(self) -> Path:
        return self.work / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.work / "containerd.log"

    def start(self) -> None:
        config = self.work / "containerd.toml"
        text = CONTAINERD_CONFIG.format(
            root=self.work / "root", state=self.work / "state", socket=self.socket,
            snapshotter_socket=self.snapshotter.socket,
            cri_disabled="" if self.cri_config is not None else f'  "{CRI_PLUGIN}",\n')
        config.write_text(text + (self.cri_config or ""))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        _wait_for_socket(self.socket, self.proc, self.log, "containerd")

    def ctr_argv(self, namespace: str | None = None) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace",
                namespace or self.namespace]

    def ctr(self, *args: str, timeout: float = 120, check: bool = True,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*self.ctr_argv(namespace), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}\n"
                f"--- snapshotter log:\n{self.snapshotter.log.read_text()[-3000:]}")
        return result

    def lazyfs(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lazyfs", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def namespaces(self) -> list[str]:
        """Every namespace of this containerd (tests may use more than their own)."""
        result = subprocess.run(["ctr", "--address", str(self.socket), "namespaces", "ls",
                                 "-q"], capture_output=True, text=True, timeout=20,
                                check=False)
        return result.stdout.split() if result.returncode == 0 else [self.namespace]

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            for namespace in self.namespaces():
                tasks = self.ctr("tasks", "list", "-q", check=False, timeout=20,
                                 namespace=namespace).stdout.split()
                for task in tasks:
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=20,
                             namespace=namespace)
                    self.ctr("tasks", "delete", "-f", task, check=False, timeout=20,
                             namespace=namespace)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _kill_shims(work: Path) -> None:
    """Shims of our containerd (their command line names its socket) outlive it."""
    marker = str(work).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"containerd-shim" in cmdline and marker in cmdline:
                os.kill(int(pid), signal.SIGKILL)


def _remove_runc_leftovers(namespace: str) -> None:
    """runc's state and the (empty) cgroups of a namespace only our containerd used."""
    shutil.rmtree(RUNC_STATE / namespace, ignore_errors=True)
    for directory in [CGROUPS / namespace, *CGROUPS.glob(f"*/{namespace}")]:
        with contextlib.suppress(OSError):
            directory.rmdir()


@contextlib.contextmanager
def running_containerd(work: Path, snapshotter_args: list[str] | None = None,
                       cri_config: str | None = None) -> Iterator[Containerd]:
    """containerd and the lazyfs snapshotter under `work`, torn down on exit; with
    `cri_config`, containerd's CRI plugin is on and configured so."""
    require_containerd()
    work.mkdir(parents=True, exist_ok=True)
    snapshotter = Snapshotter(work / "lazyfs", work / "lazyfs.sock", work / "lazyfs.log",
                              snapshotter_args or [])
    containerd = Containerd(work, snapshotter, cri_config=cri_config)
    namespaces = [containerd.namespace]
    try:
        snapshotter.start()
        containerd.start()
        yield containerd
    finally:
        try:
            with contextlib.suppress(Exception):
                namespaces = containerd.namespaces()
            containerd.stop()
        finally:
            snapshotter.stop()
            _kill_shims(work)
            cleanup([work / "state", work / "root", work / "lazyfs"], [work])
            for namespace in namespaces:
                if namespace.startswith(NAMESPACE_PREFIX):
                    _remove_runc_leftovers(namespace)
