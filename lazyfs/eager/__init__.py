"""Whole local blobs, the eager counterpart of `lazyfs.layer`: find a blob's metadata
(`locate`), describe its layout (`describe`), check every digest, frame and dm-verity block,
and unpack it (`check`)."""
