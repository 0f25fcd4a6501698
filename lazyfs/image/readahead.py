"""When a layer's reads stream, so that the chunks after them are worth loading early."""

from __future__ import annotations

TRIGGER_BYTES = 1024 * 1024
STREAK_CHUNKS = 2


class SequentialReads:
    """Watches one layer's reads: they stream once `min(chunk size, TRIGGER_BYTES)` bytes were
    read back to back (a file read in order, not two small files that happen to share a
    chunk), or once reads moved on chunk by chunk over TRIGGER_BYTES (at least STREAK_CHUNKS
    steps): a walk through many small files laid out one after another streams as much as
    one big file does, though no two of its reads touch."""

    def __init__(self, chunk_size: int, chunk_count: int) -> None:
        self._chunk_count = chunk_count
        self._trigger_bytes = min(chunk_size, TRIGGER_BYTES)
        self._streak_trigger = max(STREAK_CHUNKS, TRIGGER_BYTES // chunk_size)
        self._last_end = -1
        self._sequential_bytes = 0
        self._last_chunk = -2  # no read yet: a first read of chunk 0 is no step forward
        self._streak = 0

    def observe(self, offset: int, end: int, chunks: range) -> bool:
        """Note a read of bytes [offset, end) in `chunks`; whether reads now stream."""
        if offset == self._last_end:
            self._sequential_bytes += end - offset
        else:
            self._sequential_bytes = end - offset
        self._last_end = end
        if chunks[0] == self._last_chunk + 1:
            self._streak += 1
        elif chunks[0] != self._last_chunk:
            self._streak = 0
        self._last_chunk = chunks[-1]
        return (self._sequential_bytes >= self._trigger_bytes
                or self._streak >= self._streak_trigger)

    def ahead(self, offset: int, end: int, chunks: range, readahead: int) -> range:
        """Note a read (as `observe`); the `readahead` chunks after it once reads stream."""
        if not self.observe(offset, end, chunks) or not readahead:
            return range(0)
        return range(chunks[-1] + 1, min(chunks[-1] + readahead + 1, self._chunk_count))
