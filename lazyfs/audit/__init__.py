"""Whole images checked end to end: `lazyfs verify IMAGE [--against SOURCE]`.

`image_check` runs the check; `documents` reads an image's index, manifests and configs,
`structure` says what they must hold alone and against the source's, `layers` reads one layer
whole (checks, diff ID, file tree), `erofs_files` reads the tree of a raw EROFS image, and
`merge` applies layer trees into the root file system they make.
"""
