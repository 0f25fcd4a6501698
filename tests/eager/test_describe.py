"""`describe` on containerd's vectors: the same layout with and without a descriptor, and a
descriptor of another blob refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.eager.describe import DescriptorMismatchError, describe
from lazyfs.eager.locate import load_descriptor

BLOB = "basic-verity-64k"


def test_a_descriptor_authenticates_the_layout_a_scan_finds(vectors_dir: Path) -> None:
    blob = vectors_dir / f"{BLOB}.blob"
    descriptor = load_descriptor(vectors_dir / f"{BLOB}.descriptor.json")
    pinned, scanned = describe(blob, descriptor), describe(blob, None)
    assert pinned["authenticated"] and not scanned["authenticated"]
    for key in ("layout", "chunk_count", "chunk_digest", "image_size", "frames"):
        assert pinned[key] == scanned[key], key
    assert pinned["verity"]["root_source"] == "descriptor"
    assert scanned["verity"]["root_source"] == "computed, not authenticated"
    assert pinned["verity"]["root_digest"] == scanned["verity"]["root_digest"]
    assert sum(frame["size"] for frame in pinned["frames"]) == pinned["layout"][0]["size"]


def test_a_descriptor_of_another_blob_is_refused(vectors_dir: Path) -> None:
    other = load_descriptor(vectors_dir / "basic-noverity.descriptor.json")
    with pytest.raises(DescriptorMismatchError, match="the descriptor is for another blob"):
        describe(vectors_dir / f"{BLOB}.blob", other)
