"""A mount's first requests, started from the command line before the command imports the
rest (`lazyfs.fetch.head_start` for a layer URL, `lazyfs.fetch.registry_head_start` for an
image), and their answers handed over once the daemon is about to start. Light to import."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.cli import UserError
from lazyfs.cli._images import platform_of

if TYPE_CHECKING:
    from lazyfs.fetch.head_start import HeadStart, PrimedAnswers
    from lazyfs.fetch.registry_head_start import PrimedRegistry, RegistryHeadStart

# How long a command waits, once it is ready to start its daemon, for answers still on their
# way (the daemon would wait for them anyway, asking again).
HEAD_START_WAIT_S = 1.0


def layer_head_start(args: argparse.Namespace, descriptor: str | None,
                     headers: dict[str, str]) -> HeadStart | None:
    """Start fetching what opening the layer SOURCE names asks for first (its descriptor at
    `descriptor` when given), when it is an http(s) URL (not a layer located by offsets
    given here)."""
    if "://" not in args.source or args.chunk_table_offset is not None:
        return None
    from lazyfs.fetch.head_start import HeadStart
    from lazyfs.format.descriptor import descriptor_locations
    from lazyfs.image.keys import descriptor_key
    from lazyfs.image.tuning import ImageTuning

    if not HeadStart.applies_to(args.source, descriptor):
        return None
    remembered = _disk_cache_holds(args, *(
        descriptor_key(location) for location in descriptor_locations(args.source, descriptor)))
    return HeadStart(args.source, descriptor=descriptor, headers=headers,
                     tree_window_bytes=ImageTuning().verity_window_bytes,
                     first_frame=not args.block_only, descriptor_only=remembered).start()


def image_head_start(text: str, args: argparse.Namespace, *,
                     mounts: bool = True) -> RegistryHeadStart | None:
    """Start fetching what resolving the image `text` and mounting its layers ask for first
    (`mounts`: EROFS is mounted on the layers, so their first frames too)."""
    from lazyfs.fetch.registry_head_start import RegistryHeadStart
    from lazyfs.format.reference import parse_reference
    from lazyfs.image.keys import image_data_key, tag_key
    from lazyfs.image.tuning import ImageTuning

    try:
        reference = parse_reference(text)
        platform = platform_of(args)
    except (ValueError, UserError):
        return None  # reported with the other checks
    if not RegistryHeadStart.applies_to(reference, bool(args.mirror)):
        return None
    wanted = reference.reference
    key = (image_data_key(wanted) if wanted.startswith(("sha256:", "sha512:"))
           else tag_key(reference.registry, reference.repository, wanted))
    return RegistryHeadStart(reference, insecure=args.insecure_registry, platform=platform,
                             tree_window_bytes=ImageTuning().verity_window_bytes,
                             first_frames=mounts,
                             layers=not _disk_cache_holds(args, key)).start()


def finish_layer(head_start: HeadStart | RegistryHeadStart | None) -> PrimedAnswers | None:
    """The answers that arrived by now for a layer URL; while they travel, the daemon's own
    imports are done here, before its fork."""
    from lazyfs.fetch.head_start import HeadStart

    if not isinstance(head_start, HeadStart):
        return None
    _preload()
    return head_start.finish(HEAD_START_WAIT_S)


def finish_image(head_start: RegistryHeadStart | None) -> PrimedRegistry | None:
    """As `finish_layer`, for an image."""
    if head_start is None:
        return None
    _preload()
    return head_start.finish(HEAD_START_WAIT_S)


def _preload() -> None:
    from lazyfs.mount.background import preload_daemon_modules

    preload_daemon_modules()


def _disk_cache_holds(args: argparse.Namespace, *keys: str | None) -> bool:
    """Whether the disk cache the command uses has one of `keys`: then what it names was
    fetched by an earlier mount, the daemon will find it there, and a head start fetching it
    would only waste the bytes."""
    if args.no_disk_cache:
        return False
    from lazyfs.cache.defaults import default_cache_dir
    from lazyfs.cache.disk_store import entry_path

    directory = Path(os.path.abspath(args.cache_dir) if args.cache_dir else default_cache_dir())
    return any(key is not None and entry_path(directory, key).exists() for key in keys)
