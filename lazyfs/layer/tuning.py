"""How a layer reads: readahead, request coalescing, parallel fetches, how long a read may
take, and how failures are retried; and what a mount fetches in the background."""

from __future__ import annotations

from dataclasses import dataclass

from lazyfs.format.prefetch_list import PrefetchList

DEFAULT_READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ImageTuning:
    """The knobs of RemoteImage, and the one place for their defaults.

    After a sequential read, the chunks within `readahead_bytes` past it are loaded in the
    background (a distance in bytes, so that smaller chunks do not shrink it), or exactly
    `readahead_chunks` chunks when that is set (0: none). While reads go on in order the
    distance doubles each time the chunks ahead are topped up, up to `readahead_max_bytes`
    (and a quarter of the chunk cache; not beyond `readahead_chunks` when that is set).
    Adjacent missing chunks are fetched in one request of at most `coalesce_bytes`; at most
    `parallel_fetches` requests of one layer are in flight.

    A read returns its bytes or fails within `read_timeout_s`, whatever loads it (and a load
    gives up after as long). A chunk whose frame fails a check is fetched again up to
    `refetches` times (from the next source, when there are several) before it is reported
    bad; it stays bad for `bad_retry_after_s` (doubling while it keeps failing), then a read
    tries again. A failed fetch holds off only its own chunks, and a source that cannot be
    connected to all of the layer's fetches, for `retry_after_s`, doubling up to
    `retry_max_s` (see `lazyfs.layer.health`).

    `verity_window_bytes` of the dm-verity tree, its top levels, come with the chunk table
    in the one request that opens a layer; the other hash blocks are fetched when reads need
    them. With dm-verity and `partial_frames`, frames stream in and reads are answered as
    their blocks verify, decoding at least every `stream_piece_bytes` of a frame; with
    `finish_frames` a frame keeps streaming into the cache once its readers are answered
    (off: the transfer stops when nobody waits; for measurements).

    A read that misses at its last chunk, in a layer that streams (`partial_frames`) and
    reads ahead at all, also fetches the next chunk in the same request when its frame is at
    most `follow_miss_bytes` (0: never): a start-up jumps from file to file, each miss one
    round trip, and the next file is often the one laid out after it. The next frame's bytes
    come after the missed one's on the same stream, so the read waits for nothing more.

    A layer opened from the disk cache alone asks its source whether it answers
    `source_probe_delay_s` after it opens: not during the start-up it serves, which the disk
    answers (a read that must fetch meanwhile asks the source itself).
    """

    readahead_chunks: int | None = None
    readahead_bytes: int = 8 * 1024 * 1024
    readahead_max_bytes: int = 64 * 1024 * 1024
    coalesce_bytes: int = 16 * 1024 * 1024
    parallel_fetches: int = 4
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    refetches: int = 2
    retry_after_s: float = 1.0
    retry_max_s: float = 30.0
    bad_retry_after_s: float = 30.0
    verity_window_bytes: int = 16 * 1024
    partial_frames: bool = True
    stream_piece_bytes: int = 32 * 1024
    finish_frames: bool = True
    follow_miss_bytes: int = 384 * 1024
    source_probe_delay_s: float = 2.0

    def __post_init__(self) -> None:
        if ((self.readahead_chunks is not None and self.readahead_chunks < 0)
                or self.readahead_bytes < 0 or self.readahead_max_bytes < 0
                or self.coalesce_bytes < 1
                or self.parallel_fetches < 1 or self.read_timeout_s <= 0
                or self.refetches < 0 or self.retry_after_s < 0
                or self.retry_max_s < self.retry_after_s or self.bad_retry_after_s < 0
                or self.verity_window_bytes < 0 or self.stream_piece_bytes < 1
                or self.follow_miss_bytes < 0 or self.source_probe_delay_s < 0):
            raise ValueError(
                "image tuning: need readahead_chunks, readahead_bytes and "
                "readahead_max_bytes >= 0, coalesce_bytes >= 1, parallel_fetches >= 1, "
                "read_timeout_s > 0, refetches >= 0, 0 <= retry_after_s <= retry_max_s, "
                "bad_retry_after_s >= 0, verity_window_bytes >= 0, stream_piece_bytes >= 1, "
                "follow_miss_bytes >= 0 and source_probe_delay_s >= 0"
            )

    def readahead_for(self, chunk_size: int) -> int:
        """How many chunks to read ahead in a layer of `chunk_size` chunks."""
        if self.readahead_chunks is not None:
            return self.readahead_chunks
        return -(-self.readahead_bytes // chunk_size)

    def readahead_max_for(self, chunk_size: int, cache_bytes: int) -> int:
        """How many chunks ahead reads that go on in order may load at most, with a chunk
        cache of `cache_bytes` (a quarter of it at most, never less than `readahead_for`)."""
        if self.readahead_chunks is not None:
            return self.readahead_chunks
        largest = min(self.readahead_max_bytes, cache_bytes // 4) // chunk_size
        return max(largest, self.readahead_for(chunk_size))


DEFAULT_FILL_RATE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class PrefetchOptions:
    """What a mount fetches in the background, and what it records.

    `prefetch_list` (from `list_source`, a file the user named) applies to the layers it was
    recorded from; without it, lists that images carry in their layer annotations are used
    unless `use_image_lists` is False. `fill` fetches every chunk after the list, at most
    `fill_rate_bytes` a second. `record_file` receives the chunks this mount read, in order,
    when it is unmounted. With `from_disk`, a layer without a list whose chunks the disk cache
    holds loads those ahead of reads, in the order its last mount read them (a warm start
    then waits for no disk read), as far as half the chunk cache holds.

    Background requests have `parallel_requests` slots of their own, each at most
    `request_bytes` of frames; while a read's fetch is waiting or in flight, only
    `requests_during_reads` of them may be in flight (0: none starts until the reads are
    done). A few keep the link busy while a read's request makes its round trip: the list
    asks for what the start-up reads next anyway.
    """

    prefetch_list: PrefetchList | None = None
    list_source: str = ""
    use_image_lists: bool = True
    fill: bool = False
    fill_rate_bytes: int = DEFAULT_FILL_RATE_BYTES
    record_file: str | None = None
    from_disk: bool = True
    parallel_requests: int = 4
    request_bytes: int = 256 * 1024
    requests_during_reads: int = 2

    def __post_init__(self) -> None:
        if self.fill_rate_bytes < 1 or self.parallel_requests < 1 or self.request_bytes < 1:
            raise ValueError("prefetch options: need fill_rate_bytes, parallel_requests and "
                             "request_bytes >= 1")
        if not 0 <= self.requests_during_reads <= self.parallel_requests:
            raise ValueError("prefetch options: requests_during_reads must be within "
                             "0..parallel_requests")
