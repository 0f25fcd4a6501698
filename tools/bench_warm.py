#!/usr/bin/env python3
"""Warm starts from the disk cache: the `--warm` cells of tools/bench_run.

For an image in a registry and a command, four ways to start it, each timed from the start of
the run to the command's exit (what `lazyfs run` reports), page cache dropped before each:

  lazy, no disk cache   `lazyfs run --no-disk-cache REF -- CMD`
  lazy, first start     `lazyfs run --cache-dir EMPTY REF -- CMD`: fetches, and fills the cache
  lazy, second start    the same once more: what the first start read comes from the disk
  eager, unpacked       every layer downloaded and decompressed beforehand (not timed), then
                        the EROFS images mounted, stacked and CMD run, as `lazyfs run --eager`
                        does after its pull (this script's `run-unpacked` mode, a Python
                        process that loads the same modules as `lazyfs run --eager`)

Goals: second start <= 1.2 x eager unpacked; first start <= 1.05 x no disk cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LazyRun = Callable[[str, bool, list[str], Path, list[str]], dict[str, Any]]
"""bench_run's `lazyfs_run(reference, eager, command, work, lazy_options)`."""


# -- the eager baseline with the layers pulled beforehand ----------------------------------------


def prepare_unpacked(reference: str, work: Path) -> Path:
    """Pull and decompress every layer of `reference` into `work/unpacked` (once per manifest
    digest); return the plan file that `run-unpacked` mounts from."""
    import trio

    from lazyfs.fetch.registry_options import RegistryOptions
    from lazyfs.mount.service import resolve
    from lazyfs.oci.eager_pull import pull_layers

    options = RegistryOptions(insecure=True)
    image = resolve([reference], options).images[0]
    directory = work / "unpacked"
    plan_file = directory / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text())["digest"] == image.manifest_digest:
        return plan_file
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)

    async def pull() -> dict[str, str]:
        async with options.client(image.reference.registry) as client:
            pulled = await pull_layers(client, image.reference.repository, image.distinct_layers,
                                       directory)
        return {layer.name: str(layer.image_file) for layer in pulled}

    files = trio.run(pull)
    plan = {
        "reference": reference,
        "digest": image.manifest_digest,
        "platform": image.platform,
        "layers": [layer.name for layer in image.layers],
        "files": files,
        "env": list(image.config.env),
        "working_dir": image.config.working_dir,
    }
    plan_file.write_text(json.dumps(plan, indent=2))
    return plan_file


def run_unpacked(plan_file: Path, command: list[str], report: Path) -> int:
    """Mount the pulled layers as `lazyfs run --eager` does, run `command`, tear down; write
    {mounted_s, total_s, exit_code} to `report`. The clock starts with the process, as
    `lazyfs run`'s does: both sides pay for their program's start."""
    from lazyfs.fuse.phases import process_started_monotonic

    started = process_started_monotonic() or time.monotonic()
    import trio

    from lazyfs.container.process import ContainerSpec, container_env, run_container
    from lazyfs.mount import stack
    from lazyfs.mount.eager import eager_record, unmount_eager
    from lazyfs.mount.service import writable_dirs
    from lazyfs.mount.state import ImageRecord, write_record

    plan = json.loads(plan_file.read_text())
    work = Path(tempfile.mkdtemp(prefix="lazyfs-bench-unpacked-"))
    root = work / "root"
    root.mkdir()
    upper, workdir = writable_dirs(str(work / "rw"))
    target = ImageRecord(plan["reference"], plan["digest"], plan["platform"], str(root),
                         plan["layers"], upper, workdir)
    record = eager_record(target, work)

    async def mount() -> None:
        layer_dirs = await stack.mount_layers(record, plan["files"])
        await stack.mount_overlays(record, [target], layer_dirs)
        record.ready = True
        write_record(record)

    try:
        trio.run(mount)
        mounted_s = time.monotonic() - started
        spec = ContainerSpec(str(root), command, container_env(plan["env"]),
                             plan["working_dir"] or "/")
        exit_code = run_container(spec)
        total_s = time.monotonic() - started
    finally:
        unmount_eager(str(root))
        shutil.rmtree(work, ignore_errors=True)
    report.write_text(json.dumps({"mounted_s": mounted_s, "total_s": total_s,
                                  "exit_code": exit_code}))
    return exit_code


def unpacked_run(plan_file: Path, command: list[str], work: Path,
                 drop_caches: Callable[[], None]) -> dict[str, Any]:
    import subprocess

    report = work / "unpacked-report.json"
    report.unlink(missing_ok=True)
    drop_caches()
    result = subprocess.run(
        [sys.executable, __file__, "run-unpacked", str(plan_file), str(report), "--", *command],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0 or not report.exists():
        raise SystemExit(f"bench: eager unpacked run failed ({result.returncode}): "
                         f"{result.stderr.strip()[-2000:]}")
    data: dict[str, Any] = json.loads(report.read_text())
    return data


# -- the cells -----------------------------------------------------------------------------


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    middle = statistics.median_low(run["total_s"] for run in runs)
    return next(run for run in runs if run["total_s"] == middle)


def warm_cells(reference: str, command: list[str], work: Path, repeat: int, lazy_run: LazyRun,
               drop_caches: Callable[[], None]) -> dict[str, dict[str, Any]]:
    """Every cell, the median of `repeat` runs each; the caches live in `work`."""
    plan = prepare_unpacked(reference, work)
    caches = work / "disk-caches"
    shutil.rmtree(caches, ignore_errors=True)
    cells: dict[str, list[dict[str, Any]]] = {
        "no disk cache": [], "first start": [], "second start": [], "eager unpacked": []}
    for number in range(repeat):
        cache = caches / str(number)
        cells["no disk cache"].append(lazy_run(reference, False, command, work,
                                               ["--no-disk-cache"]))
        cells["first start"].append(lazy_run(reference, False, command, work,
                                             ["--cache-dir", str(cache)]))
        cells["second start"].append(lazy_run(reference, False, command, work,
                                              ["--cache-dir", str(cache)]))
        cells["eager unpacked"].append(unpacked_run(plan, command, work, drop_caches))
    shutil.rmtree(caches, ignore_errors=True)
    return {name: median(runs) for name, runs in cells.items()}


def print_warm_table(title: str, cells: dict[str, dict[str, Any]]) -> None:
    mib = 1024 * 1024
    print(f"\n{title}: the disk cache")
    print(f"  {'':22} {'to exit':>9} {'mounted':>9} {'fetched':>11} {'from disk':>10}")
    for name, run in cells.items():
        layers = run.get("layers")
        fetched = f"{sum(x['bytes_fetched'] for x in layers) / mib:.1f} MiB" if layers else "-"
        from_disk = str(sum(x.get("chunks_from_disk", 0) for x in layers)) if layers else "-"
        print(f"  {name:22} {run['total_s']:>7.2f} s {run['mounted_s']:>7.2f} s "
              f"{fetched:>11} {from_disk:>10}")
    second, eager = cells["second start"]["total_s"], cells["eager unpacked"]["total_s"]
    first, none = cells["first start"]["total_s"], cells["no disk cache"]["total_s"]
    print(f"  second start / eager unpacked  {second / eager:.2f}x (goal <= 1.2x)")
    print(f"  first start / no disk cache    {first / none:.2f}x (goal <= 1.05x)")


def main() -> int:
    parser = argparse.ArgumentParser(description="the eager baseline's runner of --warm")
    parser.add_argument("mode", choices=["run-unpacked"])
    parser.add_argument("plan", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run_unpacked(args.plan, command, args.report)


if __name__ == "__main__":
    sys.exit(main())
