"""Start-up order: the file blocks a recorded start read, found in the layer's source so that
lazyfs's writer lays them out right after the metadata, in the order the start read them.

A recorded prefetch list (`lazyfs run --record`, `lazyfs mount --record`) names, per layer, the
4 KiB blocks of the raw EROFS image that reads touched, in the order they first did. They are
mapped back to (file, block of the file):

- in an EROFS image (a raw image, or a seekable layer once decoded) by its block maps
  (`ErofsSource.blocks_of`): exact, whoever wrote the image;
- in a directory or a tar layer, by replaying where lazyfs's writer put each block when it
  converted that source before (`place_blocks`, nothing written): right when the recorded layer
  was converted from the same source by this writer with the same options. The recording names
  that layer's layout fingerprint (`converter.erofs.layout_fingerprint`): the replay's must be
  the same, or the list is refused (LayoutMismatchError). A list without one (recorded on a
  layer from an older lazyfs) is matched by the image's size alone.

Blocks that hold no file data (the superblock, inodes, directories) and holes are left out:
the metadata comes first anyway. A block that several files share goes once, with the first
file found to hold it. The new layer's prefetch list is then its first chunks, up to the end
of those blocks (`startup_prefetch`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import LayerSource, Node
from converter.erofs.layout import BLOCK_SIZE
from converter.erofs.layout_fingerprint import LayoutFingerprint
from converter.erofs.writer import ImageOptions, place_blocks
from converter.errors import ConvertError
from lazyfs.format.prefetch_list import LayerPrefetch, PrefetchList

StartupBlocks = list[tuple[Node, int]]


class NoStartupOrderError(ConvertError):
    """No layer of a recorded list fits the layer being converted."""


class LayoutMismatchError(ConvertError):
    """The recorded layer was placed otherwise than this writer places the source: its blocks
    would map to the wrong files."""


def recorded_layers(prefetch: PrefetchList, where: str) -> list[LayerPrefetch]:
    """The layers of `prefetch` that have a block record. Raises ConvertError when none has
    (a list recorded before lazyfs recorded blocks)."""
    layers = [layer for layer in prefetch.layers if layer.blocks]
    if not layers:
        raise ConvertError(f"{where}: records no blocks (a list from an older lazyfs, or reads "
                           "of nothing): record the start again with --record")
    for layer in layers:
        if layer.block_size != BLOCK_SIZE:
            raise ConvertError(f"{where}: blocks of {layer.block_size} bytes; the writer "
                               f"places {BLOCK_SIZE}-byte blocks")
    return layers


def layer_for_size(prefetch: PrefetchList, image_size: int, where: str) -> LayerPrefetch:
    """The recorded layer whose raw image had `image_size` bytes. Raises NoStartupOrderError
    when none (or more than one) has."""
    fits = [layer for layer in recorded_layers(prefetch, where)
            if layer.image_size == image_size]
    if len(fits) != 1:
        sizes = ", ".join(str(layer.image_size) for layer in recorded_layers(prefetch, where))
        raise NoStartupOrderError(
            f"{where}: {'no' if not fits else 'more than one'} recorded layer has an image of "
            f"{image_size} bytes, this layer's (recorded: {sizes}); record a mount of this "
            "layer's conversion by lazyfs's writer, or convert the layer that was recorded")
    return fits[0]


def layer_for_layout(prefetch: PrefetchList, image_size: int, layout: str,
                     where: str) -> LayerPrefetch:
    """The recorded layer whose image was placed as `layout` says (of `image_size` bytes);
    failing that, the one of `image_size` bytes without a fingerprint. Raises
    LayoutMismatchError when that one has another fingerprint, NoStartupOrderError when none
    fits."""
    same = [layer for layer in recorded_layers(prefetch, where) if layer.layout == layout
            and layer.image_size == image_size]
    if len(same) == 1:
        return same[0]
    layer = layer_for_size(prefetch, image_size, where)
    if layer.layout and layer.layout != layout:
        raise LayoutMismatchError(
            f"{where}: layer {layer.name or layer.chunk_digest} was recorded on an image laid "
            f"out otherwise (layout {layer.layout}) than this lazyfs lays out this source "
            f"(layout {layout}): its blocks would map to the wrong files. Record the start "
            "again on a layer converted by this lazyfs, or pass the recorded layer itself "
            "(its blob or raw image) as the source: its block maps map the blocks exactly")
    return layer


def in_order(recorded: Sequence[int], owners: Iterable[tuple[int, Node, int]]) -> StartupBlocks:
    """The (node, file block) owning each recorded image block, in the recorded order; blocks
    nobody owns are left out, a block owned several times goes with its first owner."""
    position = {block: number for number, block in enumerate(recorded)}
    found: dict[int, tuple[Node, int]] = {}
    for block, node, number in owners:
        if block in position and block not in found:
            found[block] = (node, number)
    return [found[block] for block in recorded if block in found]


def startup_from_image(source: ErofsSource, image_size: int, prefetch: PrefetchList,
                       where: str) -> StartupBlocks:
    """The start-up blocks of the EROFS image `source` (of `image_size` bytes), by its block
    maps. Raises NoStartupOrderError when the list has no layer of its size."""
    layer = layer_for_size(prefetch, image_size, where)
    return in_order(layer.blocks, source.blocks_of(BLOCK_SIZE))


def startup_by_replay(source: LayerSource, options: ImageOptions, prefetch: PrefetchList,
                      where: str) -> StartupBlocks:
    """The start-up blocks of a directory or tar layer, by replaying the placement of its
    conversion by lazyfs's writer. Raises NoStartupOrderError when the list has no layer of
    the size that conversion had, LayoutMismatchError when the layer it recorded was placed
    otherwise."""
    wanted = {block for layer in recorded_layers(prefetch, where) for block in layer.blocks}
    owners: list[tuple[int, Node, int]] = []
    fingerprint = LayoutFingerprint(chunk_indexes=options.chunk_indexes)

    def stored(block: int, node: Node, number: int) -> None:
        fingerprint.stored(block, node, number)
        if block in wanted:
            owners.append((block, node, number))

    image_size = place_blocks(source, options, stored)
    layer = layer_for_layout(prefetch, image_size, fingerprint.finish(image_size), where)
    return in_order(layer.blocks, owners)


def startup_prefetch(chunk_digest: str, chunk_count: int, chunk_size: int,
                     startup_end: int) -> LayerPrefetch:
    """The prefetch list a layer written in start-up order carries: its chunks from the first
    to the one that holds the last start-up block (the metadata, then those blocks)."""
    last = min(chunk_count, -(-startup_end // chunk_size))
    return LayerPrefetch(chunk_digest, chunk_count, tuple(range(last)))


__all__ = [
    "LayoutMismatchError",
    "NoStartupOrderError",
    "StartupBlocks",
    "in_order",
    "layer_for_layout",
    "layer_for_size",
    "recorded_layers",
    "startup_by_replay",
    "startup_from_image",
    "startup_prefetch",
]
