"""lazyfs: mount seekable EROFS container layers on demand, verified block by block."""

__version__ = "0.1.0"
