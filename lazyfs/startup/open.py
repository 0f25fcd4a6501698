"""Turn what the user named (a blob URL or path, and a descriptor) into a RemoteImage.

The descriptor is the root of trust. It comes from `--descriptor FILE|URL`, from explicit
annotation values, or by convention from beside the blob: for `NAME.blob` the file
`NAME.descriptor.json`, else `BLOB.descriptor.json` (what `lazyfs convert` writes). Without a
digest that authenticates the metadata, mounting is refused unless `insecure` is set.

With a disk cache, a layer whose metadata it holds opens without a request (`disk_tier`), and
a descriptor URL that does not answer is replaced by the descriptor last fetched from it, so
that a layer can be mounted again while its server is unreachable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import trio

from lazyfs.cache.disk import DiskCache
from lazyfs.cache.keys import layer_key
from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import BlobReader, ReaderOptions
from lazyfs.fetch.errors import BlobChangedError, FetchError
from lazyfs.fetch.primed import PrimedAnswers
from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    ANNOTATION_CHUNK_TABLE_OFFSET,
    ANNOTATION_ROOT_DIGEST,
    ANNOTATION_VERITY_OFFSET,
    Descriptor,
    DescriptorError,
    SeekableAnnotations,
    descriptor_locations,
    parse_annotations,
    parse_descriptor,
)
from lazyfs.format.descriptor import DESCRIPTOR_SUFFIX as DESCRIPTOR_SUFFIX  # re-exported
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.prefetch_list import LayerPrefetch
from lazyfs.layer import disk_tier
from lazyfs.layer.errors import LayerOpenError, UntrustedLayerError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.stats import TraceWriter
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.metadata import load_metadata

log = logging.getLogger(__name__)

MAX_DESCRIPTOR_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AlternateBlob:
    """Another place serving the same blob (a registry behind its mirror), with its own
    reader options; tried after a failed fetch and for refetches after a failed check."""

    blob: str
    reader_options: ReaderOptions = field(default_factory=ReaderOptions)


@dataclass(frozen=True)
class LayerSource:
    """One layer as the user named it. `reader_options` reach the blob and a descriptor
    beside it; their `expected_size` is the blob size a manifest promises (a descriptor
    found for the blob promises its own). `alternates` serve the same blob elsewhere.
    `prefetch` is the prefetch list an image carries for the layer (checked against the
    layer's chunk digest before use)."""

    blob: str
    descriptor: str | None = None
    chunk_table_offset: int | None = None
    chunk_digest: str | None = None
    verity_offset: int | None = None
    root_digest: str | None = None
    insecure: bool = False
    name: str | None = None
    reader_options: ReaderOptions = field(default_factory=ReaderOptions)
    alternates: tuple[AlternateBlob, ...] = ()
    prefetch: LayerPrefetch | None = None
    # Answers a head start of the command fetched for the blob (`lazyfs.startup.head_start`).
    primed: PrimedAnswers | None = field(default=None, compare=False, repr=False)

    @property
    def has_overrides(self) -> bool:
        return self.chunk_table_offset is not None


async def _read_text(location: str, options: ReaderOptions, reader: BlobReader | None = None,
                     disk: DiskCache | None = None) -> bytes | None:
    """Read a small descriptor from a path or URL; None if it does not exist. A URL is fetched
    with the deadline and retries of range reads, through the connections of the blob's
    `reader` when it has them; when it fails, the copy `disk` kept from the last fetch stands
    in. Raises DescriptorError, FetchError."""
    if "://" in location and not location.startswith("file://"):
        # httpx is imported when a layer is opened, not by everything that names a source.
        from lazyfs.fetch.body import BodyTooLargeError
        from lazyfs.fetch.http import HttpRangeReader, get_small

        try:
            if isinstance(reader, HttpRangeReader):
                text = await reader.get_small(location, MAX_DESCRIPTOR_BYTES)
            else:
                text = await get_small(location, MAX_DESCRIPTOR_BYTES, options)
        except BodyTooLargeError:
            raise DescriptorError(f"{location}: descriptor larger than 1 MiB") from None
        except FetchError as exc:
            kept = await disk_tier.remembered_descriptor(disk, location) if disk else None
            if kept is None:
                raise FetchError(f"cannot fetch descriptor: {exc}") from None
            log.warning("%s; using the descriptor the disk cache kept from it", exc)
            return kept
        if text is not None and disk is not None:
            await disk_tier.remember_descriptor(disk, location, text)
        return text
    path = location.removeprefix("file://")

    def load() -> bytes | None:
        try:
            if os.path.getsize(path) > MAX_DESCRIPTOR_BYTES:
                raise DescriptorError(f"{path}: descriptor larger than 1 MiB")
            with open(path, "rb") as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    return await trio.to_thread.run_sync(load)


async def resolve_annotations(
    source: LayerSource, reader: BlobReader | None = None, disk: DiskCache | None = None,
) -> tuple[SeekableAnnotations, Descriptor | None]:
    """Find the annotations for `source` (a descriptor URL is read through `reader`'s
    connections; descriptors fetched before are kept on `disk`). Raises LayerOpenError,
    DescriptorError, FetchError."""
    if source.has_overrides:
        values = {ANNOTATION_CHUNK_TABLE_OFFSET: str(source.chunk_table_offset)}
        for key, value in ((ANNOTATION_CHUNK_DIGEST, source.chunk_digest),
                           (ANNOTATION_VERITY_OFFSET, source.verity_offset),
                           (ANNOTATION_ROOT_DIGEST, source.root_digest)):
            if value is not None:
                values[key] = str(value)
        return parse_annotations(values, "command-line annotations"), None
    if any(value is not None for value in (source.chunk_digest, source.verity_offset,
                                           source.root_digest)):
        raise LayerOpenError("--chunk-digest, --verity-offset and --root-digest need "
                             "--chunk-table-offset too")
    tried = descriptor_locations(source.blob, source.descriptor)
    for location in tried:
        text = await _read_text(location, source.reader_options, reader, disk)
        if text is None:
            continue
        descriptor = parse_descriptor(text, location)
        return descriptor.seekable(location), descriptor
    raise LayerOpenError(
        f"{source.blob}: no descriptor found (tried {', '.join(tried)}); give --descriptor "
        "FILE|URL or --chunk-table-offset/--chunk-digest/--verity-offset/--root-digest"
    )


def _check_trust(source: LayerSource, annotations: SeekableAnnotations) -> None:
    if annotations.is_trusted:
        return
    missing = []
    if annotations.chunk_digest is None:
        missing.append("chunk table digest")
    if annotations.verity_offset is not None and annotations.root_digest is None:
        missing.append("dm-verity root digest")
    if source.insecure:
        log.warning("%s: mounting without a %s: its bytes are NOT authenticated (--insecure)",
                    source.blob, " or ".join(missing))
        return
    raise UntrustedLayerError(
        f"{source.blob}: refusing to mount: no {' or '.join(missing)} to authenticate the "
        "layer (give a descriptor that has it, or --insecure to mount unverified data)"
    )


def _check_data_trust(source: LayerSource, annotations: SeekableAnnotations,
                      metadata: BlobMetadata) -> None:
    """Refuse a layer whose chunk table lists no frame hashes when no dm-verity root
    authenticates its data either: a trusted table then vouches for no byte."""
    if metadata.table.hash_algorithm != HASH_NONE or metadata.root is not None:
        return
    if source.insecure:
        if annotations.is_trusted:  # otherwise _check_trust has warned already
            log.warning("%s: its chunk table lists no frame hashes and it has no dm-verity "
                        "root: its bytes are NOT authenticated (--insecure)", source.blob)
        return
    raise UntrustedLayerError(
        f"{source.blob}: refusing to mount: its chunk table lists no frame hashes and no "
        "dm-verity root digest authenticates its data (give --insecure to mount unverified "
        "data)"
    )


async def open_layer(
    source: LayerSource,
    *,
    cache: ChunkCache,
    nursery: trio.Nursery,
    tuning: ImageTuning | None = None,
    trace: TraceWriter | None = None,
    cpu_limiter: trio.CapacityLimiter | None = None,
    disk: DiskCache | None = None,
) -> RemoteImage:
    """Open, authenticate and return the layer `source` names, ready for reads; with `disk`,
    from the metadata it holds when it does (no request), else fetched (one range request:
    chunk table, dm-verity superblock, top of the tree) and then kept there.

    Raises LayerOpenError, FormatError (incl. IntegrityError) or FetchError.
    """
    from lazyfs.fetch.local import open_blob_reader

    tuning = tuning or ImageTuning()
    cpu_limiter = cpu_limiter or trio.CapacityLimiter(2)
    # One reader from the start: a descriptor beside the blob, the metadata and the first
    # frames share its connections.
    reader = open_blob_reader(source.blob, source.reader_options, source.primed)
    name = source.name or os.path.basename(source.blob.partition("?")[0]) or "layer"
    try:
        annotations, descriptor = await resolve_annotations(source, reader, disk)
        _check_trust(source, annotations)
        if descriptor is not None:
            reader.expect_size(descriptor.size)
        if disk is not None and layer_key(annotations) is None:
            disk = None  # nothing would authenticate it when read back
        cached = None
        if disk is not None:
            cached = await disk_tier.load_metadata(disk, annotations, reader.size, cpu_limiter)
        if cached is not None:
            reader.expect_size(cached.metadata.blob_size)
            metadata = cached.metadata
        else:
            loaded = await load_metadata(reader, annotations, tuning.verity_window_bytes)
            metadata = loaded.metadata
        _check_data_trust(source, annotations, metadata)
        layer_disk = None
        # The hash blocks the metadata entry holds: LayerDisk keeps this very set, which the
        # top of the tree joins once verified below.
        kept_blocks = set(cached.tree_blocks) if cached is not None else set()
        if disk is not None:
            layer_disk = disk_tier.LayerDisk(disk, metadata, name, nursery,
                                             kept_blocks=kept_blocks)
        # Opened on first use, with the size the first one was seen to have.
        alternates = [
            open_blob_reader(alternate.blob, replace(alternate.reader_options,
                                                     expected_size=metadata.blob_size))
            for alternate in source.alternates
        ]
        blob_size = metadata.blob_size
        image = RemoteImage(name, reader, metadata, cache, nursery, cpu_limiter=cpu_limiter,
                            trace=trace, tuning=tuning, alternates=alternates,
                            disk=layer_disk,
                            source_probe=(None if cached is None else lambda: _probe(
                                source.blob, source.reader_options, blob_size)))
        if image.hash_blocks is not None:
            if cached is not None:
                image.hash_blocks.adopt(cached.tree_blocks)
            else:
                await image.hash_blocks.add_window(0, loaded.verity_payload)
        if layer_disk is not None:
            if cached is None:
                tree_blocks = image.hash_blocks.known() if image.hash_blocks else {}
                kept_blocks.update(tree_blocks)
                layer_disk.save_metadata(tree_blocks, reader.source)
            else:
                layer_disk.register(reader.source)
        return image
    except BaseException:
        await reader.aclose()
        raise


async def _probe(blob: str, options: ReaderOptions, blob_size: int) -> None:
    """Ask the source of a layer opened from the disk cache once whether it answers (and
    still has the blob, of `blob_size` bytes). Raises FetchError."""
    from lazyfs.fetch.local import open_blob_reader

    # No promised size: a reader would trust it and ask nothing.
    reader = open_blob_reader(blob, replace(options, max_retries=0, expected_size=None))
    try:
        size = await reader.open()
    finally:
        await reader.aclose()
    if size != blob_size:
        raise BlobChangedError(f"{reader.source}: blob is {size} bytes, expected {blob_size}")
