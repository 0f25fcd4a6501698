"""`lazyfs snapshotter`: a containerd proxy snapshotter. Layers in seekable EROFS are mounted
lazily (one FUSE file system for all of them, one kernel EROFS mount each); every other layer
is an ordinary overlayfs snapshot that containerd's differ unpacks into."""
