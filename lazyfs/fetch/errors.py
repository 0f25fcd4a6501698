"""Errors of the fetch layer. Each message names the source, the byte range and the status."""

from lazyfs.errors import LazyfsError


class FetchError(LazyfsError):
    """Bytes of a blob could not be obtained (after any retries)."""


class RangeNotSupportedError(FetchError):
    """The server ignored a Range request and would send the whole blob."""


class BlobChangedError(FetchError):
    """The blob's size or ETag differs from what was seen when it was opened."""
