"""The eager baseline of an image mount, for `lazyfs run --eager`: every layer downloaded,
digest-checked and decompressed first (`lazyfs.oci.eager_pull`), then the EROFS images
mounted directly and stacked with overlayfs like a lazy mount's, without a daemon.

The calling process owns the mounts: their record names it as the daemon, and is written
before anything is mounted, so that `lazyfs umount` can clean up after a killed run.
`unmount_eager` takes them down again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.mount import stack
from lazyfs.mount.background import undo_mounts
from lazyfs.mount.state import (
    ImageRecord,
    MountRecord,
    find_record,
    private_dir,
    process_start_ticks,
    write_record,
)
from lazyfs.oci.eager_pull import PulledLayer, pull_layers
from lazyfs.oci.registry_source import ResolvedImage


@dataclass(frozen=True)
class EagerMount:
    """An image mounted eagerly: its record and the layers pulled for it."""

    record: MountRecord
    layers: list[PulledLayer]


def eager_record(target: ImageRecord, work: Path) -> MountRecord:
    """The record of an eager mount of `target` (this process its owner, `work` its scratch
    directory), written before anything is mounted."""
    root = target.mountpoint
    record = MountRecord(
        mountpoint=root,
        pid=os.getpid(),
        pid_start_ticks=process_start_ticks(os.getpid()),
        fuse_dir=str(private_dir(root, ".fuse")),  # never created: no FUSE in an eager mount
        layers_dir=str(private_dir(root, ".layers")),
        temp_dir=str(work),
        started_at=time.time(),
    )
    write_record(record)
    return record


async def mount_pulled(
    record: MountRecord, target: ImageRecord, image: ResolvedImage, registry: RegistryOptions
) -> list[PulledLayer]:
    """Pull every layer of `image` into the record's scratch directory, mount the EROFS
    images, stack them at `target.mountpoint`. Returns the pulled layers. Raises
    RegistryError, LayerOpenError, MountError, OSError (what came up stays recorded)."""
    assert record.temp_dir is not None
    directory = Path(record.temp_dir) / "layers"
    directory.mkdir()
    async with registry.client(image.reference.registry) as client:
        pulled = await pull_layers(
            client, image.reference.repository, image.distinct_layers, directory
        )
    record.sources = [str(layer.image_file) for layer in pulled]
    files = {layer.name: str(layer.image_file) for layer in pulled}
    layer_dirs = await stack.mount_layers(record, files)
    await stack.mount_overlays(record, [target], layer_dirs)
    record.ready = True
    write_record(record)
    return pulled


def mount_eager(
    target: ImageRecord, image: ResolvedImage, registry: RegistryOptions, work: Path
) -> EagerMount:
    """Mount `image` eagerly as `target` describes (its mountpoint, upper and work
    directories), pulling into the scratch directory `work`. On failure what came up stays
    recorded: call `unmount_eager(target.mountpoint)` in any case."""
    record = eager_record(target, work)
    pulled = trio.run(mount_pulled, record, target, image, registry)
    return EagerMount(record, pulled)


def unmount_eager(mountpoint: str, *, lazy: bool = True) -> None:
    """Take down the eager mount at `mountpoint` (nothing recorded is fine). Raises
    MountError (MountBusyError unless `lazy`), StateError."""
    record = find_record(mountpoint)
    if record is not None:
        trio.run(lambda: undo_mounts(record, lazy=lazy))
