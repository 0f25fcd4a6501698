"""Remote layers of the snapshotter: one FUSE file system (ROOT/fuse) serving one verified
block file per layer, added and removed at run time, and a kernel EROFS mount of each at
ROOT/layers/NAME, through a read-only loop device (not file-backed: a snapshotter started
after this one died can switch a loop device to its own block file under the mounts of
running containers, `adopt.py`). All layers share one chunk cache, one decode-thread
limiter and the daemon's nursery for background fetches; and the disk cache with every other
process of the machine, so that a restart or a layer mounted again reads what was read
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
from dataclasses import dataclass, replace
from typing import Any

import trio

from lazyfs.cache.disk import DiskCache
from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import ReaderOptions, SpeedLimit
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    ANNOTATION_ROOT_DIGEST,
    SeekableAnnotations,
)
from lazyfs.format.prefetch_list import (
    LayerPrefetch,
    PrefetchListError,
    parse_prefetch_annotation,
    serialize_prefetch_annotation,
)
from lazyfs.format.reference import parse_reference
from lazyfs.fuse.operations import LayerOperations
from lazyfs.image.errors import UntrustedLayerError
from lazyfs.image.open import open_layer
from lazyfs.image.prefetch import BackgroundLoader, plan_lists
from lazyfs.image.registry_source import ImageLayer, layer_sources
from lazyfs.image.remote_image import RemoteImage
from lazyfs.image.tuning import ImageTuning, PrefetchOptions
from lazyfs.mount import kernel as kernel_mount
from lazyfs.mount.state import ErofsMountRecord
from lazyfs.snapshotter.adopt import LeftLayer, take_down
from lazyfs.snapshotter.metrics import LayerMetrics

log = logging.getLogger(__name__)

LAYERS_DIR = "layers"
FUSE_DIR = "fuse"
NAME_HEX = 24
HTTP_CONNECTIONS_PER_LAYER = 8
PARALLEL_FETCHES_PER_LAYER = 4


@dataclass(frozen=True)
class LayerLimits:
    """How much the remote layers do at once: per layer, `http_connections` to its source
    and `parallel_fetches` requests in flight (no more than connections); for all of them,
    `decode_threads` that decompress and hash (None: one per CPU, at least 2)."""

    http_connections: int = HTTP_CONNECTIONS_PER_LAYER
    parallel_fetches: int = PARALLEL_FETCHES_PER_LAYER
    decode_threads: int | None = None

    def __post_init__(self) -> None:
        if (not 1 <= self.parallel_fetches <= self.http_connections
                or (self.decode_threads is not None and self.decode_threads < 1)):
            raise ValueError("layer limits: need 1 <= parallel_fetches <= http_connections "
                             "and decode_threads >= 1")


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


class LayerHost:
    """The FUSE file system and the EROFS mounts of remote layers (trio thread only). Every
    layer reads with `tuning` (its parallel fetches those of `limits`), every fetch gives up
    below `low_speed`."""

    def __init__(self, root: str, options: RegistryOptions, cache_size_bytes: int,
                 nursery: trio.Nursery, metrics: LayerMetrics | None = None,
                 disk: DiskCache | None = None, prefetch: bool = True, *,
                 tuning: ImageTuning | None = None, low_speed: SpeedLimit | None = None,
                 limits: LayerLimits | None = None) -> None:
        self.root = root
        self.prefetch = prefetch
        self.limits = limits or LayerLimits()
        self.tuning = replace(tuning or ImageTuning(),
                              parallel_fetches=self.limits.parallel_fetches)
        self.low_speed = low_speed or SpeedLimit()
        self.metrics = metrics
        self.options = options
        self.nursery = nursery
        self.fuse_dir = os.path.join(root, FUSE_DIR)
        self.layers_dir = os.path.join(root, LAYERS_DIR)
        self.cache = ChunkCache(cache_size_bytes)
        self.disk = disk
        self.cpu_limiter = trio.CapacityLimiter(
            self.limits.decode_threads or max(2, os.cpu_count() or 1))
        self.ops = LayerOperations([], cache=self.cache)
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

    def _limited(self, options: ReaderOptions) -> ReaderOptions:
        return replace(options, max_connections=self.limits.http_connections,
                       low_speed=self.low_speed)

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
        source = replace(source, reader_options=self._limited(source.reader_options),
                         alternates=tuple(replace(alternate,
                                                  reader_options=self._limited(
                                                      alternate.reader_options))
                                          for alternate in source.alternates))
        if self.metrics is not None:
            self.metrics.digests[layer_name(spec.digest)] = spec.digest
        image = await open_layer(source, cache=self.cache, nursery=self.nursery,
                                 cpu_limiter=self.cpu_limiter, trace=self.metrics, disk=self.disk,
                                 tuning=self.tuning)
        mountpoint = self.mountpoint(spec.digest)
        added = False
        try:
            if image.metadata.blob_size != spec.size:
                raise kernel_mount.MountError(
                    f"layer {spec.digest}: blob is {image.metadata.blob_size} bytes, the "
                    f"manifest says {spec.size}")
            if self.prefetch and source.prefetch is not None:
                image.replaying_list = True  # its list is replayed once it is mounted
            self.ops.add_image(image)
            added = True
            block_file = os.path.join(self.fuse_dir, image.name)
            erofs = await self._take_over(image.name, block_file, mountpoint)
            if erofs is None:
                os.makedirs(mountpoint, mode=0o755, exist_ok=True)
                device = await kernel_mount.mount_erofs_via_loop(block_file, mountpoint)
                erofs = ErofsMountRecord(block_file, mountpoint, device)
        except BaseException:
            with trio.CancelScope(shield=True):
                if added:
                    self.ops.remove_image(image.name)
                await image.aclose()
                with contextlib.suppress(OSError):
                    os.rmdir(mountpoint)
            raise
        log.info("layer %s mounted lazily at %s (%d bytes in %d chunks)", spec.digest,
                 mountpoint, image.size, image.metadata.table.chunk_count)
        return MountedLayer(spec, image, mountpoint, erofs,
                            self._start_prefetch(image, source.prefetch))

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

    def _start_prefetch(self, image: RemoteImage,
                        carried: LayerPrefetch | None) -> trio.CancelScope | None:
        """Replay the prefetch list the layer carries in the background, on-demand reads
        first (as a mount does); its scope, for the layer's detach to cancel."""
        if not self.prefetch or carried is None:
            return None
        options = PrefetchOptions()
        plans = plan_lists([image], [carried], options)
        if not plans[0]:
            image.replaying_list = False
            return None
        loader = BackgroundLoader([image], plans, options)
        scope = trio.CancelScope()

        async def replay() -> None:
            with scope:
                await loader.run()

        self.nursery.start_soon(replay)
        log.info("layer %s: prefetching %d chunks its image lists", image.name, len(plans[0]))
        return scope

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
        kept = False
        # No read may wait on a stalled server while the layer goes: end its fetches first.
        if layer.background is not None:
            layer.background.cancel()
        layer.image.cancel_fetches()
        with trio.CancelScope(shield=True):
            try:
                await kernel_mount.unmount(layer.mountpoint, lazy_fallback=True)
                device = layer.erofs.loop_device
                # Overlays keep private clones of their lower mounts: the unmount succeeds
                # under a running container, whose superblock still holds the device.
                if device is not None and keep_busy and kernel_mount.device_in_use(device):
                    kept = True
                elif device is not None:
                    await kernel_mount.detach_loop(device)
            except kernel_mount.MountError as exc:
                log.error("%s", exc)
            self.ops.remove_image(layer.image.name)
            if layer.image.disk is not None:  # for the layer's next warm start
                await layer.image.disk.save_reads()
            await layer.image.aclose()
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
