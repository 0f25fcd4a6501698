"""The checks a fetched chunk passes before its bytes are used, as functions for worker
threads: bytes in, bytes out, no shared state.

1. `decode_frame`: the frame's SHA-512 against the authenticated chunk table, then an exact
   decode (the decoded size must be the chunk's).
2. `check_blocks`: every dm-verity data block that overlaps the chunk against the
   authenticated level-0 hash blocks. When the chunk size is not a multiple of the data
   block size, the first and last blocks straddle into the neighbouring chunks: their other
   part is taken from the neighbours' decoded bytes (`before`, `after`), so a straddling
   block is verified across both chunks and authenticates both parts.
"""

from __future__ import annotations

from collections.abc import Mapping

from lazyfs.format.chunk_table import verify_frame
from lazyfs.format.frames import decode_chunk_frame
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import verify_data_blocks


def decode_frame(metadata: BlobMetadata, chunk_index: int, frame: bytes,
                 frame_offset: int) -> bytes:
    """The decoded chunk of a frame whose digest matches. Raises IntegrityError /
    FrameDecodeError naming the chunk and offsets."""
    table = metadata.table
    verify_frame(table, chunk_index, frame, frame_offset)
    return decode_chunk_frame(frame, table.decoded_size(chunk_index), chunk_index, frame_offset)


def block_context(metadata: BlobMetadata, chunk_index: int) -> range:
    """The chunks whose bytes the dm-verity data blocks overlapping `chunk_index` cover: the
    chunk itself, and neighbours where its first or last block straddles into them (more
    than one on a side when chunks are smaller than blocks). Just the chunk without a
    dm-verity root, or when chunks are whole blocks."""
    geometry = metadata.verity
    if geometry is None or metadata.root is None:
        return range(chunk_index, chunk_index + 1)
    block_size = geometry.superblock.data_block_size
    chunk_size = metadata.table.chunk_size
    start = chunk_index * chunk_size
    end = min(start + chunk_size, metadata.image_size)
    low = start - start % block_size
    high = min(-(-end // block_size) * block_size, metadata.image_size)
    return range(low // chunk_size, (high - 1) // chunk_size + 1)


def check_blocks(metadata: BlobMetadata, tree_blocks: Mapping[int, bytes], chunk_index: int,
                 data: bytes, before: bytes = b"", after: bytes = b"") -> None:
    """Verify every data block overlapping the decoded chunk `data` against `tree_blocks`
    (authenticated level-0 blocks). `before` must end with the bytes of the chunks before it
    that share its first block, `after` begin with those of the chunks after it that share
    its last block (see `block_context`). No-op without a dm-verity root.

    Raises IntegrityError naming the first data block that fails and its image offset,
    ValueError when a needed neighbour is missing."""
    geometry = metadata.verity
    if geometry is None or metadata.root is None:
        return
    block_size = geometry.superblock.data_block_size
    start = chunk_index * metadata.table.chunk_size
    first_block = start // block_size
    lead = start - first_block * block_size
    end = start + len(data)
    trail = min(-(-end // block_size) * block_size, metadata.image_size) - end
    if len(before) < lead or len(after) < trail:
        raise ValueError(f"chunk {chunk_index}: its first or last dm-verity block straddles "
                         "into a neighbouring chunk whose bytes were not given")
    if lead or trail:
        data = before[len(before) - lead:] + data + after[:trail]
    verify_data_blocks(geometry, first_block, data, tree_blocks, metadata.root)
