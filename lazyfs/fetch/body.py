"""Reading a whole response body of bounded size: a manifest, an image config, a descriptor.

The cap is checked as the body streams in, so an oversized or hostile answer costs at most
the cap (plus one network chunk), never the whole of what the server would send.
"""

from __future__ import annotations

import httpx

from lazyfs.fetch.errors import FetchError


class BodyTooLargeError(FetchError):
    """A body is larger than the caller's cap; `cap_bytes` says which cap."""

    def __init__(self, message: str, cap_bytes: int) -> None:
        super().__init__(message)
        self.cap_bytes = cap_bytes


async def read_capped(response: httpx.Response, cap_bytes: int, what: str) -> bytes:
    """The body of `response`, at most `cap_bytes` long.

    Raises BodyTooLargeError naming `what` as soon as more arrives, and httpx errors of the
    stream.
    """
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > cap_bytes:
            raise BodyTooLargeError(f"{what}: larger than {cap_bytes} bytes", cap_bytes)
    return bytes(body)
