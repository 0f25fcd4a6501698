"""Which compression algorithms an EROFS image uses, as its superblock lists them: what a tool
must be able to decode to read every file of the image.

The superblock sits at byte 1024 (the kernel's `fs/erofs/erofs_fs.h`): magic 0xE0F5E1E2 at
its offset 0, the incompatible feature bits at 80, and at 84 a 16-bit field that, when the
feature COMPR_CFGS (0x2) is set, is the bitmap of the algorithms the image's files use (bit 0
lz4, 1 lzma, 2 deflate, 3 zstd). Without that feature the field means something else and the
only algorithm an image can use is lz4 (mkfs.erofs sets it for any other, and for lz4 with big
physical clusters). Pure: bytes in, names out.

It reads those three fields alone, not `reader.parse_superblock`: that parser refuses the
features of compressed images (it decodes uncompressed ones), and this must name what a
compressed image needs.
"""

from __future__ import annotations

import struct

from lazyfs.erofs.reader import EROFS_MAGIC, SUPERBLOCK_OFFSET
from lazyfs.format.errors import FieldError, TruncatedError

ALGORITHMS = ("lz4", "lzma", "deflate", "zstd")  # by the id the on-disk format gives them
FEATURE_COMPR_CFGS = 0x2
_HEAD = struct.Struct("<I76xIH")  # magic, feature_incompat (at 80), available_compr_algs (84)


def compression_algorithms(head: bytes) -> tuple[str, ...]:
    """The algorithms the superblock in `head` (the image's first bytes, at least 1110) lists,
    in id order; an id this module has no name for is named "algorithm N". Empty when it lists
    none: the image is uncompressed, or uses lz4 alone. Raises TruncatedError, FieldError
    (not an EROFS image)."""
    if len(head) < SUPERBLOCK_OFFSET + _HEAD.size:
        raise TruncatedError("EROFS superblock", SUPERBLOCK_OFFSET, _HEAD.size,
                             max(0, len(head) - SUPERBLOCK_OFFSET))
    magic, incompat, bitmap = _HEAD.unpack_from(head, SUPERBLOCK_OFFSET)
    if magic != EROFS_MAGIC:
        raise FieldError("EROFS superblock", "magic", SUPERBLOCK_OFFSET, f"{EROFS_MAGIC:#x}",
                         f"{magic:#x}")
    if not incompat & FEATURE_COMPR_CFGS:
        return ()
    return tuple(algorithm_name(bit) for bit in range(16) if bitmap >> bit & 1)


def algorithm_name(algorithm_id: int) -> str:
    """The name of a compression algorithm by its on-disk id ("zstd" for 3)."""
    if 0 <= algorithm_id < len(ALGORITHMS):
        return ALGORITHMS[algorithm_id]
    return f"algorithm {algorithm_id}"


__all__ = [
    "ALGORITHMS",
    "EROFS_MAGIC",
    "SUPERBLOCK_OFFSET",
    "algorithm_name",
    "compression_algorithms",
]
