"""When a layer's reads stream, so that the chunks after them are worth loading early, and how
far ahead: a window that grows while they go on."""

from __future__ import annotations

TRIGGER_BYTES = 1024 * 1024
STREAK_CHUNKS = 2


class SequentialReads:
    """Watches one layer's reads: they stream once `min(chunk size, TRIGGER_BYTES)` bytes were
    read back to back (a file read in order, not two small files that happen to share a
    chunk), or once reads moved on chunk by chunk over TRIGGER_BYTES (at least STREAK_CHUNKS
    steps): a walk through many small files laid out one after another streams as much as
    one big file does, though no two of its reads touch.

    While they stream, the chunks within a window after the last read are loaded; the window
    starts at the readahead distance, and doubles each time it is topped up (the reads went on
    through half of it) up to a largest distance, as the kernel grows its own readahead: a
    long read in order then asks for large requests, a few in flight, instead of a chunk per
    read. It grows only while one run of bytes read back to back is at least twice the first
    window: a start-up walking through many files laid out one after another streams too,
    but each of its reads wants little past it, and a growing window would fetch what it never
    reads. A read that does not stream starts it over."""

    def __init__(self, chunk_size: int, chunk_count: int) -> None:
        self._chunk_size = chunk_size
        self._chunk_count = chunk_count
        self._trigger_bytes = min(chunk_size, TRIGGER_BYTES)
        self._streak_trigger = max(STREAK_CHUNKS, TRIGGER_BYTES // chunk_size)
        self._last_end = -1
        self._sequential_bytes = 0
        self._last_chunk = -2  # no read yet: a first read of chunk 0 is no step forward
        self._streak = 0
        self._window = 0  # chunks; 0: the readahead distance (reads do not stream yet)
        self._first_window = 0  # chunks: the readahead distance the window started at

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
        streaming = (self._sequential_bytes >= self._trigger_bytes
                     or self._streak >= self._streak_trigger)
        if not streaming:
            self._window = 0
        return streaming

    def ahead(self, offset: int, end: int, chunks: range, readahead: int) -> range:
        """Note a read (as `observe`); the chunks of the window after it once reads stream
        (`readahead` chunks at first)."""
        if not self.observe(offset, end, chunks) or not readahead:
            return range(0)
        self._window = max(self._window, readahead)
        self._first_window = readahead
        return range(chunks[-1] + 1, min(chunks[-1] + self._window + 1, self._chunk_count))

    def grow(self, largest: int) -> None:
        """The window was topped up: double it, up to `largest` chunks, if the reads are one
        long run read back to back (see the class)."""
        if self._sequential_bytes < 2 * self._first_window * self._chunk_size:
            return
        self._window = max(self._window, min(self._window * 2, largest))
