"""The FUSE daemon that exposes layers as block-like files, and the kernel mounts on top."""
