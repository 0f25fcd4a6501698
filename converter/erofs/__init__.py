"""lazyfs's own EROFS writer: the inodes a source gives (a directory, a tar, an EROFS image),
where everything goes (metadata first, then the blocks a start reads), and the image written."""
