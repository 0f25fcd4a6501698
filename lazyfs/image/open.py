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
from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import BlobReader, ReaderOptions
from lazyfs.fetch.body import BodyTooLargeError
from lazyfs.fetch.errors import FetchError
from lazyfs.fetch.http import get_small
from lazyfs.fetch.local import open_blob_reader
from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    ANNOTATION_CHUNK_TABLE_OFFSET,
    ANNOTATION_ROOT_DIGEST,
    ANNOTATION_VERITY_OFFSET,
    Descriptor,
    DescriptorError,
    SeekableAnnotations,
    descriptor_path_candidates,
    parse_annotations,
    parse_descriptor,
)
from lazyfs.format.descriptor import DESCRIPTOR_SUFFIX as DESCRIPTOR_SUFFIX  # re-exported
from lazyfs.format.errors import IntegrityError
from lazyfs.format.layout import (
    VERITY_HEAD_SIZE,
    BlobMetadata,
    check_annotations_fit,
    metadata_frame_end,
    parse_metadata,
)
from lazyfs.format.prefetch_list import LayerPrefetch
from lazyfs.format.verity_tree import VerityGeometry, verify_hash_blocks
from lazyfs.image import disk_tier
from lazyfs.image.errors import LayerOpenError, UntrustedLayerError
from lazyfs.image.keys import layer_key
from lazyfs.image.remote_image import RemoteImage
from lazyfs.image.stats import TraceWriter
from lazyfs.image.tuning import ImageTuning

log = logging.getLogger(__name__)

MAX_DESCRIPTOR_BYTES = 1024 * 1024
MAX_CHUNK_TABLE_FRAME = 64 * 1024 * 1024
# Trees up to this size are fetched whole at open; larger ones keep level 0 on demand.
WHOLE_TREE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class LayerSource:
    """One layer as the user named it. `reader_options` reach the blob and a descriptor
    beside it; their `expected_size` is the blob size a manifest promises (a descriptor
    found for the blob promises its own). `prefetch` is the prefetch list an image carries
    for the layer (checked against the layer's chunk digest before use)."""

    blob: str
    descriptor: str | None = None
    chunk_table_offset: int | None = None
    chunk_digest: str | None = None
    verity_offset: int | None = None
    root_digest: str | None = None
    insecure: bool = False
    name: str | None = None
    reader_options: ReaderOptions = field(default_factory=ReaderOptions)
    prefetch: LayerPrefetch | None = None

    @property
    def has_overrides(self) -> bool:
        return self.chunk_table_offset is not None


def descriptor_candidates(blob: str) -> list[str]:
    """Where a descriptor is looked for next to `blob` (a URL's query dropped), in order."""
    return descriptor_path_candidates(blob.partition("?")[0])


async def _read_text(location: str, options: ReaderOptions,
                     disk: DiskCache | None = None) -> bytes | None:
    """Read a small descriptor from a path or URL; None if it does not exist. A URL is fetched
    with the deadline and retries of range reads; when it fails, the copy `disk` kept from
    the last fetch stands in. Raises DescriptorError, FetchError."""
    if "://" in location and not location.startswith("file://"):
        try:
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


async def resolve_annotations(source: LayerSource, disk: DiskCache | None = None,
                              ) -> tuple[SeekableAnnotations, Descriptor | None]:
    """Find the annotations for `source` (descriptors fetched before kept on `disk`). Raises
    LayerOpenError, DescriptorError, FetchError."""
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
    tried = [source.descriptor] if source.descriptor else descriptor_candidates(source.blob)
    for location in tried:
        text = await _read_text(location, source.reader_options, disk)
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


async def load_metadata(reader: BlobReader, annotations: SeekableAnnotations,
                        blob_size: int) -> BlobMetadata:
    """Fetch the chunk table and verity superblock (one request when they are adjacent)."""
    check_annotations_fit(annotations, blob_size)
    table_offset = annotations.chunk_table_offset
    table_end = metadata_frame_end(annotations, table_offset, blob_size)
    if table_end - table_offset > MAX_CHUNK_TABLE_FRAME:
        table_end = table_offset + MAX_CHUNK_TABLE_FRAME
    ranges = [(table_offset, table_end)]
    if annotations.verity_offset is not None:
        verity_end = min(annotations.verity_offset + VERITY_HEAD_SIZE, blob_size)
        ranges.append((annotations.verity_offset, verity_end))
    ranges.sort()
    spans: list[tuple[int, int]] = []
    for start, end in ranges:
        if spans and start <= spans[-1][1] + 65536:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    fetched = {start: await reader.read(start, end - start) for start, end in spans}

    def slice_from(offset: int) -> bytes:
        for start, data in fetched.items():
            if start <= offset < start + len(data):
                return data[offset - start:]
        return b""

    verity_head = (slice_from(annotations.verity_offset)
                   if annotations.verity_offset is not None else None)
    return await trio.to_thread.run_sync(
        parse_metadata, annotations, blob_size, slice_from(table_offset), verity_head)


