"""Remote snapshots: which Prepare names a seekable EROFS layer, resolving it through the
registry, and recording it committed once its lazy mount is up.

A layer is named by lazyfs's labels (`containerd.io/snapshot/lazyfs.image-ref`, a reference
pinned by manifest digest, and `…/lazyfs.layer-digest`) or by those of containerd's CRI
plugin (`…/cri.image-ref`, `…/cri.manifest-digest`, `…/cri.layer-digest`). The manifest is
fetched by digest, so the layer's annotations (its chunk table and dm-verity digests) are
authenticated by what containerd asked for.

A layer that is not seekable EROFS (an ordinary gzip layer) is no error: Prepare goes on as
an ordinary snapshot and containerd unpacks it. Any other failure (unknown image, registry
down, a layer without digests, a corrupt blob) fails the Prepare with one line naming the
layer, and nothing is recorded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.reference import parse_reference
from lazyfs.image.registry_source import (
    ResolvedImage,
    UnconvertedLayerError,
    host_platform,
    resolve_image,
)
from lazyfs.snapshotter.layers import LayerHost, LayerSpec
from lazyfs.snapshotter.snapshots import TARGET_LABEL
from lazyfs.snapshotter.store import (
    AlreadyExistsError,
    NotFoundError,
    Snapshot,
    SnapshotError,
    Store,
)

log = logging.getLogger(__name__)

LABEL_PREFIX = "containerd.io/snapshot/"
LAZYFS_IMAGE_REF = LABEL_PREFIX + "lazyfs.image-ref"
LAZYFS_LAYER_DIGEST = LABEL_PREFIX + "lazyfs.layer-digest"
CRI_IMAGE_REF = LABEL_PREFIX + "cri.image-ref"
CRI_MANIFEST_DIGEST = LABEL_PREFIX + "cri.manifest-digest"
CRI_LAYER_DIGEST = LABEL_PREFIX + "cri.layer-digest"
RESOLVED_IMAGES_KEPT = 64
PREPARE_TIMEOUT_S = 300.0
REMOUNT_TIMEOUT_S = 60.0


class RemoteLayerError(SnapshotError):
    """A remote layer could not be mounted; the message names the layer and the reason."""


@dataclass(frozen=True)
class LayerRequest:
    reference: str  # pinned by manifest digest
    digest: str


def requested_layer(labels: Mapping[str, str]) -> LayerRequest | None:
    """The layer the labels name, or None. Raises RemoteLayerError for labels that name one
    but malformed (an image reference not pinned by digest)."""
    layer = labels.get(LAZYFS_LAYER_DIGEST)
    if layer and labels.get(LAZYFS_IMAGE_REF):
        text = labels[LAZYFS_IMAGE_REF]
        try:
            reference = parse_reference(text)
        except ValueError as exc:
            raise RemoteLayerError(f"layer {layer}: {LAZYFS_IMAGE_REF}: {exc}") from None
        if reference.digest is None:
            raise RemoteLayerError(
                f"layer {layer}: {LAZYFS_IMAGE_REF} {text} is not pinned by a manifest digest"
            )
        return LayerRequest(str(reference), layer)
    layer = labels.get(CRI_LAYER_DIGEST)
    image, manifest = labels.get(CRI_IMAGE_REF), labels.get(CRI_MANIFEST_DIGEST)
    if layer and image and manifest:
        try:
            reference = parse_reference(image).with_digest(manifest)
        except ValueError as exc:
            raise RemoteLayerError(f"layer {layer}: {CRI_IMAGE_REF}: {exc}") from None
        return LayerRequest(str(reference), layer)
    return None


class RemoteLayerService:
    """The snapshot service's `RemoteLayers`: called from gRPC threads, works on the trio
    thread through `token`."""

    def __init__(self, host: LayerHost, store: Store, options: RegistryOptions,
                 token: trio.lowlevel.TrioToken) -> None:
        self.host = host
        self.store = store
        self.options = options
        self.token = token
        self._resolved: OrderedDict[str, ResolvedImage | UnconvertedLayerError] = OrderedDict()
        self._resolving: dict[str, trio.Lock] = {}

    # -- RemoteLayers ------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        request = requested_layer(labels)
        target = labels.get(TARGET_LABEL, "")
        if request is None or not target:
            return False
        return trio.from_thread.run(self._prepare, request, target, parent, dict(labels),
                                    trio_token=self.token)

    def path(self, snapshot: Snapshot) -> str:
        assert snapshot.layer_id is not None
        layer = self.store.layer(snapshot.layer_id)
        if layer.digest not in self.host.mounted:  # its mount failed at start-up: try again
            trio.from_thread.run(self._mount_again, snapshot.key,
                                 LayerSpec.from_json(layer.source), trio_token=self.token)
        return self.host.mountpoint(layer.digest)

    def release(self, layer_id: int, digest: str) -> None:
        trio.from_thread.run(self.host.detach, digest, trio_token=self.token)

    # -- on the trio thread ------------------------------------------------------------------

    async def _prepare(self, request: LayerRequest, target: str, parent: str,
                       labels: dict[str, str]) -> bool:
        where = f"layer {request.digest} of {request.reference}"
        try:
            with trio.fail_after(PREPARE_TIMEOUT_S):
                image = await self._resolve(request.reference)
                if isinstance(image, UnconvertedLayerError):
                    log.info("%s: not seekable EROFS; an ordinary snapshot", where)
                    return False
                found = [layer for layer in image.layers if layer.digest == request.digest]
                if not found:
                    raise RemoteLayerError(f"{where}: the manifest has no such layer")
                spec = LayerSpec.of(image.pinned, found[0])
                was_mounted = spec.digest in self.host.mounted
                layer = await self.host.ensure(spec)
        except trio.TooSlowError:
            raise RemoteLayerError(
                f"{where}: not mounted within {PREPARE_TIMEOUT_S:.0f} s") from None
        except RemoteLayerError:
            raise
        except LazyfsError as exc:
            raise RemoteLayerError(f"{where}: {exc}") from None
        try:
            self.store.add_remote(target, parent, labels, spec.digest, spec.to_json(),
                                  layer.image.metadata.blob_size)
        except AlreadyExistsError:
            pass  # a concurrent Prepare of the same target recorded it
        except BaseException:
            if not was_mounted and not any(
                    existing.digest == spec.digest for existing in self.store.layers()):
                await self.host.detach(spec.digest)
            raise
        log.info("%s: committed as %s", where, target)
        return True

    async def _mount_again(self, key: str, spec: LayerSpec) -> None:
        try:
            with trio.fail_after(REMOUNT_TIMEOUT_S):
                await self.host.ensure(spec)
        except trio.TooSlowError:
            raise RemoteLayerError(f"snapshot {key}: layer {spec.digest} is not mounted: not "
                                   f"mounted again within {REMOUNT_TIMEOUT_S:.0f} s") from None
        except (LazyfsError, OSError) as exc:
            raise RemoteLayerError(
                f"snapshot {key}: layer {spec.digest} is not mounted: {exc}") from None
        if not any(layer.digest == spec.digest for layer in self.store.layers()):
            await self.host.detach(spec.digest)  # its last snapshot went meanwhile
            raise NotFoundError(f"snapshot {key} does not exist")
        log.info("layer %s mounted again for snapshot %s", spec.digest, key)

    async def _resolve(self, pinned: str) -> ResolvedImage | UnconvertedLayerError:
        """The image, resolved once per pinned reference (kept for the next layers)."""
        lock = self._resolving.setdefault(pinned, trio.Lock())
        async with lock:
            if pinned in self._resolved:
                self._resolved.move_to_end(pinned)
                return self._resolved[pinned]
            reference = parse_reference(pinned)
            try:
                async with self.options.client(reference.registry) as client:
                    # Every layer is resolved; the one asked for is refused when no digest
                    # authenticates it (LayerHost), not the image for any other's sake.
                    found: ResolvedImage | UnconvertedLayerError = await resolve_image(
                        client, reference, host_platform(), insecure=True)
            except UnconvertedLayerError as exc:
                found = exc
            except ValueError as exc:  # a malformed registry or mirror name
                raise RemoteLayerError(f"{pinned}: {exc}") from None
            self._resolved[pinned] = found
            while len(self._resolved) > RESOLVED_IMAGES_KEPT:
                self._resolved.popitem(last=False)
            return found
