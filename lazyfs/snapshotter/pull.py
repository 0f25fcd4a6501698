"""`lazyfs pull --containerd`: make a seekable EROFS image runnable by containerd without
downloading a layer byte.

The image is resolved and pinned by digest; its index, manifest and config go into
containerd's content store with the garbage-collection labels containerd's own unpack sets
(the config references the top snapshot, the manifest its config and layers, the index its
manifests), the image record points at them, and each layer is prepared through
containerd's snapshot service for the `lazyfs` snapshotter with labels naming the layer:
the snapshotter mounts it lazily and answers AlreadyExists, which containerd records as the
committed snapshot of that chain ID. All of it under a lease, so nothing is collected
before the image record holds it.

For containerd's CRI plugin (`cri=True`, the CRI image service of lazyfs.cri) the image is
named as the plugin names what it pulls itself: by its ID (the config's digest), by the
reference (normalized as the plugin does: a reference with a digest loses its tag) and by
the repository and the digest of what the reference resolved to, each name labelled
`io.cri-containerd.image=managed`. The plugin lists images from containerd's image store
and finds them by any of those names.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass

import grpc
import trio

from lazyfs.containerd.client import ContainerdClient, ContainerdError, Descriptor
from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.chain_id import chain_ids
from lazyfs.format.platform import Platform
from lazyfs.format.reference import parse_reference
from lazyfs.oci.registry_source import ResolvedImage, resolve_image
from lazyfs.snapshotter.content_check import Verdict
from lazyfs.snapshotter.layers import untrusted_reason
from lazyfs.snapshotter.remote import LAZYFS_IMAGE_REF, LAZYFS_LAYER_DIGEST, requested_layer
from lazyfs.snapshotter.snapshots import CONTENT_LABEL, TARGET_LABEL

SNAPSHOTTER = "lazyfs"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot."
GC_CONTENT = "containerd.io/gc.ref.content."
DISTRIBUTION_SOURCE = "containerd.io/distribution.source."
CRI_MANAGED_LABEL = "io.cri-containerd.image"
CRI_MANAGED = "managed"


class PullError(LazyfsError):
    """The image could not be made available to containerd."""


@dataclass(frozen=True)
class FetchedImage:
    """The resolved image and the bytes containerd's content store needs."""

    resolved: ResolvedImage
    top: Descriptor
    index: bytes | None
    manifest: bytes
    manifest_media_type: str
    config: bytes
    config_digest: str


@dataclass(frozen=True)
class PullResult:
    name: str  # the first of `names`
    pinned: str
    chain_ids: list[str]
    image_id: str = ""  # the config's digest
    names: tuple[str, ...] = ()  # every name the image record has


async def fetch_image(reference_text: str, options: RegistryOptions, platform: Platform
                      ) -> FetchedImage:
    """Resolve the image (every layer must be seekable EROFS with digests) and fetch its
    index, manifest and config. Raises LazyfsError subclasses."""
    reference = parse_reference(reference_text)
    async with options.client(reference.registry, repository=reference.repository) as client:
        resolved = await resolve_image(client, reference, platform, insecure=True)
        for number, layer in enumerate(resolved.layers, start=1):
            reason = untrusted_reason(layer.annotations)
            if reason is not None:  # before containerd sees anything
                raise PullError(f"{resolved.pinned}: layer {number} of {len(resolved.layers)}"
                                f" ({layer.digest}): {reason}")
        top_data, top_type, top_digest = await client.get_manifest(
            reference.repository, reference.reference)
        index = None
        manifest, manifest_type = top_data, top_type
        if resolved.index_digest is not None:
            index = top_data
            manifest, manifest_type, _ = await client.get_manifest(
                reference.repository, resolved.manifest_digest)
        config_descriptor = json.loads(manifest)["config"]
        config = await client.get_blob(reference.repository, config_descriptor["digest"],
                                       max_size_bytes=max(1, int(config_descriptor["size"])))
    top = Descriptor(top_type, top_digest, len(top_data))
    return FetchedImage(resolved, top, index, manifest, manifest_type, config,
                        config_descriptor["digest"])


def image_name(reference_text: str) -> str:
    """The name containerd (and `ctr run`) knows the image by: the full reference."""
    reference = parse_reference(reference_text)
    name = f"{reference.registry}/{reference.repository}"
    if reference.tag:
        name += f":{reference.tag}"
    if reference.digest:
        name += f"@{reference.digest}"
    return name


def cri_names(reference_text: str, top_digest: str, image_id: str) -> list[str]:
    """The names containerd's CRI plugin gives an image it pulls (`image_id` first): the
    reference as the plugin normalizes it, and the repository at `top_digest` (the index or
    manifest the reference resolved to) unless the reference has a digest already."""
    reference = parse_reference(reference_text)
    if reference.digest is not None:
        return [image_id, f"{reference.name}@{reference.digest}"]
    return [image_id, f"{reference.name}:{reference.tag}", f"{reference.name}@{top_digest}"]


def pull_into_containerd(reference_text: str, options: RegistryOptions, platform: Platform,
                         address: str, namespace: str) -> PullResult:
    """Resolve the image, register it with containerd and prepare every layer lazily.
    Raises PullError, LazyfsError subclasses of the registry, ContainerdError."""
    fetched = trio.run(fetch_image, reference_text, options, platform)
    return put_into_containerd(fetched, reference_text, address, namespace)


