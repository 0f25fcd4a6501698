"""A container start from an image, measured: the image mounted lazily (a daemon fetches and
verifies only the chunks the command reads) or eagerly (every blob pulled first), stacked
under a writable upper layer; the command run in it (`process.run_container`); everything
torn down again, also after a failure or Ctrl-C; and a `RunReport` of what it cost.

`prepare` resolves the image (nothing is mounted yet); `run` does the rest. Messages for the
user on the way (teardown problems, what the daemon logged as a problem) go to `notify`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.container.process import (
    ContainerSpec,
    container_env,
    interrupts_ignored,
    run_container,
)
from lazyfs.container.report import LayerReport, RunReport, lazy_layer_report
from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.platform import Platform
from lazyfs.mount import kernel
from lazyfs.mount.images import ImageSet, image_record
from lazyfs.mount.service import (
    MountOptions,
    StatsError,
    image_config,
    read_stats,
    resolve,
    start,
    unmount,
    writable_dirs,
)
from lazyfs.mount.state import MountRecord, StateError, ensure_state_dir, private_dir
from lazyfs.oci.registry_source import ResolvedImage

if TYPE_CHECKING:
    from lazyfs.oci.eager_pull import PulledLayer
    from lazyfs.startup.begin import EarlyStart

Notify = Callable[[str], None]
"""Called with a one-line message for the user."""


class RunError(LazyfsError):
    """The run cannot start as asked (no command, an unusable writable directory)."""


@dataclass(frozen=True)
class RunRequest:
    """What to run: `command` empty means the image's entrypoint and command. `writable` is
    a directory to keep the changes in (default: a temporary upper layer)."""

    reference: str
    command: tuple[str, ...] = ()
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    platform: Platform | None = None
    eager: bool = False
    insecure: bool = False
    writable: str | None = None
    mount: MountOptions = field(default_factory=MountOptions)

    @property
    def mode(self) -> str:
        return "eager" if self.eager else "lazy"


@dataclass(frozen=True)
class PreparedRun:
    """A request with its image resolved and pinned, and the command to run."""

    request: RunRequest
    found: ImageSet
    argv: list[str]

    @property
    def image(self) -> ResolvedImage:
        return self.found.images[0]


def prepare(request: RunRequest, early: EarlyStart | None = None) -> PreparedRun:
    """Resolve the image and choose the command, with the answers of the `early` requests
    (`lazyfs.startup.begin`). Raises ImageResolveError, FetchError, RunError (no command)."""
    found = resolve(
        [request.reference], request.registry, request.platform, insecure=request.insecure,
        # An eager run downloads every blob anyway; a lazy one may run offline from the cache.
        disk=None if request.eager else request.mount.disk_cache, early=early,
    )
    image = found.images[0]
    argv = list(request.command) or [*image.config.entrypoint, *image.config.cmd]
    if not argv:
        raise RunError(f"{request.reference}: the image has no command; give one after --")
    return PreparedRun(request, found, argv)


def run(prepared: PreparedRun, *, started: float, notify: Notify,
        early: EarlyStart | None = None) -> RunReport:
    """Mount, run the command, tear down; `started` is when the run began (monotonic). Returns
    the report (its exit code the command's). The lazy mount's daemon starts with what the
    `early` warm start loaded from the disk cache meanwhile, and takes over its loader
    (`lazyfs.startup.begin`). Raises what made the mount fail, after the teardown;
    KeyboardInterrupt stops the command and tears down."""
    request, image = prepared.request, prepared.image
    ensure_state_dir()
    if request.writable:
        try:
            upper, workdir = writable_dirs(request.writable)
        except OSError as exc:
            raise RunError(f"--writable {request.writable}: {exc.strerror}") from None
    work = Path(tempfile.mkdtemp(prefix="lazyfs-run-"))
    root = work / "root"
    root.mkdir()
    if not request.writable:
        upper, workdir = writable_dirs(str(work / "rw"))
    report = RunReport(mode=request.mode, image=image.pinned, platform=image.platform)
    spec = ContainerSpec(
        str(root), prepared.argv, container_env(image.config.env), image.config.working_dir or "/"
    )
    try:
        if request.eager:
            from lazyfs.mount.eager import mount_eager  # eager runs only: not on a lazy start

            target = image_record(request.reference, image, str(root), upper, workdir)
            pulled = mount_eager(target, image, request.registry, work).layers
        else:
            config = image_config(
                prepared.found,
                [request.reference],
                [str(root)],
                writable=(upper, workdir),
                options=request.mount,
                temp_dir=str(work),
            )
            config.command_started = started  # the phases count from the run's start
            record = start(config, early)
        report.mounted_s = time.monotonic() - started
        report.exit_code = run_container(spec)
        report.total_s = time.monotonic() - started
        report.command_s = report.total_s - report.mounted_s
        if request.eager:
            report.layers = _eager_layers(pulled)
        else:
            report.layers, report.phases = _lazy_stats(image, record, notify)
    finally:
        with interrupts_ignored():
            _teardown(
                root, work, eager=request.eager, relay_log=report.mounted_s > 0, notify=notify
            )
    return report


def _lazy_stats(image: ResolvedImage, record: MountRecord, notify: Notify
                ) -> tuple[list[LayerReport], dict[str, float | None]]:
    """Per-layer numbers and the start-up phases from the daemon's stats file (none if it
    cannot be read)."""
    try:
        stats: dict[str, Any] = read_stats(record)
    except StatsError as exc:
        notify(f"no layer statistics: {exc}")
        return [], {}
    layers = stats.get("layers", {})
    phases = stats.get("daemon", {}).get("phases") or {}
    return [
        lazy_layer_report(layer.name, layer.digest, layer.size, layers.get(layer.name, {}))
        for layer in image.distinct_layers
    ], dict(phases)


def _eager_layers(pulled: list[PulledLayer]) -> list[LayerReport]:
    return [
        LayerReport(layer.name, layer.digest, layer.blob_size, layer.blob_size, requests=1)
        for layer in pulled
    ]


def _teardown(root: Path, work: Path, *, eager: bool, relay_log: bool, notify: Notify) -> None:
    """Unmount everything (the daemon's way for a lazy run), pass on what the daemon logged
    as a problem (if `relay_log`: a failed start has already said why), and delete the
    scratch directory. Reports failures, never raises."""
    try:
        if eager:
            from lazyfs.mount.eager import unmount_eager

            unmount_eager(str(root))
        else:
            unmount(str(root), lazy=True, missing_ok=True)
    except (kernel.MountError, StateError) as exc:
        notify(str(exc))
    log_file = private_dir(root, ".log")
    with contextlib.suppress(FileNotFoundError):
        for line in log_file.read_text(errors="replace").splitlines() if relay_log else []:
            if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                notify(f"daemon: {line}")
        log_file.unlink()
    if kernel.mounts_at_or_below(work):
        notify(f"{work} still has mounts below it; not removed")
    else:
        shutil.rmtree(work, ignore_errors=True)
