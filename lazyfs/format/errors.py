"""The one exception family of the format layer.

Every parse or check failure is a specific subclass of `FormatError` whose message names the
structure, the field, the byte offset, what was expected and what was found, so a user can tell
a truncated download from a corrupted byte from a blob of another format.
"""

from __future__ import annotations

from lazyfs.errors import LazyfsError


class FormatError(LazyfsError):
    """Bytes do not follow the seekable EROFS format."""


class TruncatedError(FormatError):
    """A structure ends before all of its fields."""

    def __init__(self, what: str, offset: int, needed: int, available: int) -> None:
        super().__init__(
            f"{what} at offset {offset} is truncated: needs {needed} bytes, "
            f"only {available} present"
        )
        self.offset = offset
        self.needed = needed
        self.available = available


class FieldError(FormatError):
    """A field holds a value the format does not allow."""

    def __init__(self, what: str, field: str, offset: int, expected: str, found: object) -> None:
        super().__init__(
            f"{what}: field {field} at offset {offset}: expected {expected}, found {found}"
        )
        self.field = field
        self.offset = offset
        self.expected = expected
        self.found = found


class BadMagicError(FieldError):
    """A structure does not start with its magic number."""


class LayoutError(FormatError):
    """Structures are individually valid but do not fit together (offsets, sizes, order)."""


class IntegrityError(FormatError):
    """Bytes do not match the digest that authenticates them."""


class FrameDecodeError(IntegrityError):
    """A zstd frame is corrupt, or decodes to other than the exact expected size."""


class SizeMismatchError(IntegrityError):
    """Content is not the size the descriptor that authenticates it gives."""


class OCIFormatError(FormatError, ValueError):
    """An OCI document (manifest, index, descriptor, platform) is not of the expected shape.

    Also a ValueError, like `json.JSONDecodeError`: bad text given for a value."""
