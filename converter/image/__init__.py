"""Whole OCI images into seekable EROFS: sources (layouts, archives, registries), the choice of
images, the conversion and its outputs. Uses the converter core, lazyfs.format and lazyfs.fetch.
"""
