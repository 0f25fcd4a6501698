"""What a mount does before its daemon is up, in one place.

A command that mounts a layer URL or an image (`lazyfs mount`, `lazyfs run`) calls
`begin_layer` or `begin_image` first, before it imports trio, pyfuse3 and httpx. That starts,
when they can help:

  1. a warm start (`warm_start`): a forked loader decodes what the disk cache holds of the
     layers, as the last mount left them (first: it forks, and nothing may have threads yet);
  2. the early requests (`head_start` for a layer URL, `registry_head_start` for an image):
     the first requests of resolving and opening the layers, in threads, with the standard
     library alone, while the command imports the rest.

Both are in the `EarlyStart` returned. Once the daemon is about to start, the mount service
takes their answers from it (`layer_answers`, `image_answers`, `warm_chunks`) and the daemon
starts with them instead of making the same requests and disk reads. Neither is needed:
whatever stops them, the daemon does the work itself. The disk cache directory they look in
is prepared first (`cache_directory`, which raises StartupError). Light to import: the warm
start and an image's head start are imported only when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.cache.keys import descriptor_key, image_data_key, layer_key, tag_key
from lazyfs.fetch.primed import PrimedAnswers
from lazyfs.format.descriptor import Descriptor, descriptor_locations, is_local
from lazyfs.format.reference import ImageReference, parse_reference
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.head_start import HeadStart, read_descriptor_file

if TYPE_CHECKING:
    from lazyfs.format.platform import Platform
    from lazyfs.startup.registry_head_start import PrimedRegistry, RegistryHeadStart
    from lazyfs.startup.warm_start import WarmFeed, WarmLayer, WarmStart

# How long a command waits, once it is ready to start its daemon, for answers still on their
# way (the daemon would wait for them anyway, asking again).
HEAD_START_WAIT_S = 1.0


@dataclass
class EarlyStart:
    """The work under way for a mount before its daemon starts: the early requests of a layer
    URL (`layer`) or of an image (`image`), and the warm start (`warm`); each None when it
    does not run."""

    layer: HeadStart | None = None
    image: RegistryHeadStart | None = None
    warm: WarmStart | None = None

    def layer_answers(self, meanwhile: Callable[[], None]) -> PrimedAnswers | None:
        """The answers the layer's early requests received by now (up to `HEAD_START_WAIT_S`
        more for those on their way, while `meanwhile` runs first: the daemon's imports)."""
        if self.layer is None:
            return None
        meanwhile()
        return self.layer.finish(HEAD_START_WAIT_S)

    def image_answers(self, meanwhile: Callable[[], None],
                      deadline_s: float | None = None) -> PrimedRegistry | None:
        """As `layer_answers`, for the image; the wait ends within `deadline_s` of the first
        request (the resolution's deadline: it goes on from there)."""
        if self.image is None:
            return None
        meanwhile()
        return self.image.finish(HEAD_START_WAIT_S, deadline_s)

    def warm_chunks(self) -> tuple[dict[str, memoryview], WarmFeed | None]:
        """For the daemon about to start: the chunks the warm start loaded by now, and the
        loader going on (`WarmStart.hand_over`)."""
        return ({}, None) if self.warm is None else self.warm.hand_over()


def begin_layer(blob: str, *, descriptor: str | None, headers: Mapping[str, str],
                cache_dir: Path | None, warm_bytes: int | None,
                first_frame: bool = True) -> EarlyStart:
    """Start what can go ahead for the layer URL `blob`: its descriptor is at `descriptor`
    (a URL, or a local file read now; default beside the blob), `headers` go with every
    request, `cache_dir` is the disk cache (None: none), `warm_bytes` what a warm start may
    load (None: the daemon loads nothing ahead); `first_frame`: EROFS is mounted on the layer,
    so its first frame is read first too."""
    if "://" not in blob:
        return EarlyStart()
    known, held = _layer_on_disk(cache_dir, blob, descriptor)
    warm = None
    if held and cache_dir is not None and warm_bytes is not None:
        from lazyfs.startup.warm_start import remembered_layer  # only with a disk cache

        warm = _warm_start(cache_dir, warm_bytes,
                           lambda: remembered_layer(cache_dir, blob, descriptor))
    if not HeadStart.applies_to(blob, descriptor):
        return EarlyStart(warm=warm)
    # A local descriptor that cannot be read: the daemon says why; its layer's metadata on
    # disk: the daemon opens the layer without a request.
    if descriptor is not None and is_local(descriptor) and (known is None or held):
        return EarlyStart(warm=warm)
    layer = HeadStart(blob, descriptor=descriptor, known=known, headers=headers,
                      tree_window_bytes=ImageTuning().verity_window_bytes,
                      first_frame=first_frame, descriptor_only=held).start()
    return EarlyStart(layer=layer, warm=warm)