def put_into_containerd(fetched: FetchedImage, reference_text: str, address: str,
                        namespace: str, *, cri: bool = False) -> PullResult:
    """Register a fetched image with containerd and prepare every layer lazily; with `cri`,
    named for containerd's CRI plugin (see above). Nothing is left when it fails: what it
    wrote is collected as its lease goes (before this returns), the names it gave are removed.
    Raises PullError, ContainerdError."""
    resolved = fetched.resolved
    try:
        diff_ids = list(json.loads(fetched.config)["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PullError(f"{resolved.pinned}: config has no rootfs.diff_ids: {exc}") from None
    if len(diff_ids) != len(resolved.layers):
        raise PullError(f"{resolved.pinned}: {len(diff_ids)} diff IDs for "
                        f"{len(resolved.layers)} layers")
    chain = chain_ids(diff_ids)
    reference = parse_reference(reference_text)
    if cri:
        names = cri_names(reference_text, fetched.top.digest, fetched.config_digest)
        image_labels = {CRI_MANAGED_LABEL: CRI_MANAGED}
    else:
        names, image_labels = [image_name(reference_text)], {}
    source_label = {DISTRIBUTION_SOURCE + reference.registry: reference.repository}
    with ContainerdClient(address, namespace) as client:
        lease = client.create_lease()
        named: list[str] = []
        failed = True
        try:
            client.write_content(fetched.config_digest, fetched.config,
                                 {GC_SNAPSHOT + SNAPSHOTTER: chain[-1], **source_label})
            manifest_labels = {GC_CONTENT + "config": fetched.config_digest, **source_label}
            for number, layer in enumerate(resolved.layers):
                manifest_labels[f"{GC_CONTENT}l.{number}"] = layer.digest
            client.write_content(resolved.manifest_digest, fetched.manifest, manifest_labels)
            if fetched.index is not None:
                entries = json.loads(fetched.index).get("manifests", [])
                index_labels = {f"{GC_CONTENT}m.{number}": entry["digest"]
                                for number, entry in enumerate(entries)}
                client.write_content(fetched.top.digest, fetched.index,
                                     {**index_labels, **source_label})
            for number, layer in enumerate(resolved.layers):
                _prepare_layer(client, resolved, number, layer.digest, chain)
            for name in names:
                client.put_image(name, fetched.top, image_labels)
                named.append(name)
            failed = False
        finally:
            for name in named if failed else ():
                with contextlib.suppress(ContainerdError):
                    client.delete_image(name)
            client.delete_lease(lease, sync=failed)
    return PullResult(names[0], resolved.pinned, chain, fetched.config_digest, tuple(names))


def _prepare_layer(client: ContainerdClient, image: ResolvedImage, number: int, digest: str,
                   chain: list[str]) -> None:
    target = chain[number]
    existing = client.snapshot_labels(SNAPSHOTTER, target)
    if existing is not None:
        _check_shared(existing, number, digest, chain, client.namespace)
        return
    key = f"extract-{secrets.token_hex(6)} {target}"
    labels = {
        TARGET_LABEL: target,
        LAZYFS_IMAGE_REF: image.pinned,
        LAZYFS_LAYER_DIGEST: digest,
    }
    parent = chain[number - 1] if number else ""
    try:
        client.prepare(SNAPSHOTTER, key, parent, labels)
    except ContainerdError as exc:
        if exc.code == grpc.StatusCode.ALREADY_EXISTS:
            return  # the snapshotter mounted the layer: containerd recorded the target
        raise PullError(f"layer {number + 1} of {len(chain)} ({digest}): {exc}") from None
    # An ordinary active snapshot: the snapshotter did not take the layer as remote.
    client.remove_snapshot(SNAPSHOTTER, key)
    raise PullError(
        f"layer {number + 1} of {len(chain)} ({digest}): the {SNAPSHOTTER} snapshotter did "
        "not mount it lazily (is containerd's proxy plugin `lazyfs` this snapshotter?)"
    )


def _check_shared(labels: dict[str, str], number: int, digest: str, chain: list[str],
                  namespace: str) -> None:
    """The namespace has a snapshot named by this layer's chain ID already (containerd would
    use it without asking the snapshotter): it must be this layer, or a remote layer proven
    to hold the same content, or an ordinary snapshot (containerd checked its diff ID when it
    unpacked it). Raises PullError otherwise."""
    state = labels.get(CONTENT_LABEL)
    if state is None:
        return  # an ordinary snapshot, unpacked and checked by containerd
    try:
        holder = requested_layer(labels)
    except LazyfsError:
        holder = None
    if (holder is not None and holder.digest == digest) or state == Verdict.HOLDS.value:
        return
    where = f"layer {number + 1} of {len(chain)} ({digest})"
    other = f"layer {holder.digest} of {holder.reference}" if holder else "another layer"
    if state == Verdict.LIES.value:
        raise PullError(
            f"{where}: namespace {namespace} has its chain ID {chain[number]} as {other}, "
            "which does not hold what its image says: remove that image (`ctr -n "
            f"{namespace} images rm ...`) and pull again")
    raise PullError(
        f"{where}: namespace {namespace} has its chain ID {chain[number]} as {other}, whose "
        f"content is not proven to be the same yet ({state}); pull again once the "
        "snapshotter has checked it")
