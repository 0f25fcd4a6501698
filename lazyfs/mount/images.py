"""Images in registries, ready to mount: references resolved to pinned manifests, the distinct
layers one daemon serves for them all, and the record of each image's overlay."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from lazyfs.cache.disk import DiskCacheOptions
from lazyfs.fetch.errors import FetchError
from lazyfs.format.platform import Platform
from lazyfs.format.reference import DOCKER_HUB, parse_reference
from lazyfs.layer.errors import ImageResolveError
from lazyfs.mount.state import ImageRecord
from lazyfs.oci.image_memory import Entries, ImageMemory, PendingEntries
from lazyfs.oci.registry_source import ResolvedImage, layer_sources, resolve_image
from lazyfs.startup.open import LayerSource

if TYPE_CHECKING:
    from lazyfs.fetch.registry_options import RegistryOptions
    from lazyfs.startup.registry_head_start import PrimedRegistry

@dataclass
class ImageSet:
    """Resolved images and the distinct layers that serve them all (each once); `disk_keys`:
    the disk cache entries the images were resolved from (the daemon counts them as used);
    `disk_writes`: what the resolution learned for the disk cache to remember (the daemon
    writes it: `image_memory.PendingEntries`)."""

    images: list[ResolvedImage]
    sources: list[LayerSource]
    disk_keys: list[str] = field(default_factory=list)
    disk_writes: list[tuple[str, bytes | None]] = field(default_factory=list)


def image_record(
    reference: str,
    image: ResolvedImage,
    mountpoint: str,
    upperdir: str | None = None,
    workdir: str | None = None,
) -> ImageRecord:
    """The mount's record of `image`, resolved from `reference`, stacked at `mountpoint`
    (writable when `upperdir` and `workdir` are given)."""
    return ImageRecord(
        reference=reference,
        manifest_digest=image.manifest_digest,
        platform=image.platform,
        mountpoint=mountpoint,
        layers=[layer.name for layer in image.layers],
        upperdir=upperdir,
        workdir=workdir,
    )


async def resolve_images(
    references: Sequence[str], options: RegistryOptions, platform: Platform, *, insecure: bool,
    disk: DiskCacheOptions | None = None, primed: PrimedRegistry | None = None,
) -> ImageSet:
    """Resolve every reference and collect their layers; a layer shared by several images
    (or repeated in one) is listed once. With `disk`, manifests and configs remembered there
    stand in while a registry is unreachable, or as `disk.pull` says, and what was fetched is
    listed to be remembered (`ImageSet.disk_writes`; `lazyfs.oci.image_memory`); `primed`
    holds a head start's answers for the first reference. With `options.deadline_s` the
    whole resolution asks the registries for at most that long, counted from the head
    start's first request when there was one (RegistryTimeoutError names what stalled).
    Raises ImageResolveError for a malformed reference, and the errors of `resolve_image`
    (one line each)."""
    if disk is None:
        return await _resolve_images(references, options, platform, insecure, None, primed)
    entries = PendingEntries(disk.directory)
    found = await _resolve_images(references, options, platform, insecure, entries, primed,
                                  disk.pull)
    found.disk_writes = entries.writes
    return found


async def _resolve_images(
    references: Sequence[str], options: RegistryOptions, platform: Platform, insecure: bool,
    disk: Entries | None, primed: PrimedRegistry | None, pull: str = "always",
) -> ImageSet:
    parsed = []
    for text in references:
        try:
            parsed.append(parse_reference(text))
        except ValueError as exc:
            raise ImageResolveError(str(exc)) from None

    deadline = None
    if options.deadline_s is not None:
        started = time.monotonic() if primed is None else primed.started
        deadline = trio.current_time() + options.deadline_s - (time.monotonic() - started)
    images: list[ResolvedImage] = []
    sources: dict[str, LayerSource] = {}
    names: list[str] = []  # the mount's name of each distinct layer
    used: list[str] = []  # disk cache entries the answers came from
    for position, (text, reference) in enumerate(zip(references, parsed, strict=True)):
        early = primed if position == 0 else None
        try:
            async with options.client(reference.registry) as client:
                if deadline is not None:
                    client.end_by(deadline)
                memory = (None if disk is None
                          else ImageMemory(client, reference.registry, disk, pull, used))
                image = await resolve_image(client, reference, platform, insecure=insecure,
                                            memory=memory, primed=early)
                wanted = [layer for layer in image.distinct_layers if layer.digest not in sources]
                found = await layer_sources(reference, wanted, client, options)
                if early is not None:  # the layers' first answers, for blobs of the registry
                    found = [replace(source, primed=early.layers.get(layer.digest))
                             if source.blob == client.blob_url(reference.repository,
                                                               layer.digest) else source
                             for layer, source in zip(wanted, found, strict=True)]
        except FetchError as exc:
            hint = _hint(text, reference.registry)
            if hint:
                raise ImageResolveError(f"{exc}{hint}") from None
            raise
        except ValueError as exc:  # a malformed registry or mirror name
            raise ImageResolveError(str(exc)) from None
        for layer, source in zip(wanted, found, strict=True):
            sources[layer.digest] = source
            names.append(layer.name)
        images.append(image)
    if len(set(names)) != len(names):
        raise ImageResolveError(f"layers of different digests share a name: {sorted(names)}")
    return ImageSet(images, list(sources.values()), list(dict.fromkeys(used)))


def _hint(text: str, registry: str) -> str:
    """A reminder when a name meant as a file was taken for a Docker Hub image."""
    if registry == DOCKER_HUB and not text.startswith(DOCKER_HUB):
        return f" (and there is no file or directory named {text!r})"
    return ""
