"""The eager baseline to lazy mounting: download each layer blob whole, check its digest,
and decompress it into the raw EROFS image that the kernel then mounts directly.

Blobs are downloaded a few at a time, like a container engine's pull, and each is
decompressed (in a worker thread) as soon as it is complete, while the others still
download. A seekable EROFS blob is a concatenation of zstd frames followed by skippable
metadata frames, so a plain streaming decompression of the whole blob is the raw image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
import zstandard

from lazyfs.exception_groups import first_error
from lazyfs.fetch.registry import RegistryClient
from lazyfs.layer.errors import LayerOpenError
from lazyfs.oci.registry_source import ImageLayer

PARALLEL_DOWNLOADS = 3
_IO_BYTES = 1 << 20


@dataclass(frozen=True)
class PulledLayer:
    """One downloaded and decompressed layer."""

    name: str
    digest: str
    blob_size: int
    image_file: Path
    image_size: int
    download_s: float
    decompress_s: float


def decompress_blob(blob: Path, image: Path) -> int:
    """Decompress every zstd frame of `blob` into the new file `image` (skippable frames are
    skipped). Returns the image size. Raises zstandard.ZstdError, OSError."""
    decompressor = zstandard.ZstdDecompressor()
    with open(blob, "rb") as source, open(image, "xb") as target:
        _, written = decompressor.copy_stream(
            source, target, read_size=_IO_BYTES, write_size=_IO_BYTES
        )
    return int(written)


async def pull_layers(
    client: RegistryClient,
    repository: str,
    layers: Sequence[ImageLayer],
    directory: Path,
    *,
    parallel: int = PARALLEL_DOWNLOADS,
) -> list[PulledLayer]:
    """Download (digest and size checked) and decompress `layers` into `directory`; the blobs
    are deleted once decompressed. Returns them in the order given. Raises RegistryError
    subclasses, LayerOpenError (a blob that does not decompress), OSError."""
    downloads = trio.CapacityLimiter(max(1, parallel))
    decoders = trio.CapacityLimiter(2)
    pulled: dict[str, PulledLayer] = {}

    async def pull(layer: ImageLayer) -> None:
        hex_digest = layer.digest.partition(":")[2]
        blob = directory / f"{hex_digest}.blob"
        image = directory / f"{hex_digest}.erofs"
        async with downloads:
            started = time.monotonic()
            await client.download_blob(repository, layer.digest, blob, size=layer.size)
            downloaded = time.monotonic()
        try:
            size = await trio.to_thread.run_sync(decompress_blob, blob, image, limiter=decoders)
        except zstandard.ZstdError as exc:
            raise LayerOpenError(f"layer {layer.digest}: not a zstd stream: {exc}") from None
        finally:
            blob.unlink(missing_ok=True)
        pulled[layer.digest] = PulledLayer(
            layer.name,
            layer.digest,
            layer.size,
            image,
            size,
            downloaded - started,
            time.monotonic() - downloaded,
        )

    try:
        async with trio.open_nursery() as nursery:
            for layer in layers:
                nursery.start_soon(pull, layer)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return [pulled[layer.digest] for layer in layers]

