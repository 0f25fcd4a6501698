"""User-facing errors of the converter.

Every message says what is wrong and where (file, tar entry, offset), so the CLI can print it
as one line without a traceback.
"""

from lazyfs.errors import LazyfsError


class ConvertError(LazyfsError):
    """A conversion cannot proceed because of its input or environment."""


class UnsafeTarError(ConvertError):
    """A tar entry would write outside the extraction directory (or through a symlink)."""


class UnsupportedSourceError(ConvertError):
    """The source is none of: directory, tar (plain, gzip, zstd), EROFS image, seekable EROFS."""
