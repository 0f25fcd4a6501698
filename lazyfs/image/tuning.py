"""How a layer reads: readahead, request coalescing, parallel fetches, failure hold-off."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageTuning:
    """The knobs of RemoteImage, and the one place for their defaults.

    `readahead_chunks` chunks past a sequential read are loaded in the background (0: none);
    adjacent missing chunks are fetched in one request of at most `coalesce_bytes`; at most
    `parallel_fetches` requests of one layer are in flight. After a fetch fails (retries
    exhausted), further fetches fail at once for `failure_holdoff_s`, so a dead server costs
    one retry cycle rather than one per chunk a directory walk touches.

    `verity_window_bytes` of the dm-verity tree, its top levels, come with the chunk table
    in the one request that opens a layer; the other hash blocks are fetched when reads need
    them.
    """

    readahead_chunks: int = 2
    coalesce_bytes: int = 16 * 1024 * 1024
    parallel_fetches: int = 4
    failure_holdoff_s: float = 2.0
    verity_window_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        if (self.readahead_chunks < 0 or self.coalesce_bytes < 1 or self.parallel_fetches < 1
                or self.failure_holdoff_s < 0 or self.verity_window_bytes < 0):
            raise ValueError(
                "image tuning: need readahead_chunks >= 0, coalesce_bytes >= 1, "
                "parallel_fetches >= 1, failure_holdoff_s >= 0 and verity_window_bytes >= 0"
            )
