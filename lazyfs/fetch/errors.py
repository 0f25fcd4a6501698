"""Errors of the fetch layer. Each message names the source, the byte range and the status."""

from lazyfs.errors import LazyfsError


class FetchError(LazyfsError):
    """Bytes of a blob could not be obtained (after any retries)."""


class RangeNotSupportedError(FetchError):
    """The server ignored a Range request and would send the whole blob."""


class BlobChangedError(FetchError):
    """The blob's size differs from what was seen when it was opened (or was promised).

    A changed ETag or Last-Modified alone is not this error: origins behind a load balancer,
    or a file touched or copied again, change them with the bytes unchanged, and every frame
    is checked against its digest anyway."""


class SourceUnreachableError(FetchError):
    """Every attempt failed before a connection was made (refused, unresolvable name,
    connect timeout): the whole source is down, not one range of it."""
