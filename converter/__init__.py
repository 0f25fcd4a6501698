"""Turn directories, tar layers, raw EROFS images and OCI images into seekable EROFS layers."""
