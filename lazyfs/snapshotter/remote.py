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

The target containerd asks for is the layer's chain ID: it must be the one the image's config
makes (its diff IDs), and the snapshot records the layer's diff ID so that the background
content check (`content_check`) can prove it. A target that exists already is shared only
with a Prepare of the same layer, or once its layer is proven to hold that diff ID (`share`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.chain_id import ChainIdError, chain_ids, check_diff_ids
from lazyfs.format.reference import parse_reference
from lazyfs.oci.registry_source import (
    ResolvedImage,
    UnconvertedLayerError,
    host_platform,
    resolve_image,
)
from lazyfs.snapshotter.content_check import ContentChecker, Verdict, mismatch, verdict
from lazyfs.snapshotter.layers import LayerSet, LayerSpec
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
# How long a Prepare that names another layer for an existing target waits for the content
# check of the layer holding it.
SHARE_TIMEOUT_S = 120.0


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

    def __init__(self, layers: LayerSet, store: Store, options: RegistryOptions,
                 token: trio.lowlevel.TrioToken, checker: ContentChecker) -> None:
        self.layers = layers
        self.store = store
        self.options = options
        self.token = token
        self.checker = checker
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

    def share(self, existing: Snapshot, labels: Mapping[str, str]) -> bool:
        assert existing.layer_id is not None
        return trio.from_thread.run(self._share, existing, dict(labels), trio_token=self.token)

    def content_state(self, snapshot: Snapshot) -> str:
        assert snapshot.layer_id is not None
        return verdict(snapshot, self.store.layer(snapshot.layer_id)).value

    def path(self, snapshot: Snapshot) -> str:
        assert snapshot.layer_id is not None
        refusal = self.checker.refusal(snapshot)
        if refusal is not None:
            raise RemoteLayerError(f"snapshot {snapshot.key}: {refusal}")
        layer = self.store.layer(snapshot.layer_id)
        if layer.digest not in self.layers.mounted:  # its mount failed at start-up: try again
            trio.from_thread.run(self._mount_again, snapshot.key,
                                 LayerSpec.from_json(layer.source), trio_token=self.token)
        return self.layers.mountpoint(layer.digest)

    def release(self, layer_id: int, digest: str) -> None:
        trio.from_thread.run(self.layers.detach, digest, trio_token=self.token)

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
                position, diff_id = _position(image, request, target, parent, where)
                spec = LayerSpec.of(image.pinned, image.layers[position])
                was_mounted = spec.digest in self.layers.mounted
                layer = await self.layers.ensure(spec)
                measured = self._measured(spec.digest)
                if measured is not None and measured != diff_id:
                    raise RemoteLayerError(
                        f"{where}: its config gives diff ID {diff_id}, the layer's content "
                        f"hashes to {measured}")
        except trio.TooSlowError:
            raise RemoteLayerError(
                f"{where}: not mounted within {PREPARE_TIMEOUT_S:.0f} s") from None
        except RemoteLayerError:
            raise
        except LazyfsError as exc:
            raise RemoteLayerError(f"{where}: {exc}") from None
        try:
            self.store.add_remote(target, parent, labels, spec.digest, spec.to_json(),
                                  layer.image.metadata.blob_size, diff_id)
        except AlreadyExistsError:
            pass  # a concurrent Prepare of the same target recorded it (`share` judged it)
        except BaseException:
            if not was_mounted and not any(
                    existing.digest == spec.digest for existing in self.store.layers()):
                await self.layers.detach(spec.digest)
            raise
        self.checker.enqueue(spec.digest)  # measured once, judged for every claim
        log.info("%s: committed as %s", where, target)
        return True

    async def _share(self, existing: Snapshot, labels: dict[str, str]) -> bool:
        """Whether the committed remote snapshot `existing` may stand for a Prepare of its
        name with `labels`: yes for the same layer, or once its layer is proven to hold the
        diff ID the name was made of. No when its layer lies: it is renamed out of the way
        (the caller prepares the target afresh). Raises RemoteLayerError when it cannot be
        proven in time."""
        assert existing.layer_id is not None
        layer = self.store.layer(existing.layer_id)
        request = requested_layer(labels)
        if request is not None and request.digest == layer.digest:
            return True
        asked = f"layer {request.digest} of {request.reference}" if request else "a layer"
        with trio.move_on_after(SHARE_TIMEOUT_S):
            await self.checker.wait_measured(layer.digest)
        layer = self.store.layer(existing.layer_id)
        found = verdict(existing, layer)
        if found is Verdict.HOLDS:
            log.info("snapshot %s: %s shares it (layer %s is proven to hold %s)",
                     existing.key, asked, layer.digest, existing.diff_id)
            return True
        if found is Verdict.LIES:
            moved = self.store.quarantine(existing.key, TARGET_LABEL)
            log.error("snapshot %s: %s; renamed %s so that %s can take its name",
                      existing.key, mismatch(existing, layer), moved, asked)
            return False
        why = ("it was made by an older lazyfs and claims no diff ID"
               if found is Verdict.UNCLAIMED else
               f"its content is not checked yet (waited {SHARE_TIMEOUT_S:.0f} s)")
        raise RemoteLayerError(
            f"snapshot {existing.key} is layer {layer.digest}, not {asked}, and cannot be "
            f"shared: {why}; try again later, or remove the image that pulled it")

    def _measured(self, digest: str) -> str | None:
        for layer in self.store.layers():
            if layer.digest == digest:
                return layer.content_digest
        return None

    async def _mount_again(self, key: str, spec: LayerSpec) -> None:
        try:
            with trio.fail_after(REMOUNT_TIMEOUT_S):
                await self.layers.ensure(spec)
        except trio.TooSlowError:
            raise RemoteLayerError(f"snapshot {key}: layer {spec.digest} is not mounted: not "
                                   f"mounted again within {REMOUNT_TIMEOUT_S:.0f} s") from None
        except (LazyfsError, OSError) as exc:
            raise RemoteLayerError(
                f"snapshot {key}: layer {spec.digest} is not mounted: {exc}") from None
        if not any(layer.digest == spec.digest for layer in self.store.layers()):
            await self.layers.detach(spec.digest)  # its last snapshot went meanwhile
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
                async with self.options.client(reference.registry,
                                               repository=reference.repository) as client:
                    # Every layer is resolved; the one asked for is refused when no digest
                    # authenticates it (LayerSet), not the image for any other's sake.
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


def _position(image: ResolvedImage, request: LayerRequest, target: str, parent: str,
              where: str) -> tuple[int, str]:
    """(index in the manifest, diff ID) of the requested layer whose chain ID is `target`.
    Raises RemoteLayerError when the manifest has no such layer, the config lists no diff ID
    per layer, or `target` (or `parent`) is not the chain ID the config's diff IDs make."""
    diff_ids = image.config.diff_ids
    if len(diff_ids) != len(image.layers):
        raise RemoteLayerError(f"{where}: the config lists {len(diff_ids)} diff IDs for "
                               f"{len(image.layers)} layers")
    try:
        check_diff_ids(diff_ids, f"{where}: config")
    except ChainIdError as exc:
        raise RemoteLayerError(str(exc)) from None
    chain = chain_ids(diff_ids)
    positions = [n for n, layer in enumerate(image.layers) if layer.digest == request.digest]
    if not positions:
        raise RemoteLayerError(f"{where}: the manifest has no such layer")
    for position in positions:
        if chain[position] == target:
            expected_parent = chain[position - 1] if position else ""
            # containerd names a parent it committed itself NAMESPACE/ID/CHAIN_ID.
            if parent != expected_parent and not (
                    expected_parent and parent.endswith("/" + expected_parent)):
                raise RemoteLayerError(
                    f"{where}: parent snapshot {parent or '(none)'} is not the chain ID of the "
                    f"layers below it ({expected_parent or 'none'})")
            return position, diff_ids[position]
    raise RemoteLayerError(
        f"{where}: target snapshot {target} is not the layer's chain ID in this image "
        f"({', '.join(chain[n] for n in positions)})")
