"""How the command line tells an image reference from a layer blob, and this machine's
platform in OCI terms: light to import, so that a command can decide before it imports the
rest (and start its first requests meanwhile)."""

from __future__ import annotations

import os
import platform as host

from lazyfs.format.platform import Platform
from lazyfs.format.reference import parse_reference

_HOST_ARCHITECTURES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def host_platform() -> Platform:
    """The platform of this machine in OCI terms (linux/amd64, linux/arm64/v8, ...)."""
    machine = host.machine().lower()
    architecture, variant = _HOST_ARCHITECTURES.get(machine, (machine, None))
    return Platform("linux", architecture, variant)


def is_image_reference(source: str) -> bool:
    """Whether `lazyfs mount SOURCE` means an image in a registry: SOURCE is not a URL
    (contains no `://`), names no existing file or directory, and parses as a reference."""
    if "://" in source or os.path.lexists(source):
        return False
    try:
        parse_reference(source)
    except ValueError:
        return False
    return True
