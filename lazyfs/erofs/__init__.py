"""The EROFS file system format: reading an image's tree, and writing uncompressed images."""
