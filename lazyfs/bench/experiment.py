"""The start-up experiment: `lazyfs run IMAGE -- CMD` in each mode asked, a number of times
each, interleaved (lazy, eager, lazy, eager, ...), every run timed by `lazyfs run` itself
(`--report`: from its process's start to the command's exit).

Each run is a `lazyfs run` process of its own, as a user would start it, in a session of its
own: a Ctrl-C at the terminal reaches the bench, which passes one SIGINT on to the run in
flight, waits for it to tear down and then stops (`KeyboardInterrupt`). Cold runs start with
empty caches: the kernel's page cache dropped (where the bench may: root), then lazyfs's
program files read in again (layer data cold, programs warm, as on a machine that ran them
before), and a disk cache directory of the run's own. A warm run is the second start with the
disk cache an untimed first start filled. Every run's scratch files (its TMPDIR, caches,
report, output) live in one directory of the bench, removed at the end; whatever a run that had
to be killed left mounted there is unmounted.

With a `LinkSpec`, the registry is reached through the link emulator (`link.py`, one link
shared by all connections) in a process of its own: the runs name the image by the
emulator's address. That needs a registry spoken to in plain HTTP (the emulator forwards TCP
to a local port, so TLS would check the registry's certificate against that), and no mirror
(it would be reached past the link).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import trio

from lazyfs import __version__
from lazyfs.bench.link import LinkSpec, start_link_emulator
from lazyfs.bench.results import (
    MODES,
    Environment,
    LayerInfo,
    RunResult,
    result_of_report,
)
from lazyfs.bench.trace import TraceError, TraceEvent, read_trace
from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.platform import Platform
from lazyfs.format.reference import ImageReference
from lazyfs.startup.open import LayerSource

Progress = Callable[[str], None]
"""Told, as the bench goes, what it is doing now (one line, no newline)."""

# How long a run may take to tear down after the SIGINT an interrupted bench passes on, and
# after the SIGTERM that follows, before it is killed.
INTERRUPT_WAIT_S = 60.0
TERM_WAIT_S = 10.0
# Read in again after the page cache was dropped: the program files of both kinds of start.
PROGRAMS = (
    [sys.executable, "-c", "import lazyfs.cli.run, lazyfs.startup.begin, lazyfs.mount.service, "
     "lazyfs.container.run, lazyfs.fetch.http, lazyfs.layer.remote_image, lazyfs.oci.eager_pull, "
     "httpx, httpcore, trio, zstandard, pyfuse3"],
    ["mount", "--version"],
    ["umount", "--version"],
)
_TAIL_LINES = 3


class BenchError(LazyfsError):
    """The bench cannot run as asked, or a run failed (the message names its mode and run)."""


@dataclass(frozen=True)
class BenchRequest:
    """What to measure. `registry_args` (--insecure-registry, --platform, --creds, --mirror)
    go to every run, `run_options` to every `lazyfs run` (they include `registry_args`, and
    --insecure, --readahead, --cache-size); `registry`, `platform` and `insecure` are the same
    for the bench's own look at the image. `trace` records the lazy runs' chunk accesses."""

    image: str
    command: tuple[str, ...]
    modes: tuple[str, ...] = MODES
    repeat: int = 3
    link: LinkSpec | None = None
    prefetch_file: str | None = None
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    platform: Platform | None = None
    insecure: bool = False
    registry_args: tuple[str, ...] = ()
    run_options: tuple[str, ...] = ()
    trace: bool = False


@dataclass
class BenchOutcome:
    """Every run in the order they ran, the environment, and the traces of the traced runs
    (by the run's `order`)."""

    environment: Environment
    results: list[RunResult] = field(default_factory=list)
    traces: dict[int, list[TraceEvent]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Image:
    """What the bench learned of the image: `ordinary` when its layers are not seekable
    EROFS (only an eager pull runs it: `pull.py`)."""

    reference: ImageReference
    manifest_digest: str
    platform: str
    layers: tuple[LayerInfo, ...]
    blob_url: str
    carries_prefetch: bool = False
    ordinary: bool = False


def run_bench(request: BenchRequest, progress: Progress,
              done: Callable[[RunResult], None] = lambda result: None) -> BenchOutcome:
    """Run the experiment; `done` is told of each run as it ends. Returns every run's figures.
    Raises BenchError, KeyboardInterrupt (after the run in flight tore down)."""
    for mode in request.modes:
        if mode not in MODES:
            raise BenchError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    if request.repeat < 1:
        raise BenchError("--repeat must be 1 or more")
    progress(f"looking at {request.image}")
    image = _inspect(request)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            reference = request.image
            if request.link is not None:
                reference = _through_link(request, image, stack)
            bench = _Bench(request, image, reference, work, progress)
            bench.prepare_prefetch()
            outcome = BenchOutcome(bench.environment())
            order = 0
            for number in range(1, request.repeat + 1):
                for mode in request.modes:
                    order += 1
                    progress(f"[{order}/{request.repeat * len(request.modes)}] {mode}, run "
                             f"{number} of {request.repeat}")
                    result, trace = bench.run(mode, number, order)
                    outcome.results.append(result)
                    if trace is not None:
                        outcome.traces[order] = trace
                    done(result)
            return outcome
    finally:
        _clean_up(work, progress)


def _inspect(request: BenchRequest) -> _Image:
    """Resolve the image as the runs will, and read each layer's chunk size."""
    from lazyfs.mount.service import resolve
    from lazyfs.oci.registry_source import UnconvertedLayerError

    try:
        try:
            found = resolve([request.image], request.registry, request.platform,
                            insecure=request.insecure)
        except UnconvertedLayerError as exc:
            if request.modes != ("eager",):
                raise BenchError(f"{exc}; as it is, only --modes eager runs it") from None
            return trio.run(_inspect_ordinary, request)
        chunks = trio.run(_chunk_tables, found.sources)
    except (LazyfsError, ValueError) as exc:
        if isinstance(exc, BenchError):
            raise
        message = str(exc)
        raise BenchError(message if message.startswith(request.image)
                         else f"{request.image}: {message}") from None
    resolved = found.images[0]
    layers = tuple(
        LayerInfo(layer.name, layer.digest, layer.size, *chunks.get(layer.name, (None, None)))
        for layer in resolved.distinct_layers)
    return _Image(resolved.reference, resolved.manifest_digest, resolved.platform, layers,
                  found.sources[0].blob,
                  any(layer.prefetch is not None for layer in resolved.layers))


async def _inspect_ordinary(request: BenchRequest) -> _Image:
    """An image whose layers are not seekable EROFS, as `pull.py` resolves it."""
    from lazyfs.bench.pull import resolve_ordinary
    from lazyfs.oci.names import host_platform

    reference = ImageReference.parse(request.image)
    async with request.registry.client(reference.registry) as client:
        image = await resolve_ordinary(client, reference, request.platform or host_platform())
        url = client.blob_url(reference.repository, image.layers[0].digest)
    layers = tuple(LayerInfo(layer.name, layer.digest, layer.size)
                   for layer in {layer.digest: layer for layer in image.layers}.values())
    return _Image(reference, image.manifest_digest, image.platform, layers, url,
                  ordinary=True)


async def _chunk_tables(sources: Sequence[LayerSource]) -> dict[str, tuple[int, int]]:
    """(chunk size, chunk count) of each layer, from its metadata (one range request)."""
    from lazyfs.fetch.local import open_blob_reader
    from lazyfs.format.descriptor import SeekableAnnotations
    from lazyfs.startup.metadata import load_metadata

    found: dict[str, tuple[int, int]] = {}
    for source in sources:
        if source.chunk_table_offset is None or source.name is None:
            continue
        annotations = SeekableAnnotations(source.chunk_table_offset, source.chunk_digest,
                                          source.verity_offset, source.root_digest)
        reader = open_blob_reader(source.blob, source.reader_options)
        try:
            loaded = await load_metadata(reader, annotations, 0)
        finally:
            await reader.aclose()
        table = loaded.metadata.table
        found[source.name] = (table.chunk_size, table.chunk_count)
    return found


def _through_link(request: BenchRequest, image: _Image, stack: contextlib.ExitStack) -> str:
    """Start the link emulator in front of the image's registry; the image's reference
    through it."""
    assert request.link is not None
    if request.registry.mirrors:
        raise BenchError("--link: not with --mirror (the mirror would be reached past the link)")
    url = urlsplit(image.blob_url)
    if url.scheme != "http" or url.hostname is None:
        raise BenchError(
            f"--link: {image.reference.registry} is spoken to over {url.scheme}; the "
            "link emulator forwards a local port, which TLS would not accept for the "
            "registry's name: use a registry reached in plain HTTP (--insecure-registry)")
    link = request.link
    try:
        port, process = start_link_emulator(url.port or 80, link.rtt_ms, link.rate_mbit,
                                            aggregate=True, target_host=url.hostname, tied=True)
    except RuntimeError as exc:
        raise BenchError(f"--link: {exc}") from None
    stack.callback(_stop_emulator, process)
    reference = ImageReference.parse(request.image)
    return str(replace(reference, registry=f"127.0.0.1:{port}"))


def _stop_emulator(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=TERM_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdin is not None:
        process.stdin.close()


class _Bench:
    """The runs of one bench, their scratch space in `work`."""

    def __init__(self, request: BenchRequest, image: _Image, reference: str, work: Path,
                 progress: Progress) -> None:
        self.request, self.image, self.reference = request, image, reference
        self.work, self.progress = work, progress
        self.drops_page_cache = _can_drop_page_cache()
        self.prefetch_options: list[str] = []
        self.prefetch_source: str | None = None
        self.started_at = _now()
        self._scratch = 0

    def environment(self) -> Environment:
        request, image = self.request, self.image
        link = request.link
        return Environment(
            lazyfs_version=__version__, image=request.image, reference=self.reference,
            image_digest=image.manifest_digest, platform=image.platform,
            layers=self.image.layers, command=request.command, modes=request.modes,
            repeat=request.repeat,
            link=None if link is None else {"rtt_ms": link.rtt_ms, "rate_mbit": link.rate_mbit},
            prefetch_list=self.prefetch_source, page_cache_dropped=self.drops_page_cache,
            kernel=platform.release(), machine=platform.machine(),
            python=platform.python_version(), cpu_count=os.cpu_count() or 1,
            started_at=self.started_at)

    def prepare_prefetch(self) -> None:
        """The prefetch runs' list: the one given, else the image's, else one a first lazy run
        records (untimed)."""
        if "prefetch" not in self.request.modes:
            return
        if self.request.prefetch_file is not None:
            path = os.path.abspath(self.request.prefetch_file)
            self.prefetch_options, self.prefetch_source = ["--prefetch", path], path
        elif self.image.carries_prefetch:
            self.prefetch_source = "the image's"
        else:
            self.progress("recording a prefetch list (an untimed lazy run)")
            recorded = self.work / "prefetch.json"
            self._lazyfs_run("prefetch list", 0, ["--no-prefetch", "--record", str(recorded)],
                             cache=self._cache_dir())
            if not recorded.exists():
                raise BenchError("prefetch list: the recording run wrote none")
            self.prefetch_options = ["--prefetch", str(recorded)]
            self.prefetch_source = "recorded by a first lazy run"

    def run(self, mode: str, number: int, order: int
            ) -> tuple[RunResult, list[TraceEvent] | None]:
        """One timed run of `mode`, and its trace if it was traced."""
        options: list[str] = []
        cache: Path | None = None
        trace: Path | None = None
        if mode == "eager":
            options = ["--eager", "--no-disk-cache"]
        else:
            cache = self._cache_dir()
            if mode == "lazy":
                options = ["--no-prefetch"]
                if self.request.trace:
                    trace = self.work / f"trace-{order}.jsonl"
                    options += ["--trace", str(trace)]
            elif mode == "prefetch":
                options = list(self.prefetch_options)
            elif mode == "warm":
                self.progress(f"warm, run {number} of {self.request.repeat}: first start, "
                              "filling the disk cache (untimed)")
                self._lazyfs_run("warm", number, [], cache=cache, what="its first start")
                self.progress(f"warm, run {number} of {self.request.repeat}: second start")
        try:
            started_at = _now()
            report = self._lazyfs_run(mode, number, options, cache=cache)
        finally:
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
        where = f"{mode} run {number} of {self.request.repeat}"
        try:
            result = result_of_report(report, mode, number, order, started_at)
        except (KeyError, TypeError, ValueError) as exc:
            raise BenchError(f"{where}: an unreadable report ({exc})") from None
        digest = str(report.get("image", "")).rpartition("@")[2]
        if digest != self.image.manifest_digest:
            raise BenchError(f"{where}: ran {digest}, not {self.image.manifest_digest}: the "
                             "tag moved while the bench ran")
        if trace is None:
            return result, None
        try:
            return result, read_trace(trace)
        except TraceError:
            return result, []

    def _cache_dir(self) -> Path:
        self._scratch += 1
        cache = self.work / f"cache-{self._scratch}"
        cache.mkdir(mode=0o700)
        return cache

    def _lazyfs_run(self, mode: str, number: int, options: list[str], *, cache: Path | None,
                    what: str = "") -> dict[str, object]:
        """Start with cold caches, run `lazyfs run` with `options`, return its report.
        Raises BenchError naming the run (and `what` part of it failed)."""
        self._scratch += 1
        scratch = self.work / f"run-{self._scratch}"
        tmp = scratch / "tmp"
        tmp.mkdir(parents=True, mode=0o700)
        report = scratch / "report.json"
        argv = [sys.executable, "-m", "lazyfs", "run", self.reference,
                *self.request.run_options, *options,
                *(["--cache-dir", str(cache)] if cache is not None else []),
                "--report", str(report), "--", *self.request.command]
        if self.image.ordinary:  # only eager runs: what a container engine does (pull.py)
            argv = [sys.executable, "-m", "lazyfs.bench.pull", *self.request.registry_args,
                    "--report", str(report), self.reference, "--", *self.request.command]
        where = (f"{mode} run {number} of {self.request.repeat}" if number else mode)
        if what:
            where += f", {what}"
        self._cold()
        with open(scratch / "stdout", "wb") as stdout, open(scratch / "stderr", "wb") as stderr:
            code = _run_child(argv, {**os.environ, "TMPDIR": str(tmp)}, stdout, stderr)
        errors = (scratch / "stderr").read_text(errors="replace").strip().splitlines()
        if not report.exists():
            failure = next((line for line in reversed(errors) if ": error: " in line), None)
            detail = failure or " / ".join(errors[-_TAIL_LINES:]) or "no output"
            raise BenchError(f"{where}: the run failed (exit code {code}): {detail}")
        data: dict[str, object] = json.loads(report.read_text())
        if data.get("exit_code") != 0:
            # What the command said: its stderr comes before lazyfs run's report.
            ends = [index for index, line in enumerate(errors)
                    if line.startswith("lazyfs run: ") and ": exit code " in line]
            said = errors[:ends[-1]] if ends else errors
            output = (scratch / "stdout").read_text(errors="replace").strip().splitlines()
            tail = [line for line in said + output if not line.startswith("lazyfs run: ")]
            raise BenchError(f"{where}: the command exited with {data.get('exit_code')}"
                             + (f": {' / '.join(tail[-_TAIL_LINES:])}" if tail else ""))
        shutil.rmtree(scratch, ignore_errors=True)
        return data

    def _cold(self) -> None:
        """The page cache dropped (where this process may), the programs read in again."""
        if not self.drops_page_cache:
            return
        os.sync()
        with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as stream:
            stream.write("3\n")
        for argv in PROGRAMS:
            with contextlib.suppress(OSError):
                subprocess.run(argv, capture_output=True, check=False, timeout=60)


def _can_drop_page_cache() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _run_child(argv: list[str], env: dict[str, str], stdout: IO[bytes], stderr: IO[bytes]) -> int:
    """Run `argv` in a session of its own; returns its exit status. On KeyboardInterrupt
    the child gets one SIGINT and the time to tear down (then SIGTERM, then SIGKILL), and the
    interrupt goes on once it has ended."""
    from lazyfs.container.process import interrupts_ignored

    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                               env=env, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        with interrupts_ignored():
            for signum, wait_s in ((signal.SIGINT, INTERRUPT_WAIT_S),
                                   (signal.SIGTERM, TERM_WAIT_S), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
                try:
                    process.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        raise
    finally:
        if process.poll() is None:  # an exception we did not expect: leave nothing running
            process.kill()
            process.wait()


def _clean_up(work: Path, progress: Progress) -> None:
    """Unmount what a killed run left in `work` (none did unless one had to be killed), then
    remove it."""
    from lazyfs.container.process import interrupts_ignored
    from lazyfs.mount import kernel

    with interrupts_ignored():
        for mount in _leftover_roots(work):
            progress(f"unmounting {mount}, left by a run that was killed")
            _unmount_leftover(mount)
        for left in kernel.mounts_at_or_below(work):  # an eager pull's overlay, say
            progress(f"unmounting {left.mountpoint}, left by a run that was killed")
            with contextlib.suppress(kernel.MountError):
                trio.run(functools.partial(kernel.unmount, left.mountpoint,
                                           lazy_fallback=True))
        if kernel.mounts_at_or_below(work):
            progress(f"{work} still has mounts below it; not removed")
            return
        shutil.rmtree(work, ignore_errors=True)


def _leftover_roots(work: Path) -> Iterator[str]:
    from lazyfs.mount.state import MountRecord, iter_records

    prefix = str(work).rstrip("/") + "/"
    for record in iter_records():
        if isinstance(record, MountRecord) and record.mountpoint.startswith(prefix):
            yield record.mountpoint


def _unmount_leftover(mountpoint: str) -> None:
    from lazyfs.mount import kernel
    from lazyfs.mount.eager import unmount_eager
    from lazyfs.mount.service import unmount
    from lazyfs.mount.state import StateError

    try:
        unmount(mountpoint, lazy=True, missing_ok=True)
    except (kernel.MountError, StateError, LazyfsError):
        with contextlib.suppress(kernel.MountError, StateError, LazyfsError):
            unmount_eager(mountpoint)
