"""containerd's list filters as the snapshotter reads them."""

from __future__ import annotations

from lazyfs.snapshotter.filters import matches, parse_filters
from lazyfs.snapshotter.store import Kind

LABELS = {"containerd.io/snapshot.ref": "sha256:abc", "x": "1"}


def test_the_filter_containerd_uses_to_find_a_remote_snapshot() -> None:
    filters = parse_filters(['labels."containerd.io/snapshot.ref"==sha256:abc,parent=="p1"'])
    assert filters is not None
    assert matches(filters, "n", "p1", LABELS, Kind.COMMITTED)
    assert not matches(filters, "n", "p2", LABELS, Kind.COMMITTED)
    assert not matches(filters, "n", "p1", {"x": "1"}, Kind.COMMITTED)


def test_operators_and_alternatives() -> None:
    filters = parse_filters(["kind==view", "labels.x!=1,name~=^ab"])
    assert filters is not None
    assert matches(filters, "zz", "", {}, Kind.VIEW)
    assert matches(filters, "abc", "", {"x": "2"}, Kind.ACTIVE)
    assert not matches(filters, "abc", "", {"x": "1"}, Kind.ACTIVE)
    presence = parse_filters(["labels.x"])
    assert presence is not None
    assert matches(presence, "a", "", {"x": "1"}, Kind.ACTIVE)
    assert not matches(presence, "a", "", {}, Kind.ACTIVE)


def test_no_or_unreadable_filters_match_everything() -> None:
    assert parse_filters([]) is None
    assert parse_filters(["==="]) is None
    assert matches(None, "a", "", {}, Kind.ACTIVE)
