"""Where an image runs, in OCI terms: the `platform` of an index entry and of `--platform`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lazyfs.format.errors import OCIFormatError

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    """Where an image runs. `architecture` and `os` use Go names (amd64, arm64, linux)."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def normalized(self) -> Platform:
        """Return this platform with architecture aliases resolved and the default variant."""
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        variant = self.variant or _DEFAULT_VARIANTS.get(arch)
        if arch == "arm64" and variant == "8":
            variant = "v8"
        return Platform(self.os, arch, variant, self.os_version, self.os_features)

    def matches(self, candidate: Platform) -> bool:
        """Whether `candidate` (from an index) can run where this platform is wanted."""
        want, have = self.normalized(), candidate.normalized()
        return (want.os, want.architecture, want.variant) == (
            have.os,
            have.architecture,
            have.variant,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The `platform` object of a descriptor, fields in the order the OCI spec lists them."""
        obj: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            obj["os.version"] = self.os_version
        if self.os_features:
            obj["os.features"] = list(self.os_features)
        if self.variant:
            obj["variant"] = self.variant
        return obj


def parse_platform(text: str) -> Platform:
    """Parse `os/arch[/variant]` as given to `--platform`, e.g. `linux/amd64`, `linux/arm/v7`.
    Raises OCIFormatError (a ValueError)."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise OCIFormatError(f"platform {text!r}: expected 'os/architecture[/variant]'")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
