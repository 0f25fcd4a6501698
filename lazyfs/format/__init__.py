"""Pure byte-level code for the seekable EROFS format: no I/O, no trio, no HTTP, no FUSE."""
