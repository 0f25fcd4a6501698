"""The read engine of one remote seekable EROFS layer: fetch, verify, decompress, cache."""
