"""What every blob reader offers: random access to the bytes of one immutable blob.

The image layer reads frames through this interface and does not care whether the blob is a
local file or an HTTP resource; both readers check the same preconditions the same way.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lazyfs.fetch.errors import FetchError

if TYPE_CHECKING:
    import httpx

# A body arriving slower than this is treated as stalled, on top of the fixed timeouts.
MIN_RATE_BYTES_PER_S = 64 * 1024


@dataclass(frozen=True)
class SpeedLimit:
    """An attempt receiving less than `bytes_per_s` for `time_s` (no answer at all for that
    long included) is abandoned as a transient fault, like curl's --speed-limit/--speed-time:
    a stalled or trickling connection is given up early and tried again."""

    bytes_per_s: int = 8 * 1024
    time_s: float = 10.0

    def __post_init__(self) -> None:
        if self.bytes_per_s < 0 or self.time_s <= 0:
            raise ValueError("low-speed limit: need bytes_per_s >= 0 and time_s > 0")


@dataclass(frozen=True)
class ReaderOptions:
    """How a blob reader reaches its blob; the one place for these defaults.

    `headers` and `auth` go to the origin only, never to a redirect target. Each attempt of a
    request has a deadline derived from the timeouts (and the size asked for); transient
    faults are retried `max_retries` times with jittered backoff from `backoff_base_s`, a
    connection below `low_speed` among them. `max_connections` bounds the requests in
    flight. `expected_size`, when a manifest or
    descriptor promises one, must be the blob's size. `verify_tls` is False, True or a CA
    bundle path. A local file uses `expected_size` only.
    """

    headers: Mapping[str, str] = field(default_factory=dict)
    auth: httpx.Auth | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    max_retries: int = 4
    backoff_base_s: float = 0.2
    max_connections: int = 8
    expected_size: int | None = None
    verify_tls: bool | str = True
    low_speed: SpeedLimit = field(default_factory=SpeedLimit)

    def __post_init__(self) -> None:
        if (self.max_retries < 0 or self.max_connections < 1 or self.connect_timeout_s <= 0
                or self.read_timeout_s <= 0 or self.backoff_base_s < 0):
            raise ValueError(
                "reader options: need max_retries >= 0, max_connections >= 1, positive "
                "timeouts and backoff_base_s >= 0"
            )

    def attempt_deadline_s(self, size_bytes: int) -> float:
        """The deadline of one attempt to fetch `size_bytes`: the fixed timeouts twice over,
        plus the time the body takes at the slowest rate not taken for a stall."""
        return 2 * (self.connect_timeout_s + self.read_timeout_s) + (
            size_bytes / MIN_RATE_BYTES_PER_S
        )


@dataclass
class FetchStats:
    """Mutable counters of one reader, for benchmarks and `lazyfs` status output.

    `requests` counts requests sent (HTTP requests, or reads of a local file), `bytes_fetched`
    the body bytes received, `retries` the attempts repeated after a transient fault and
    `failures` the calls that finally raised.
    """

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    failures: int = 0


@runtime_checkable
class BlobReader(Protocol):
    """Random access to one blob; `read` returns exactly the requested bytes or raises."""

    source: str
    stats: FetchStats

    async def open(self) -> int:
        """Probe the blob and return its size in bytes; remember the size to detect a blob
        replaced by one of another size while it is mounted. Raises FetchError."""
        ...

    async def read(self, offset: int, size: int) -> bytes:
        """Return exactly `size` bytes starting at `offset`. Raises FetchError."""
        ...

    async def aclose(self) -> None:
        """Release connections or file handles; the reader is unusable afterwards."""
        ...


@runtime_checkable
class ClippingReader(BlobReader, Protocol):
    """A BlobReader that can read up to the end of a blob whose size it does not know yet,
    and learn the size from that read (no probe of its own)."""

    @property
    def size(self) -> int | None:
        """The blob size, promised or seen; None while unknown."""
        ...

    async def read_clipped(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, fewer where the blob ends. Raises FetchError."""
        ...


@runtime_checkable
class StreamingReader(BlobReader, Protocol):
    """A BlobReader that can also hand a range on as it arrives (partial frames need it)."""

    async def read_stream(self, offset: int, size: int,
                          sink: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand the `size` bytes at `offset` to `sink` in order, piece by piece, awaiting
        `sink` before the next piece. Raises FetchError, and what `sink` raises."""
        ...


def byte_range(offset: int, size: int) -> str:
    """The inclusive HTTP notation of a range, used in requests and in every message."""
    return f"bytes={offset}-{offset + size - 1}"


def check_read_args(source: str, offset: int, size: int, blob_size: int) -> None:
    """Refuse a read that is malformed or reaches past the end of the blob.

    Raises ValueError for a negative offset or size (a caller bug) and FetchError for a range
    past EOF: the frame table of the image promised bytes that the blob does not have.
    """
    if offset < 0 or size < 0:
        raise ValueError(f"{source}: negative offset or size (offset={offset}, size={size})")
    if offset + size > blob_size:
        raise FetchError(
            f"{source} {byte_range(offset, size)}: range ends past the end of the blob "
            f"({blob_size} bytes)"
        )


def backoff_delay_s(attempt: int, base_s: float, retry_after_s: float | None, *,
                    max_s: float, retry_after_cap_s: float) -> float:
    """How long to wait before retry `attempt` (1 for the first): exponential from `base_s`,
    capped at `max_s`, jittered by +-50% so clients do not retry in step, and never shorter
    than a server's Retry-After (itself capped at `retry_after_cap_s`)."""
    delay_s = min(max_s, base_s * 2.0 ** (attempt - 1))
    delay_s *= 0.5 + random.random()
    if retry_after_s is not None:
        delay_s = max(delay_s, min(retry_after_s, retry_after_cap_s))
    return delay_s
