"""Answers fetched before a layer's reader existed (by the start-up's first requests), handed
to the reader, which serves one request for each from them instead of the network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ArrivingRest:
    """The rest of a range answer that was still arriving when the head start handed its
    answers over, on the head start's connection: `read(n)` blocks for up to `n` of its
    next bytes (b"" once the connection ends), `close()` ends the connection. `fd` is its
    socket, which a daemon forked from the command keeps open; `length` bytes are left, of
    a blob of `blob_size` bytes (as its Content-Range named)."""

    read: Callable[[int], bytes]
    close: Callable[[], None]
    fd: int
    length: int
    blob_size: int


@dataclass
class PrimedAnswers:
    """Answers fetched before the daemon's reader existed. Each serves one request: a
    document (GET of a whole small resource; None for a 404) by URL, a range when it holds
    every byte asked for (or, for a stream, the first ones), and for a stream the rest of a
    range still arriving, from where it has got to."""

    documents: dict[str, bytes | None] = field(default_factory=dict)
    # start: (body, the blob size its Content-Range named)
    ranges: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    # start: the rest of a range, from there on
    rests: dict[int, ArrivingRest] = field(default_factory=dict)
    requests: int = 0
    bytes_fetched: int = 0

    def add_range(self, start: int, body: bytes, blob_size: int) -> None:
        self.ranges[start] = (body, blob_size)
        self.requests += 1
        self.bytes_fetched += len(body)

    def take_document(self, url: str) -> tuple[bool, bytes | None]:
        """(True, body) once for a URL fetched early, else (False, None)."""
        if url in self.documents:
            return True, self.documents.pop(url)
        return False, None

    def take_range(self, start: int, end: int, *,
                   whole: bool = True) -> tuple[bytes, int, int] | None:
        """Bytes `start..end` (inclusive), the blob size and the bytes the answer took to
        fetch, from the one primed answer that holds `start`; with `whole`, only if it holds
        `end` too. The answer is used up."""
        for first, (body, blob_size) in self.ranges.items():
            if first <= start < first + len(body) and (not whole or end < first + len(body)):
                del self.ranges[first]
                return body[start - first:end - first + 1], blob_size, len(body)
        return None

    def take_rest(self, start: int) -> ArrivingRest | None:
        """The rest still arriving from `start` on, once."""
        return self.rests.pop(start, None)

    def close_rests(self) -> None:
        """End the connections of the rests nobody took."""
        while self.rests:
            self.rests.popitem()[1].close()