async def load_tree_top(reader: BlobReader, metadata: BlobMetadata) -> dict[int, bytes]:
    """Fetch and authenticate the upper tree levels (and level 0 too when the tree is small).

    The upper levels must verify, or nothing can be: that raises IntegrityError. A level-0
    block that fails is left out, so only the chunks it covers fail (with EIO) when read.
    """
    geometry = metadata.verity
    if geometry is None or metadata.root is None or not geometry.levels:
        return {}
    block_size = geometry.superblock.hash_block_size
    level0 = geometry.levels[0]
    upper_end = level0.payload_offset
    if geometry.tree_size <= WHOLE_TREE_BYTES:
        upper_end = level0.payload_offset + level0.block_count * block_size
    if upper_end <= geometry.tree_offset:
        return {}
    span = await reader.read(metadata.verity_payload_offset + geometry.tree_offset,
                             upper_end - geometry.tree_offset)
    blocks = {
        geometry.tree_offset + position: span[position:position + block_size]
        for position in range(0, len(span), block_size)
    }
    return await trio.to_thread.run_sync(_verify_tree_top, geometry, blocks, metadata.root)


def _verify_tree_top(geometry: VerityGeometry, blocks: dict[int, bytes],
                     root: bytes) -> dict[int, bytes]:
    level0_start = geometry.levels[0].payload_offset
    upper = {offset: block for offset, block in blocks.items() if offset < level0_start}
    trusted = verify_hash_blocks(geometry, upper, root, set())
    upper_verified = {offset: upper[offset] for offset in trusted}
    verified = dict(upper_verified)
    for offset, block in blocks.items():
        if offset < level0_start:
            continue
        try:
            # Each level-0 block is checked against its (verified) parent only.
            verify_hash_blocks(geometry, {**upper_verified, offset: block}, root, trusted)
        except IntegrityError as exc:
            log.warning("dm-verity level-0 block at payload offset %d does not verify; the "
                        "chunks it covers will fail: %s", offset, exc)
            continue
        verified[offset] = block
    return verified


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
    from the metadata it holds when it does (no request), else fetched and then kept there.

    Raises LayerOpenError, FormatError (incl. IntegrityError) or FetchError.
    """
    annotations, descriptor = await resolve_annotations(source, disk)
    _check_trust(source, annotations)
    options = source.reader_options
    if descriptor is not None:
        options = replace(options, expected_size=descriptor.size)
    cpu_limiter = cpu_limiter or trio.CapacityLimiter(2)
    if disk is not None and layer_key(annotations) is None:
        disk = None  # nothing would authenticate it when read back
    cached = None
    if disk is not None:
        cached = await disk_tier.load_metadata(disk, annotations, options.expected_size,
                                               cpu_limiter)
    if cached is not None and options.expected_size is None:
        options = replace(options, expected_size=cached.metadata.blob_size)
    reader = open_blob_reader(source.blob, options)
    name = source.name or os.path.basename(source.blob.partition("?")[0]) or "layer"
    try:
        if cached is not None:
            metadata, tree_blocks = cached.metadata, cached.tree_blocks
            _check_data_trust(source, annotations, metadata)
        else:
            blob_size = await reader.open()
            metadata = await load_metadata(reader, annotations, blob_size)
            _check_data_trust(source, annotations, metadata)
            tree_blocks = await load_tree_top(reader, metadata)
        layer_disk = None
        if disk is not None:
            layer_disk = disk_tier.LayerDisk(
                disk, metadata, name, nursery, kept_blocks=set(tree_blocks),
                probe=lambda: _probe(source.blob, options), source_known_up=cached is None)
            if cached is None:
                layer_disk.save_metadata(tree_blocks, reader.source)
            else:
                layer_disk.register(reader.source)
        return RemoteImage(name, reader, metadata, cache, nursery, tree_blocks=tree_blocks,
                           cpu_limiter=cpu_limiter, trace=trace, tuning=tuning,
                           disk=layer_disk)
    except BaseException:
        await reader.aclose()
        raise


async def _probe(blob: str, options: ReaderOptions) -> None:
    """Ask the source of a layer opened from the disk cache once whether it answers (and
    still has the blob). Raises FetchError."""
    reader = open_blob_reader(blob, replace(options, max_retries=0))
    try:
        await reader.open()
    finally:
        await reader.aclose()
