"""Remote layers of the snapshotter, by layer digest, on the process's `LayerHost`
(`lazyfs.mount.host`, the host a mount and `run` use too): its FUSE file system (ROOT/fuse)
serves one verified block file per layer, added and removed at run time, and each layer is
mounted as EROFS at ROOT/layers/NAME through a read-only loop device (not file-backed: a
snapshotter started after this one died can switch a loop device to its own block file under
the mounts of running containers, `adopt.py`). All layers share the host's chunk cache,
decode threads, limits and nursery for background fetches; and the disk cache with every
other process of the machine, so that a restart or a layer mounted again reads what was read
before.

Runs on the trio thread. gRPC handler threads come in through `RemoteLayerService`
(`trio.from_thread.run`). Per layer digest there is at most one attach in flight: concurrent
Prepares of one layer wait for the first and share its mount (single flight).

Protocol of a layer: `attach` (open, authenticate, add the block file, mount EROFS or take
over the mount a dead snapshotter left; undone in reverse if a step fails) → mounted →
`detach` (unmount EROFS, detach the loop device, remove the file, close).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    ANNOTATION_ROOT_DIGEST,
    SeekableAnnotations,
)
from lazyfs.format.errors import SizeMismatchError
from lazyfs.format.prefetch_list import (
    PrefetchListError,
    parse_prefetch_annotation,
    serialize_prefetch_annotation,
)
from lazyfs.format.reference import parse_reference
from lazyfs.layer.errors import UntrustedLayerError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.mount import kernel as kernel_mount
from lazyfs.mount.host import LayerHost
from lazyfs.mount.state import ErofsMountRecord
from lazyfs.oci.registry_source import ImageLayer, layer_sources
from lazyfs.snapshotter.adopt import LeftLayer, take_down
from lazyfs.snapshotter.metrics import LayerMetrics

log = logging.getLogger(__name__)

LAYERS_DIR = "layers"
FUSE_DIR = "fuse"
NAME_HEX = 24


def layer_name(digest: str) -> str:
    """The block file and mountpoint name of a layer (short: overlay options list many)."""
    return digest.partition(":")[2][:NAME_HEX] or digest.replace(":", "-")


def untrusted_reason(annotations: SeekableAnnotations) -> str | None:
    """Why no digest authenticates a layer with these annotations, or None if one does.
    The snapshotter mounts verified layers only: it has no --insecure."""
    if annotations.is_trusted:
        return None
    missing = ANNOTATION_CHUNK_DIGEST if annotations.chunk_digest is None else (
        ANNOTATION_ROOT_DIGEST)
    return (f"refusing to mount it: its descriptor has no {missing} annotation to "
            "authenticate it (convert the image again with `lazyfs convert`)")


@dataclass(frozen=True)
class LayerSpec:
    """What (re-)opening a remote layer needs; stored with the layer as JSON."""

    reference: str  # the image, pinned by manifest digest
    digest: str
    size: int
    media_type: str
    chunk_table_offset: int
    chunk_digest: str | None
    verity_offset: int | None
    root_digest: str | None
    # The prefetch list the layer's descriptor carries (its annotation value), if any.
    prefetch: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> LayerSpec:
        return cls(**values)

    @classmethod
    def of(cls, reference: str, layer: ImageLayer) -> LayerSpec:
        values = layer.annotations
        prefetch = (None if layer.prefetch is None
                    else serialize_prefetch_annotation(layer.prefetch))
        return cls(reference, layer.digest, layer.size, layer.media_type,
                   values.chunk_table_offset, values.chunk_digest, values.verity_offset,
                   values.root_digest, prefetch)

    def image_layer(self) -> ImageLayer:
        annotations = SeekableAnnotations(
            chunk_table_offset=self.chunk_table_offset,
            chunk_digest=self.chunk_digest,
            verity_offset=self.verity_offset,
            root_digest=self.root_digest,
        )
        prefetch = None
        if self.prefetch is not None:
            try:
                prefetch = parse_prefetch_annotation(self.prefetch, f"layer {self.digest}")
            except PrefetchListError as exc:
                log.warning("%s; no prefetch for this layer", exc)
        return ImageLayer(layer_name(self.digest), self.digest, self.size, self.media_type,
                          annotations, prefetch)


@dataclass
class MountedLayer:
    spec: LayerSpec
    image: RemoteImage
    mountpoint: str
    erofs: ErofsMountRecord
    # Its prefetch list replaying in the background (cancelled when the layer goes).
    background: trio.CancelScope | None = None


class LayerSet:
    """The snapshotter's remote layers, by digest (trio thread only): each resolved through
    its registry (`options`) and attached on `host`, whose FUSE file system is at ROOT/fuse,
    at ROOT/layers/NAME; `metrics` learns each layer's digest."""

    def __init__(self, root: str, host: LayerHost, options: RegistryOptions,
                 metrics: LayerMetrics | None = None) -> None:
        self.root = root
        self.host = host
        self.options = options
        self.metrics = metrics
        self.layers_dir = os.path.join(root, LAYERS_DIR)
        self.mounted: dict[str, MountedLayer] = {}
        self._attaching: dict[str, trio.Event] = {}
        self._errors: dict[str, BaseException] = {}
        # Loop devices a stopped snapshotter left, by layer name, until their layers are
        # served again.
        self.left: dict[str, LeftLayer] = {}
        # Told of every layer once it is mounted (the content check measures it).
        self.on_attached: Callable[[MountedLayer], None] | None = None

    def mountpoint(self, digest: str) -> str:
        return os.path.join(self.layers_dir, layer_name(digest))

    async def ensure(self, spec: LayerSpec) -> MountedLayer:
        """The layer mounted, attaching it unless it is (or is being) already. Raises what
        made the attach fail (LazyfsError subclasses for bad input or sources)."""
        while True:
            if spec.digest in self.mounted:
                return self.mounted[spec.digest]
            pending = self._attaching.get(spec.digest)
            if pending is None:
                break
            await pending.wait()
            if spec.digest in self._errors and spec.digest not in self.mounted:
                raise self._errors[spec.digest]
        done = self._attaching[spec.digest] = trio.Event()
        self._errors.pop(spec.digest, None)
        try:
            layer = await self._attach(spec)
        except BaseException as exc:
            self._errors[spec.digest] = exc
            raise
        finally:
            del self._attaching[spec.digest]
            done.set()
        self.mounted[spec.digest] = layer
        if self.on_attached is not None:
            self.on_attached(layer)
        return layer

    async def _attach(self, spec: LayerSpec) -> MountedLayer:
        reason = untrusted_reason(spec.image_layer().annotations)
        if reason is not None:
            raise UntrustedLayerError(reason)
        reference = parse_reference(spec.reference)
        async with self.options.client(reference.registry,
                                       repository=reference.repository) as client:
            source = (await layer_sources(reference, [spec.image_layer()], client,
                                          self.options))[0]
        if self.metrics is not None:
            self.metrics.digests[layer_name(spec.digest)] = spec.digest
        host = self.host
        image = await host.open_layer(source, probe=False)
        if source.prefetch is not None and host.options.prefetch.use_image_lists:
            # Its list is replayed once it is mounted: no read reads ahead before.
            image.replaying_list = True
        await host.probe_superblock(image, source)
        mountpoint = self.mountpoint(spec.digest)
        try:
            if image.metadata.blob_size != spec.size:
                raise SizeMismatchError(
                    f"layer {spec.digest}: blob is {image.metadata.blob_size} bytes, the "
                    f"manifest says {spec.size}")
            block_file = host.serve(image)
            erofs = await self._take_over(image.name, block_file, mountpoint)
            if erofs is None:
                os.makedirs(mountpoint, mode=0o755, exist_ok=True)
                erofs = await host.mount_erofs(block_file, mountpoint)
        except BaseException:
            with trio.CancelScope(shield=True):
                await host.discard(image)
                with contextlib.suppress(OSError):
                    os.rmdir(mountpoint)
            raise
        log.info("layer %s mounted lazily at %s (%d bytes in %d chunks)", spec.digest,
                 mountpoint, image.size, image.metadata.table.chunk_count)
        # Replayed on-demand reads first, as a mount's lists are; cancelled by its detach.
        background = host.loads.replay(host.nursery, image, source.prefetch)
        return MountedLayer(spec, image, mountpoint, erofs, background)

    async def _take_over(self, name: str, block_file: str, mountpoint: str
                         ) -> ErofsMountRecord | None:
        """Layer `name`'s loop device a stopped snapshotter left, switched to `block_file`
        and mounted at `mountpoint` (if its mount went); None if there is none or it cannot
        be taken over (then it is taken down, and the caller mounts the layer afresh)."""
        left = self.left.pop(name, None)
        if left is None:
            return None
        try:
            await kernel_mount.change_loop_file(left.device, block_file)
            if left.mountpoint is None:
                os.makedirs(mountpoint, mode=0o755, exist_ok=True)
                await kernel_mount.mount_erofs_device(left.device, mountpoint)
        except kernel_mount.MountError as exc:
            log.warning("layer %s: cannot take over %s: %s; mounting it afresh", name,
                        left.device, exc)
            with trio.CancelScope(shield=True):
                await take_down(left)
            return None
        log.info("layer %s: took over %s, mounted at %s (it now reads %s)", name,
                 left.device, mountpoint, block_file)
        return ErofsMountRecord(block_file, mountpoint, left.device)

    async def detach(self, digest: str, *, keep_busy: bool = False) -> bool:
        """Unmount a layer (lazily if busy) and stop serving its file; absent is fine. With
        `keep_busy`, a loop device a superblock still reads (a running container's) is left
        for the next snapshotter to take over. Returns whether it was left."""
        layer = self.mounted.pop(digest, None)
        if layer is None:
            left = self.left.pop(layer_name(digest), None)
            if left is not None:  # never served again: nothing can read through it
                with trio.CancelScope(shield=True):
                    await take_down(left)
            return False
        if layer.background is not None:
            layer.background.cancel()
        kept = await self.host.detach(layer.image, layer.erofs, keep_busy=keep_busy)
        with contextlib.suppress(OSError):
            os.rmdir(layer.mountpoint)
        if kept:
            log.warning("layer %s is in use: %s is left for the next start to take over "
                        "(reads through it fail until then)", digest, layer.erofs.loop_device)
        else:
            log.info("layer %s unmounted", digest)
        return kept

    async def detach_all(self, *, keep_busy: bool = False) -> int:
        """Detach every layer (see `detach`); returns how many were left mounted."""
        kept = 0
        for digest in list(self.mounted):
            kept += await self.detach(digest, keep_busy=keep_busy)
        for name in list(self.left):  # never served again
            kept += await take_down(self.left.pop(name), keep_busy=keep_busy)
        return kept

    def stats(self) -> dict[str, Any]:
        """Per layer (by digest) what it fetched, hit and verified."""
        # Also called from the metrics thread: iterate over a copy.
        return {digest: layer.image.stats_snapshot()
                for digest, layer in list(self.mounted.items())}
