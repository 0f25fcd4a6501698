"""Errors of the image layer."""

from lazyfs.errors import LazyfsError


class LayerOpenError(LazyfsError):
    """A layer cannot be mounted as given (no descriptor, no trusted digest, size mismatch)."""


class UntrustedLayerError(LayerOpenError):
    """No digest authenticates the layer's metadata and `--insecure` was not given."""


class ImageReadError(Exception):
    """Bytes of the image could not be fetched or verified; the read fails with EIO.

    Raised only after the cause was logged once, so callers just map it to EIO.
    """
