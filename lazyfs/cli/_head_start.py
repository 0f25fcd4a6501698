"""A mount's first requests, started from the command line before the command imports the
rest (`lazyfs.startup.head_start` for a layer URL, `lazyfs.startup.registry_head_start` for an
image), and their answers handed over once the daemon is about to start. Light to import."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.cli import UserError
from lazyfs.cli._images import cache_directory_of, platform_of

if TYPE_CHECKING:
    from lazyfs.fetch.primed import PrimedAnswers
    from lazyfs.format.descriptor import Descriptor
    from lazyfs.format.platform import Platform
    from lazyfs.format.reference import ImageReference
    from lazyfs.startup.head_start import HeadStart
    from lazyfs.startup.registry_head_start import PrimedRegistry, RegistryHeadStart
    from lazyfs.startup.warm_start import WarmFeed, WarmLayer, WarmStart

# How long a command waits, once it is ready to start its daemon, for answers still on their
# way (the daemon would wait for them anyway, asking again).
HEAD_START_WAIT_S = 1.0


def layer_head_start(args: argparse.Namespace, descriptor: str | None,
                     headers: dict[str, str]) -> HeadStart | None:
    """Start fetching what opening the layer SOURCE names asks for first (its descriptor at
    `descriptor` when given: a URL, or a local file read now), when it is an http(s) URL (not
    a layer located by offsets given here)."""
    if "://" not in args.source or args.chunk_table_offset is not None:
        return None
    from lazyfs.format.descriptor import is_local
    from lazyfs.layer.tuning import ImageTuning
    from lazyfs.startup.head_start import HeadStart

    if not HeadStart.applies_to(args.source, descriptor):
        return None
    known, held = _layer_on_disk(args, descriptor)
    # A local descriptor that cannot be read: the daemon says why; its layer's metadata on
    # disk: the daemon opens it without a request.
    if descriptor is not None and is_local(descriptor) and (known is None or held):
        return None
    return HeadStart(args.source, descriptor=descriptor, known=known, headers=headers,
                     tree_window_bytes=ImageTuning().verity_window_bytes,
                     first_frame=not args.block_only, descriptor_only=held).start()


def image_head_start(text: str, args: argparse.Namespace, *,
                     mounts: bool = True) -> RegistryHeadStart | None:
    """Start fetching what resolving the image `text` and mounting its layers ask for first
    (`mounts`: EROFS is mounted on the layers, so their first frames too); none when the
    image is taken from the disk cache without asking the registry (`--pull`)."""
    from lazyfs.layer.keys import image_data_key

    parsed = _reference_and_platform(text, args)
    if parsed is None:
        return None
    reference, platform = parsed
    remembered = _disk_cache_holds(args, _image_key(reference))
    pull = getattr(args, "pull", "always")
    if pull == "never" or (remembered and pull == "missing"):
        return None
    from lazyfs.layer.tuning import ImageTuning
    from lazyfs.startup.registry_head_start import RegistryHeadStart

    if not RegistryHeadStart.applies_to(reference, bool(args.mirror)):
        return None
    return RegistryHeadStart(reference, insecure=args.insecure_registry, platform=platform,
                             tree_window_bytes=ImageTuning().verity_window_bytes,
                             first_frames=mounts, layers=not remembered,
                             kept=lambda digest: _disk_cache_holds(
                                 args, image_data_key(digest))).start()


def finish_layer(head_start: HeadStart | RegistryHeadStart | None) -> PrimedAnswers | None:
    """The answers that arrived by now for a layer URL; while they travel, the daemon's own
    imports are done here, before its fork."""
    from lazyfs.startup.head_start import HeadStart

    if not isinstance(head_start, HeadStart):
        return None
    _preload()
    return head_start.finish(HEAD_START_WAIT_S)


def finish_image(head_start: RegistryHeadStart | None,
                 deadline_s: float | None = None) -> PrimedRegistry | None:
    """As `finish_layer`, for an image; the wait ends within `deadline_s` of the head
    start's first request (the resolution's deadline: it goes on from there)."""
    if head_start is None:
        return None
    _preload()
    return head_start.finish(HEAD_START_WAIT_S, deadline_s)


def image_warm_start(text: str, args: argparse.Namespace) -> WarmStart | None:
    """Start loading what the disk cache holds of the image `text` as it remembers it (the
    manifest its tag pointed to last), for the daemon to start with; none when it remembers
    no manifest for it."""
    parsed = _reference_and_platform(text, args)
    if parsed is None or not _disk_cache_holds(args, _image_key(parsed[0])):
        return None
    from lazyfs.startup.warm_start import remembered_image_layers

    reference, platform = parsed
    return _warm_start(args, lambda directory: remembered_image_layers(
        directory, reference.registry, reference.repository, reference.reference, platform))


def layer_warm_start(args: argparse.Namespace, descriptor: str | None) -> WarmStart | None:
    """As `image_warm_start`, for the layer URL SOURCE (its descriptor as remembered, or the
    local file `descriptor`); none when the disk cache holds nothing of it to start with."""
    if "://" not in args.source or args.chunk_table_offset is not None:
        return None
    if not _layer_on_disk(args, descriptor)[1]:
        return None
    from lazyfs.startup.warm_start import remembered_layer

    return _warm_start(args, lambda directory: remembered_layer(directory, args.source,
                                                                descriptor))


def finish_warm(warm_start: WarmStart | None,
                ) -> tuple[dict[str, memoryview], WarmFeed | None]:
    """For the daemon about to start: the chunks a warm start loaded by now, and the loader
    going on (`WarmStart.hand_over`)."""
    return ({}, None) if warm_start is None else warm_start.hand_over()


def _warm_start(args: argparse.Namespace,
                layers: Callable[[Path], list[WarmLayer]]) -> WarmStart | None:
    """A warm start from the command's disk cache, up to half the chunk cache (what the
    daemon would load ahead of reads); none when the daemon would not load ahead. It forks:
    call it before any thread starts."""
    directory = _cache_directory(args)
    if directory is None or args.no_prefetch:
        return None
    from lazyfs.cli.sizes import parse_size
    from lazyfs.startup.warm_start import WarmStart

    try:
        budget = parse_size(args.cache_size, "--cache-size") // 2
    except UserError:
        return None  # reported with the other checks
    return WarmStart(directory, lambda: layers(directory), budget).start()


def _preload() -> None:
    from lazyfs.mount.background import preload_daemon_modules

    preload_daemon_modules()


def _layer_on_disk(args: argparse.Namespace,
                   descriptor: str | None) -> tuple[Descriptor | None, bool]:
    """For the layer URL SOURCE: its descriptor when `descriptor` is a local file (read now;
    None when it cannot be, or for a URL), and whether the disk cache holds what opening the
    layer starts with (that layer's metadata; else the descriptor last fetched from where the
    daemon looks for it)."""
    from lazyfs.format.descriptor import descriptor_locations, is_local
    from lazyfs.layer.keys import descriptor_key, layer_key

    if descriptor is not None and is_local(descriptor):
        from lazyfs.startup.head_start import read_descriptor_file

        known = read_descriptor_file(descriptor)
        return known, known is not None and _disk_cache_holds(
            args, layer_key(known.seekable(descriptor)))
    return None, _disk_cache_holds(args, *(
        descriptor_key(location) for location in descriptor_locations(args.source, descriptor)))


def _image_key(reference: ImageReference) -> str | None:
    """The disk cache's name for what `reference` (a tag or a digest) stands for."""
    from lazyfs.layer.keys import image_data_key, tag_key

    wanted = reference.reference
    if wanted.startswith(("sha256:", "sha512:")):
        return image_data_key(wanted)
    return tag_key(reference.registry, reference.repository, wanted)


def _disk_cache_holds(args: argparse.Namespace, *keys: str | None) -> bool:
    """Whether the disk cache the command uses has one of `keys`: then what it names was
    fetched by an earlier mount, the daemon will find it there, and a head start fetching it
    would only waste the bytes."""
    directory = _cache_directory(args)
    if directory is None:
        return False
    from lazyfs.cache.disk_store import entry_path

    return any(key is not None and entry_path(directory, key).exists() for key in keys)


def _reference_and_platform(text: str, args: argparse.Namespace,
                            ) -> tuple[ImageReference, Platform] | None:
    """The image reference `text` and the platform asked for; None when either is bad (the
    command reports it with its other checks)."""
    from lazyfs.format.reference import parse_reference

    try:
        return parse_reference(text), platform_of(args)
    except (ValueError, UserError):
        return None


def _cache_directory(args: argparse.Namespace) -> Path | None:
    """The disk cache directory the command uses (None: --no-disk-cache). Raises UserError
    for one that another user could change (`cache_directory_of`)."""
    directory = cache_directory_of(args)
    return None if directory is None else Path(directory)
