"""Answers fetched before a layer's reader existed (by the start-up's first requests), handed
to the reader, which serves one request for each from them instead of the network."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrimedAnswers:
    """Answers fetched before the daemon's reader existed. Each serves one request: a
    document (GET of a whole small resource; None for a 404) by URL, a range when it holds
    every byte asked for (or, for a stream, the first ones)."""

    documents: dict[str, bytes | None] = field(default_factory=dict)
    # start: (body, the blob size its Content-Range named)
    ranges: dict[int, tuple[bytes, int]] = field(default_factory=dict)
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
