"""Images as kernel mounts: one read-only EROFS mount per distinct layer in a private
directory, and one overlayfs per image stacking them in manifest order.

The same functions serve a lazy mount (EROFS on the FUSE block files, inside the daemon) and
an eager one (EROFS on downloaded image files, in `lazyfs run --eager`). Everything mounted is
written to the mount record before the next step, so `lazyfs umount` can undo a half-finished
stack whoever set it up.

A layer listed twice in one manifest, or shared by two images, is mounted once. Where a layer
repeats within one image only its top-most occurrence is stacked: overlayfs refuses the same
directory twice, and a layer applied again above other layers already decides every path it
holds (its whiteouts and opaque directories mask everything below either way), so the lower
copy changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from lazyfs.exception_groups import first_error
from lazyfs.mount import kernel
from lazyfs.mount.state import ErofsMountRecord, ImageRecord, MountRecord, write_record

log = logging.getLogger(__name__)

# EROFS mounts started at once: each reads its superblock (one chunk) through the daemon.
PARALLEL_LAYER_MOUNTS = 4
EMPTY_LAYER = "empty"
UPPER_DIR = "upper"
WORK_DIR = "work"


def stack_order(layers: Sequence[str]) -> list[str]:
    """Layers (manifest order, bottom first) as overlayfs wants them: top first, each once
    (a repeated layer counts where it is top-most)."""
    return list(dict.fromkeys(reversed(layers)))


def writable_dirs(directory: str) -> tuple[str, str]:
    """The (upper, work) directories inside `directory`, created if missing (0755, like a
    container's root). Raises OSError."""
    upper = os.path.join(directory, UPPER_DIR)
    work = os.path.join(directory, WORK_DIR)
    for path in (directory, upper, work):
        os.makedirs(path, mode=0o755, exist_ok=True)
    return upper, work


def layer_mountpoint(record: MountRecord, index: int) -> str:
    """Where the `index`-th distinct layer of the record is mounted (a short name: overlay
    options hold one per layer)."""
    if record.layers_dir is None:
        raise ValueError("the record has no layers directory")
    return os.path.join(record.layers_dir, str(index))


async def mount_layers(
    record: MountRecord,
    image_files: Mapping[str, str],
    *,
    mount: Callable[[str, str], Awaitable[ErofsMountRecord]] | None = None,
) -> dict[str, str]:
    """Mount each of `image_files` ({layer name: EROFS image file}, one per distinct layer)
    read-only in the record's layers directory, a few at a time, with `mount(image_file,
    mountpoint)` (a lazy mount's host's), by default `kernel.mount_erofs`. Returns {layer
    name: its mountpoint}.

    Each mount is recorded as soon as it is up. Raises MountError (after the other mounts in
    flight were stopped; what came up stays recorded for the teardown).
    """
    if record.layers_dir is None:
        raise ValueError("the record has no layers directory")
    os.makedirs(os.path.dirname(record.layers_dir), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(record.layers_dir, 0o700)
    limiter = trio.CapacityLimiter(PARALLEL_LAYER_MOUNTS)
    mounted: dict[str, str] = {}

    async def mount_one(index: int, name: str, image_file: str) -> None:
        target = layer_mountpoint(record, index)
        with contextlib.suppress(FileExistsError):
            os.mkdir(target, 0o700)
        async with limiter:
            erofs = await (mount or kernel.mount_erofs)(image_file, target)
        record.erofs_mounts.append(erofs)
        write_record(record)
        mounted[name] = target

    try:
        async with trio.open_nursery() as nursery:
            for index, (name, image_file) in enumerate(image_files.items()):
                nursery.start_soon(mount_one, index, name, image_file)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return mounted


async def mount_overlays(
    record: MountRecord, images: Sequence[ImageRecord], layer_dirs: dict[str, str]
) -> None:
    """Stack each image at its mountpoint from `layer_dirs` ({layer name: EROFS mountpoint}),
    read-only unless it has an upper directory. Each image is recorded before its overlay is
    mounted (the teardown looks for an overlay at every recorded image mountpoint).
    Raises MountError."""
    for image in images:
        if image not in record.images:
            record.images.append(image)
            write_record(record)
        lowerdirs = [layer_dirs[name] for name in stack_order(image.layers)]
        if len(lowerdirs) == 1 and image.upperdir is None:
            lowerdirs.append(_empty_layer(record))
        try:
            await kernel.mount_overlay(
                lowerdirs, image.mountpoint, upperdir=image.upperdir, workdir=image.workdir
            )
        except ValueError as exc:  # a path that cannot go into the option string
            raise kernel.MountError(
                f"cannot mount overlay at {image.mountpoint}: {exc}"
            ) from None
        log.info("%s: %s (%d layers)", image.mountpoint, image.reference, len(lowerdirs))


def _empty_layer(record: MountRecord) -> str:
    """An empty directory to stack under a lone layer: a read-only overlay needs two lower
    directories."""
    assert record.layers_dir is not None
    path = os.path.join(record.layers_dir, EMPTY_LAYER)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
    return path


def remove_layer_dirs(record: MountRecord) -> None:
    """Remove the empty layer mountpoints and the layers directory; anything still mounted
    (a busy mount detached lazily) is left alone."""
    if record.layers_dir is None or not os.path.isdir(record.layers_dir):
        return
    mounted = {m.mountpoint for m in kernel.mounts_at_or_below(record.layers_dir)}
    for name in os.listdir(record.layers_dir):
        path = os.path.join(record.layers_dir, name)
        if path not in mounted:
            with contextlib.suppress(OSError):
                os.rmdir(path)
    with contextlib.suppress(OSError):
        os.rmdir(record.layers_dir)

