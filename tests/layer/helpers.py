"""Blobs for image-layer tests, written by the real encoder from deterministic bytes, and
a way to open one as a layer and read it."""

from __future__ import annotations

import io
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from converter.encoder import EncodeOptions, EncodeResult, encode_image
from lazyfs.cache.disk import DiskCache, DiskCacheOptions
from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.local import LocalFileReader
from lazyfs.format.descriptor import Descriptor, serialize_descriptor
from lazyfs.format.verity_tree import verify_hash_blocks
from lazyfs.layer.disk_tier import LayerDisk
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.stats import TraceWriter
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.metadata import load_metadata
from lazyfs.startup.open import LayerSource, open_layer, resolve_annotations


def make_image_bytes(size: int, seed: int = 1) -> bytes:
    """Half compressible text-like bytes, half random, so frames differ in size."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij ") for _ in range(7)) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += b"".join(rng.choice(words) for _ in range(512))
        else:
            out += rng.randbytes(4096)
    return bytes(out[:size])


def write_blob(directory: Path, image: bytes, name: str = "layer", **options: object) -> tuple[
    Path, EncodeResult
]:
    """Encode `image` to `directory/NAME.blob` with its descriptor beside it."""
    blob_path = directory / f"{name}.blob"
    with open(blob_path, "wb") as out:
        result = encode_image(io.BytesIO(image), len(image), out,
                              EncodeOptions(**options))  # type: ignore[arg-type]
    descriptor = Descriptor(result.media_type, result.blob_digest, result.blob_size,
                            annotations=result.annotations.to_annotations())
    (directory / f"{name}.descriptor.json").write_text(serialize_descriptor(descriptor))
    return blob_path, result


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    """XOR the byte of `path` at `offset` with `mask`, in place."""
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ mask]))


def run_with_layer(
    source: LayerSource, body: Callable[[RemoteImage], Awaitable[Any]],
    cache_bytes: int = 64 << 20, *, tuning: ImageTuning | None = None,
    trace: TraceWriter | None = None, disk: DiskCacheOptions | None = None,
) -> Any:
    """Open `source` in a nursery (with the disk cache `disk` if given), run `body(image)`,
    let the disk cache's writes finish, close everything; return body's result."""
    result = []

    async def main() -> None:
        store = DiskCache.open(disk) if disk is not None else None
        try:
            async with trio.open_nursery() as nursery:
                image = await open_layer(source, cache=ChunkCache(cache_bytes), nursery=nursery,
                                         tuning=tuning, trace=trace, disk=store)
                try:
                    result.append(await body(image))
                    if image.disk is not None:  # as a daemon does at unmount
                        with trio.move_on_after(10):
                            await image.disk.writes_done()
                finally:
                    await image.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            if store is not None:
                await store.aclose()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # One failure inside the nursery: raise it as itself, as the CLI reports it.
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None
    return result[0]


async def open_with_level0_on_demand(source: LayerSource, disk: DiskCache,
                                     nursery: trio.Nursery,
                                     tuning: ImageTuning | None = None) -> RemoteImage:
    """Open `source` (a local blob with a two-level tree and its descriptor beside it) as a
    layer whose tree is too large to fetch whole at open: only the levels above level 0 are
    loaded, level-0 blocks come on demand (and from the disk cache `disk`)."""
    annotations, _ = await resolve_annotations(source)
    async with LocalFileReader(source.blob) as setup:  # not the layer's: it counts requests
        metadata = (await load_metadata(setup, annotations, 0)).metadata
        geometry = metadata.verity
        assert geometry is not None and metadata.root is not None
        assert len(geometry.levels) == 2
        top = geometry.levels[1].payload_offset
        block = await setup.read(metadata.verity_payload_offset + top,
                                 geometry.superblock.hash_block_size)
    verify_hash_blocks(geometry, {top: block}, metadata.root, set())
    layer = LayerDisk(disk, metadata, "layer", nursery, kept_blocks={top})
    image = RemoteImage("layer", LocalFileReader(source.blob), metadata, ChunkCache(1 << 20),
                        nursery, tuning=tuning, disk=layer)
    assert image.hash_blocks is not None
    image.hash_blocks.adopt({top: block})
    return image
