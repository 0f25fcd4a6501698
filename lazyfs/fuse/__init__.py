"""The FUSE file system: one read-only directory holding one verified block file per layer."""