def begin_image(text: str, *, platform: Platform, insecure_registry: bool, mirrors: bool,
                pull: str, cache_dir: Path | None, warm_bytes: int | None,
                first_frames: bool = True) -> EarlyStart:
    """Start what can go ahead for the image `text` (a reference; nothing when it does not
    parse: the command says why): `insecure_registry` means plain HTTP, `mirrors` that
    mirrors are tried first, `pull` when the registry is asked for the tag's manifest
    (always, missing, never); `first_frames`: EROFS is mounted on the layers. The rest as
    for `begin_layer`."""
    try:
        reference = parse_reference(text)
    except ValueError:
        return EarlyStart()
    remembered = _disk_cache_holds(cache_dir, _image_key(reference))
    warm = None
    if remembered and cache_dir is not None and warm_bytes is not None:
        from lazyfs.startup.warm_start import remembered_image_layers  # only with a disk cache

        warm = _warm_start(cache_dir, warm_bytes, lambda: remembered_image_layers(
            cache_dir, reference.registry, reference.repository, reference.reference, platform))
    if pull == "never" or (remembered and pull == "missing"):
        return EarlyStart(warm=warm)
    from lazyfs.startup.registry_head_start import RegistryHeadStart  # images only

    if not RegistryHeadStart.applies_to(reference, mirrors):
        return EarlyStart(warm=warm)
    image = RegistryHeadStart(
        reference, insecure=insecure_registry, platform=platform,
        tree_window_bytes=ImageTuning().verity_window_bytes, first_frames=first_frames,
        layers=not remembered,
        kept=lambda digest: _disk_cache_holds(cache_dir, image_data_key(digest))).start()
    return EarlyStart(image=image, warm=warm)


def _warm_start(directory: Path, budget_bytes: int,
                layers: Callable[[], list[WarmLayer]]) -> WarmStart | None:
    """A warm start from the disk cache in `directory`. It forks: call it before any thread
    starts."""
    from lazyfs.startup.warm_start import WarmStart

    return WarmStart(directory, layers, budget_bytes).start()


def _layer_on_disk(directory: Path | None, blob: str,
                   descriptor: str | None) -> tuple[Descriptor | None, bool]:
    """For the layer URL `blob`: its descriptor when `descriptor` is a local file (read now;
    None when it cannot be, or for a URL), and whether the disk cache holds what opening the
    layer starts with (that layer's metadata; else the descriptor last fetched from where the
    daemon looks for it)."""
    if descriptor is not None and is_local(descriptor):
        known = read_descriptor_file(descriptor)
        return known, known is not None and _disk_cache_holds(
            directory, layer_key(known.seekable(descriptor)))
    return None, _disk_cache_holds(directory, *(
        descriptor_key(location) for location in descriptor_locations(blob, descriptor)))


def _image_key(reference: ImageReference) -> str | None:
    """The disk cache's name for what `reference` (a tag or a digest) stands for."""
    wanted = reference.reference
    if wanted.startswith(("sha256:", "sha512:")):
        return image_data_key(wanted)
    return tag_key(reference.registry, reference.repository, wanted)


def _disk_cache_holds(directory: Path | None, *keys: str | None) -> bool:
    """Whether the disk cache in `directory` has one of `keys`: then what it names was fetched
    by an earlier mount, the daemon will find it there, and an early request for it would
    only waste the bytes."""
    if directory is None:
        return False
    from lazyfs.cache.disk_store import entry_path

    return any(key is not None and entry_path(directory, key).exists() for key in keys)
