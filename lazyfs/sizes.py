"""Sizes as people write them: `64K`, `4M`, `1G` in, `1.5 MiB` out (binary units), for the
command line and the configuration file alike."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size_of(text: str) -> int | None:
    """Bytes from `4194304`, `64K`, `4M`, `1G` (binary units); None if `text` is no size."""
    found = _SIZE.match(text)
    if found is None:
        return None
    return int(found.group(1)) * _UNITS[found.group(2).lower()]


def human_size(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
