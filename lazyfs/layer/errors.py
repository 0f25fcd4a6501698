"""Errors of the image layer."""

from lazyfs.errors import LazyfsError


class LayerOpenError(LazyfsError):
    """A layer cannot be mounted as given (no descriptor, no trusted digest, size mismatch)."""


class ImageResolveError(LayerOpenError):
    """The reference does not lead to one mountable manifest (no manifest for the platform,
    a malformed manifest or config, no layers, none remembered where only the disk cache may
    answer)."""


class UntrustedLayerError(LayerOpenError):
    """No digest authenticates the layer's metadata and `--insecure` was not given."""


class ImageReadError(Exception):
    """Bytes of the image could not be fetched or verified; the read fails with EIO.

    Raised only after the cause was logged once, so callers just map it to EIO.
    """


class FetchAttemptFailed(Exception):
    """A fetch from one source failed after the reader's retries (internal to loads: the
    next source is tried); `unreachable`: no attempt connected."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.unreachable = unreachable
