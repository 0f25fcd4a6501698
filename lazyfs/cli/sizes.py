"""An option's size (`--cache-size 4M`), or the user error that names the option; the units
themselves are `lazyfs.sizes`."""

from __future__ import annotations

from lazyfs.cli import UserError
from lazyfs.sizes import size_of


def parse_size(text: str, option: str = "size") -> int:
    """Bytes from `4194304`, `64K`, `4M`, `1G` (binary units). Raises UserError."""
    size = size_of(text)
    if size is None:
        raise UserError(f"{option} {text!r}: not a size; expected e.g. 65536, 64K or 4M")
    return size
