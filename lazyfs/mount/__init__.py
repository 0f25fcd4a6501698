"""The mount service: a daemon serving the FUSE file system of one or more layers, the kernel
mounts on top (EROFS, loop devices, overlayfs stacking an image's layers), the records that
let any process find and stop a mount, and the eager mount-and-stack of `lazyfs run --eager`.

The public calls are in `service` (mount a layer or images, find, read statistics, unmount)
and `eager` (mount an image eagerly, unmount it)."""
