"""Taking over the layer mounts a stopped snapshotter left, so that running containers read
again.

Each remote layer is EROFS on a read-only loop device over its block file ROOT/fuse/NAME,
mounted at ROOT/layers/NAME. When the snapshotter dies (SIGKILL, a crash, an OOM kill) its
FUSE connection dies with it, but the loop devices, the EROFS mounts and the overlays of
running containers on them stay: the containers' reads that miss the page cache fail with
EIO (SIGBUS for mapped files). On SIGTERM the snapshotter unmounts its layers, but a layer
whose superblock an overlay still holds (overlayfs keeps private clones of its lower mounts,
so the unmount succeeds) keeps its loop device, and the FUSE mount stays (dead) too.

The next snapshotter finds those loop devices before it detaches the dead FUSE mount
(afterwards they no longer name their files below ROOT/fuse), serves the layers on a new FUSE
mount, and switches each loop device to the new block file (LOOP_CHANGE_FD, `LayerSet`):
the EROFS superblock, and every container above it, reads again; a layer whose mount went is
mounted again from the same device (the kernel shares the superblock).

A loop device is taken over when a committed snapshot still uses its layer, its backing file
is ROOT/fuse/NAME (the same layer: NAME is its digest's first hex digits, and the kernel
refuses a file of another size), and EROFS is mounted from it at ROOT/layers/NAME (alone) or
some superblock still holds it. Everything else is taken down as before: lazily, since a
running container may hold it. A layer that cannot be served again (its registry down) keeps
its device until a retry serves it (`remount.py`), or its last snapshot goes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from lazyfs.mount import kernel as kernel_mount

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeftLayer:
    """A layer's loop device a previous snapshotter left, and its EROFS mount at
    ROOT/layers/NAME if that is still there."""

    name: str  # the layer's file and mountpoint name
    device: str
    mountpoint: str | None


def left_layers(fuse_dir: str, layers_dir: str, wanted: Collection[str]
                ) -> dict[str, LeftLayer]:
    """The loop devices to take over, by layer name, of the layers named in `wanted`. Call it
    while the dead FUSE mount is still at `fuse_dir`."""
    mounts = kernel_mount.mounts_at_or_below(layers_dir)
    at = Counter(mount.mountpoint for mount in mounts)
    parent = kernel_mount.canonical(layers_dir)
    files = kernel_mount.canonical(fuse_dir)
    mounted = {mount.source: mount.mountpoint for mount in mounts
               if mount.fstype == "erofs" and at[mount.mountpoint] == 1
               and os.path.dirname(mount.mountpoint) == parent}
    found: dict[str, LeftLayer] = {}
    for device in kernel_mount.loops_backed_by(fuse_dir):
        backing = kernel_mount.loop_backing_file(device) or ""
        name = os.path.basename(backing)
        if name not in wanted or os.path.dirname(backing) != files:
            continue
        mountpoint = mounted.get(device)
        if mountpoint is not None and os.path.basename(mountpoint) != name:
            continue
        if mountpoint is None and not kernel_mount.device_in_use(device):
            continue  # nothing reads through it
        if name not in found or found[name].mountpoint is None:
            found[name] = LeftLayer(name, device, mountpoint)
    return found


async def recover_mounts(fuse_dir: str, layers_dir: str, wanted: Collection[str]
                         ) -> dict[str, LeftLayer]:
    """Take down what a dead snapshotter left (its FUSE mount, and the EROFS mounts and loop
    devices of layers no snapshot uses), but for the layers of `wanted`, whose mounts are
    returned to be taken over. Raises MountError if something cannot be taken down."""
    left = left_layers(fuse_dir, layers_dir, wanted)
    kept = {layer.mountpoint for layer in left.values()}
    for mount in kernel_mount.mounts_at_or_below(layers_dir):
        if mount.mountpoint not in kept:
            log.info("%s: left mounted by a previous run; detaching it", mount.mountpoint)
            await kernel_mount.unmount(mount.mountpoint, attempts=1, lazy_fallback=True)
    devices = {layer.device for layer in left.values()}
    for device in kernel_mount.loops_backed_by(fuse_dir):
        if device not in devices:
            await kernel_mount.detach_loop(device)
    if kernel_mount.is_mountpoint(fuse_dir):
        await kernel_mount.fuse_unmount_lazy(fuse_dir)
    for layer in left.values():
        log.info("layer %s: %s left by a previous run (%s); taking it over", layer.name,
                 layer.device, "mounted at " + layer.mountpoint if layer.mountpoint
                 else "in use, not mounted")
    return left


async def take_down(layer: LeftLayer, *, keep_busy: bool = False) -> bool:
    """Unmount a left layer that is not taken over (lazily: a container may hold it) and
    detach its loop device, unless `keep_busy` and a superblock still reads it (then it is
    left for the next start). Returns whether it was left. Raises MountError."""
    if layer.mountpoint is not None:
        await kernel_mount.unmount(layer.mountpoint, attempts=1, lazy_fallback=True)
    if keep_busy and kernel_mount.device_in_use(layer.device):
        return True
    await kernel_mount.detach_loop(layer.device)
    return False
