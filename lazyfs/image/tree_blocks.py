"""The verified dm-verity hash blocks of one layer, fetched when a load first needs them.

At open the top of the tree (all of it when it is small) arrives with the metadata. A load
fetches the hash blocks that cover its chunks and are not yet verified, alongside the frames,
and authenticates them against those verified already, up to the root; only then are they
kept, and data blocks checked against them. They are kept for the mount's life: at most the
tree, 1/64 of the image with sha512 digests and 4 KiB blocks.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from lazyfs.fetch.base import BlobReader
from lazyfs.format.errors import FormatError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import hash_blocks_needed, verify_hash_blocks
from lazyfs.image.stats import ImageStats


class TreeBlocks:
    """`verified`: the hash blocks that matched the root, keyed by verity payload offset."""

    def __init__(self, metadata: BlobMetadata, stats: ImageStats,
                 cpu_limiter: trio.CapacityLimiter,
                 verified: Mapping[int, bytes] | None = None) -> None:
        self.metadata = metadata
        self.stats = stats
        self._cpu_limiter = cpu_limiter
        self.verified: dict[int, bytes] = dict(verified or {})

    def needed(self, run: list[int]) -> list[int]:
        """Payload offsets of the hash blocks (all levels, top first) that cover `run`."""
        geometry = self.metadata.verity
        if geometry is None or self.metadata.root is None or not geometry.levels:
            return []
        table = self.metadata.table
        block_size = geometry.superblock.data_block_size
        first_block = run[0] * table.chunk_size // block_size
        last_byte = min((run[-1] + 1) * table.chunk_size, self.metadata.image_size)
        count = -(-last_byte // block_size) - first_block
        return hash_blocks_needed(geometry, first_block, count)

    def for_chunk(self, chunk_index: int) -> dict[int, bytes]:
        """A private copy of the verified blocks for one chunk: worker threads share no state."""
        return {offset: self.verified[offset]
                for offset in self.needed([chunk_index])
                if offset in self.verified}

    async def ensure(self, reader: BlobReader, run: list[int],
                     failures: dict[int, str]) -> None:
        """Fetch and authenticate the hash blocks covering `run` that are not yet verified.

        For a run of several chunks, those whose blocks do not verify are put in `failures`
        (index: reason) and the others stay usable; for a single chunk, raises IntegrityError.
        Raises FetchError.
        """
        needed = self.needed(run)
        missing = [offset for offset in needed if offset not in self.verified]
        if not missing:
            return
        geometry = self.metadata.verity
        assert geometry is not None and self.metadata.root is not None
        hash_block_size = geometry.superblock.hash_block_size
        fetched: dict[int, bytes] = {}
        for group in contiguous(missing, hash_block_size):
            span = await reader.read(self.metadata.verity_payload_offset + group[0],
                                     len(group) * hash_block_size)
            self.stats.tree_blocks_fetched += len(group)
            for position, offset in enumerate(group):
                fetched[offset] = span[position * hash_block_size:
                                       (position + 1) * hash_block_size]
        known = {offset: self.verified[offset] for offset in needed
                 if offset in self.verified}
        candidates = {**known, **fetched}
        root = self.metadata.root
        try:
            newly = await trio.to_thread.run_sync(
                verify_hash_blocks, geometry, candidates, root, set(known),
                limiter=self._cpu_limiter,
            )
        except FormatError:
            if len(run) == 1:
                raise
            # One bad block must not condemn the chunks of the run it does not cover.
            newly = set()
            for index in run:
                own = {offset: candidates[offset] for offset in self.needed([index])}
                try:
                    newly |= await trio.to_thread.run_sync(
                        verify_hash_blocks, geometry, own, root, set(known),
                        limiter=self._cpu_limiter,
                    )
                except FormatError as exc:
                    failures[index] = str(exc)
        for offset in newly:
            self.verified[offset] = candidates[offset]


def contiguous(offsets: list[int], step: int) -> list[list[int]]:
    """`offsets` sorted, in groups where each is `step` after the one before."""
    groups: list[list[int]] = []
    for offset in sorted(offsets):
        if groups and groups[-1][-1] + step == offset:
            groups[-1].append(offset)
        else:
            groups.append([offset])
    return groups
