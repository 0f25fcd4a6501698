"""A remote seekable EROFS layer read at random: fetch, verify, decompress, cache."""
