"""OCI chain IDs: how containerd names the snapshot of a stack of layers.

A layer's diff ID is the sha256 of its uncompressed content (for seekable EROFS, of the raw
EROFS image), as the image config lists it in `rootfs.diff_ids`; the chain ID of the layers
up to one is the first diff ID, then `sha256(previous chain ID + " " + diff ID)`. Two images
whose configs list the same diff IDs share their snapshots, so a remote snapshot is only as
trustworthy as the proof that its layer's content hashes to the diff ID it was named by.
"""

from __future__ import annotations

import hashlib
import re

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ChainIdError(ValueError):
    """Malformed diff IDs."""


def check_diff_ids(diff_ids: list[str] | tuple[str, ...], where: str) -> None:
    """Raise ChainIdError unless every entry is a sha256 digest (`sha256:` and 64 hex)."""
    for number, diff_id in enumerate(diff_ids, start=1):
        if not isinstance(diff_id, str) or not _DIGEST.fullmatch(diff_id):
            raise ChainIdError(f"{where}: diff ID {number} of {len(diff_ids)} is not a sha256 "
                               f"digest: {str(diff_id)[:80]!r}")


def chain_ids(diff_ids: list[str] | tuple[str, ...]) -> list[str]:
    """The chain ID of every prefix of `diff_ids`, bottom layer first."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain
