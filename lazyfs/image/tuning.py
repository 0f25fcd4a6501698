"""How a layer reads: readahead, request coalescing, parallel fetches, how long a read may
take, and how failures are retried."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ImageTuning:
    """The knobs of RemoteImage, and the one place for their defaults.

    `readahead_chunks` chunks past a sequential read are loaded in the background (0: none);
    adjacent missing chunks are fetched in one request of at most `coalesce_bytes`; at most
    `parallel_fetches` requests of one layer are in flight.

    A read returns its bytes or fails within `read_timeout_s`, whatever loads it (and a load
    gives up after as long). A chunk whose frame fails a check is fetched again up to
    `refetches` times (from the next source, when there are several) before it is reported
    bad; it stays bad for `bad_retry_after_s` (doubling while it keeps failing), then a read
    tries again. A failed fetch holds off only its own chunks, and a source that cannot be
    connected to all of the layer's fetches, for `retry_after_s`, doubling up to
    `retry_max_s` (see `lazyfs.image.health`).
    """

    readahead_chunks: int = 2
    coalesce_bytes: int = 16 * 1024 * 1024
    parallel_fetches: int = 4
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    refetches: int = 2
    retry_after_s: float = 1.0
    retry_max_s: float = 30.0
    bad_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if (self.readahead_chunks < 0 or self.coalesce_bytes < 1 or self.parallel_fetches < 1
                or self.read_timeout_s <= 0 or self.refetches < 0 or self.retry_after_s < 0
                or self.retry_max_s < self.retry_after_s or self.bad_retry_after_s < 0):
            raise ValueError(
                "image tuning: need readahead_chunks >= 0, coalesce_bytes >= 1, "
                "parallel_fetches >= 1, read_timeout_s > 0, refetches >= 0, "
                "0 <= retry_after_s <= retry_max_s and bad_retry_after_s >= 0"
            )
