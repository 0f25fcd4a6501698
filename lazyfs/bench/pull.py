"""The eager start of an ordinary image (layers of gzip, zstd or plain tar), as a container
engine makes it: every layer downloaded (a few at a time) and checked against its digest, each
unpacked into a directory of its own as soon as it is complete (GNU tar, owners, modes and
xattrs kept; whiteouts turned into overlayfs's), the directories stacked with overlayfs under
a writable upper layer, and the command run in it as `lazyfs run` runs one. lazyfs cannot
mount such images lazily; this is `lazyfs bench`'s eager mode for them, timed from this
process's start and reported as `lazyfs run --report` reports, so that its figures compare.

    python -m lazyfs.bench.pull IMAGE --report FILE [--insecure-registry] [--creds U:P]
        [--platform OS/ARCH] [--mirror HOST] -- CMD [ARG ...]

Everything lives in a scratch directory under TMPDIR, unmounted and removed on the way out,
also after a failure or Ctrl-C. The exit status is the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import trio

from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry import RegistryClient
from lazyfs.fetch.registry_options import RegistryOptions, parse_credentials
from lazyfs.format.oci import Index, parse_manifest, parse_manifest_or_index
from lazyfs.format.platform import Platform, parse_platform
from lazyfs.format.reference import ImageReference

PARALLEL_DOWNLOADS = 3
MAX_CONFIG_BYTES = 4 << 20
OPAQUE = ".wh..wh..opq"
WHITEOUT_PREFIX = ".wh."
OPAQUE_XATTR = "trusted.overlay.opaque"


class PullError(LazyfsError):
    """The image cannot be resolved, pulled, unpacked or mounted."""


@dataclass(frozen=True)
class OrdinaryLayer:
    digest: str
    size: int
    media_type: str

    @property
    def name(self) -> str:
        return self.digest.partition(":")[2][:12]


@dataclass(frozen=True)
class OrdinaryImage:
    """An image resolved to one manifest, whatever its layers are."""

    reference: ImageReference
    manifest_digest: str
    platform: str
    layers: tuple[OrdinaryLayer, ...]
    env: tuple[str, ...] = ()
    working_dir: str = ""
    argv: tuple[str, ...] = ()

    @property
    def pinned(self) -> str:
        return str(self.reference.with_digest(self.manifest_digest))


async def resolve_ordinary(client: RegistryClient, reference: ImageReference,
                           platform: Platform) -> OrdinaryImage:
    """Fetch the manifest `reference` names (through an index: `platform`'s) and its config.
    Raises PullError, RegistryError subclasses."""
    repository = reference.repository
    data, media_type, digest = await client.get_manifest(repository, reference.reference)
    try:
        top = parse_manifest_or_index(data, media_type)
        if isinstance(top, Index):
            entry = top.select(platform)
            data, media_type, digest = await client.get_manifest(repository, entry.digest)
            manifest = parse_manifest(data, media_type)
        else:
            manifest = top
    except (LazyfsError, ValueError) as exc:
        raise PullError(f"{reference}: {exc}") from None
    if not manifest.layers:
        raise PullError(f"{reference}@{digest}: the image has no layers")
    config: Any = json.loads(await client.get_blob(repository, manifest.config.digest,
                                                   max_size_bytes=MAX_CONFIG_BYTES))
    settings = config.get("config") if isinstance(config, dict) else None
    settings = settings if isinstance(settings, dict) else {}

    def strings(key: str) -> tuple[str, ...]:
        value = settings.get(key) or []
        return tuple(item for item in value if isinstance(item, str)) if isinstance(
            value, list) else ()

    shown = "/".join(str(config.get(key)) for key in ("os", "architecture", "variant")
                     if isinstance(config, dict) and config.get(key))
    return OrdinaryImage(
        reference, digest, shown or str(platform.normalized()),
        tuple(OrdinaryLayer(layer.digest, layer.size, layer.media_type)
              for layer in manifest.layers),
        strings("Env"), str(settings.get("WorkingDir") or ""),
        (*strings("Entrypoint"), *strings("Cmd")))


async def _pull_and_unpack(client: RegistryClient, image: OrdinaryImage, work: Path
                           ) -> list[Path]:
    """Every distinct layer downloaded and unpacked; the directories in manifest order."""
    distinct = list({layer.digest: layer for layer in image.layers}.values())
    limiter = trio.CapacityLimiter(PARALLEL_DOWNLOADS)
    directories = {layer.digest: work / "layers" / layer.name for layer in distinct}

    async def one(layer: OrdinaryLayer) -> None:
        blob = work / "blobs" / layer.name
        async with limiter:
            await client.download_blob(image.reference.repository, layer.digest, blob,
                                       size=layer.size)
        await unpack_layer(blob, directories[layer.digest])
        await trio.to_thread.run_sync(blob.unlink)

    (work / "blobs").mkdir()
    (work / "layers").mkdir()
    async with trio.open_nursery() as nursery:
        for layer in distinct:
            nursery.start_soon(one, layer)
    return [directories[layer.digest] for layer in image.layers]


async def unpack_layer(blob: Path, directory: Path) -> None:
    """Unpack the tar `blob` (gzip, zstd or plain: GNU tar tells) into the new `directory`,
    its whiteouts made overlayfs's. Raises PullError."""
    directory.mkdir()
    result = await trio.run_process(
        ["tar", "-x", "-f", str(blob), "-C", str(directory), "--numeric-owner",
         "--same-permissions", "--same-owner", "--xattrs", "--xattrs-include=*",
         "--no-overwrite-dir"],
        capture_stderr=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise PullError(f"unpacking {blob.name}: {message[-1] if message else 'tar failed'}")
    await trio.to_thread.run_sync(convert_whiteouts, directory)


def convert_whiteouts(directory: Path) -> None:
    """OCI whiteouts as overlayfs takes them: `.wh.NAME` becomes a 0/0 character device
    NAME, `.wh..wh..opq` the xattr trusted.overlay.opaque=y on its directory."""
    for parent, _, files in os.walk(directory):
        for name in files:
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            path = os.path.join(parent, name)
            os.unlink(path)
            if name == OPAQUE:
                os.setxattr(parent, OPAQUE_XATTR, b"y")
                continue
            hidden = os.path.join(parent, name[len(WHITEOUT_PREFIX):])
            if not os.path.lexists(hidden):  # the layer's own entry wins over its whiteout
                os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _layer_report(layer: OrdinaryLayer) -> dict[str, Any]:
    return {"name": layer.name, "digest": layer.digest, "blob_size": layer.size,
            "bytes_fetched": layer.size, "requests": 1, "chunks_fetched": None,
            "chunk_count": None, "chunks_from_disk": 0}


def run(reference: str, command: Sequence[str], registry: RegistryOptions, platform: Platform,
        report_file: str, started: float) -> int:
    """Pull, mount, run, tear down; write the report. Returns the command's exit status.
    Raises PullError, LazyfsError; KeyboardInterrupt stops the command and tears down."""
    from lazyfs.container.process import (
        ContainerSpec,
        container_env,
        interrupts_ignored,
        run_container,
    )
    from lazyfs.mount import kernel

    parsed = ImageReference.parse(reference)
    work = Path(tempfile.mkdtemp(prefix="lazyfs-pull-"))
    root = work / "root"

    async def pull() -> tuple[OrdinaryImage, list[Path]]:
        async with registry.client(parsed.registry) as client:
            image = await resolve_ordinary(client, parsed, platform)
            return image, await _pull_and_unpack(client, image, work)

    try:
        image, directories = trio.run(pull)
        argv = list(command) or list(image.argv)
        if not argv:
            raise PullError(f"{reference}: the image has no command; give one after --")
        for name in ("root", "upper", "work"):
            (work / name).mkdir()
        trio.run(lambda: kernel.mount_overlay(
            [str(path) for path in reversed(directories)], str(root),
            upperdir=str(work / "upper"), workdir=str(work / "work")))
        mounted_s = time.monotonic() - started
        exit_code = run_container(ContainerSpec(str(root), argv, container_env(image.env),
                                                image.working_dir or "/"))
        total_s = time.monotonic() - started
        distinct = list({layer.digest: layer for layer in image.layers}.values())
        report = {"mode": "eager", "image": image.pinned, "platform": image.platform,
                  "exit_code": exit_code, "mounted_s": mounted_s,
                  "command_s": total_s - mounted_s, "total_s": total_s,
                  "layers": [_layer_report(layer) for layer in distinct], "phases": {}}
        Path(report_file).write_text(json.dumps(report, indent=2) + "\n")
        return exit_code
    finally:
        with interrupts_ignored():
            with contextlib.suppress(kernel.MountError):
                trio.run(lambda: kernel.unmount(str(root), lazy_fallback=True))
            if not kernel.mounts_at_or_below(work):
                shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module's docstring)."""
    from lazyfs.fuse.phases import process_started_monotonic

    started = process_started_monotonic() or time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.pull",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("image")
    parser.add_argument("--report", required=True)
    parser.add_argument("--insecure-registry", action="store_true")
    parser.add_argument("--creds")
    parser.add_argument("--platform")
    parser.add_argument("--mirror", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        platform = parse_platform(args.platform) if args.platform else None
        if platform is None:
            from lazyfs.oci.names import host_platform

            platform = host_platform()
        credentials = parse_credentials(args.creds) if args.creds else None
        registry = RegistryOptions(credentials, args.insecure_registry, tuple(args.mirror))
        signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the same teardown
        return run(args.image, command, registry, platform, args.report, started)
    except KeyboardInterrupt:
        print("lazyfs bench: eager pull: interrupted", file=sys.stderr)
        return 130
    except (LazyfsError, ValueError, OSError) as exc:
        print(f"lazyfs bench: eager pull: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
