"""Whiteouts of names no lower layer has stay hidden wherever a converted layer is stacked.

A tar layer may whiteout a name that no layer below holds (tools write such whiteouts). The
converted layer holds a 0:0 character device for it, which overlayfs leaves out of a
listing only in a directory it knows may hold whiteouts: one merged from several layers, or
one marked with `trusted.overlay.origin`. A directory that exists in the converted layer
alone is read as it is. These tests convert a layer with `convert_layer`, mount its image
and stack it with overlayfs the ways `lazyfs mount`, `lazyfs run` and the snapshotter do: as
the only layer (over an empty directory, or under an upper directory), at the top, at the
bottom, in the middle.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.layer import convert_layer
from lazyfs.eager.check import unpack_blob
from tests.converter import LayerBuilder, mounted_erofs
from tests.support.mounts import force_unmount

pytestmark = pytest.mark.root


def _ghost_layer() -> bytes:
    layer = LayerBuilder().dir("fresh").file("fresh/.wh.ghost").file("fresh/real", b"real\n")
    layer.file(".wh.phantom")  # in the root, which overlayfs always merges
    layer.dir("opq").file("opq/.wh..wh..opq").file("opq/.wh.old").file("opq/new", b"")
    return layer.tar()


@contextlib.contextmanager
def _overlay(target: Path, lowers: list[Path], upper: Path | None = None) -> Iterator[Path]:
    target.mkdir()
    options = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        work = upper.with_name(upper.name + "-work")
        upper.mkdir()
        work.mkdir()
        options = f"index=off,upperdir={upper},workdir={work},{options}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
                   check=True, capture_output=True, timeout=60)
    try:
        yield target
    finally:
        force_unmount(target)


@pytest.fixture
def converted(tmp_path: Path) -> Iterator[Path]:
    """The ghost layer converted and its image mounted read-only."""
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_ghost_layer())
    blob = tmp_path / "layer.blob"
    convert_layer(tar, blob)
    image = tmp_path / "layer.erofs"
    unpack_blob(blob, image)
    with mounted_erofs(image, tmp_path / "layer") as mountpoint:
        yield mountpoint


def _plain_layer(path: Path) -> Path:
    """A layer that has neither `fresh` nor `opq`, nor the names the ghost layer whites out."""
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "hostname").write_text("other\n")
    return path


STACKINGS = {
    # lowerdirs top first; "L" is the converted layer, "upper" adds an upper directory
    "only, over an empty layer (lazyfs mount)": (["L", "empty"], False),
    "only, under an upper directory (lazyfs run, a container)": (["L"], True),
    "top": (["L", "other"], False),
    "bottom": (["other", "L"], False),
    "middle": (["other", "L", "empty"], False),
    "bottom, under an upper directory": (["other", "L"], True),
}


@pytest.mark.parametrize("stacking", list(STACKINGS))
def test_whiteouts_stay_hidden_in_every_stacking(
    tmp_path: Path, converted: Path, stacking: str
) -> None:
    names, with_upper = STACKINGS[stacking]
    empty = tmp_path / "empty"
    empty.mkdir()
    layers = {"L": converted, "empty": empty, "other": _plain_layer(tmp_path / "other")}
    upper = tmp_path / "upper" if with_upper else None
    with _overlay(tmp_path / "merged", [layers[name] for name in names], upper) as merged:
        assert os.listdir(merged / "fresh") == ["real"]
        assert os.listdir(merged / "opq") == ["new"]
        assert "phantom" not in os.listdir(merged)
        # The mark is the overlay's business: it does not show in the merged tree.
        assert "trusted.overlay.origin" not in os.listxattr(merged / "fresh")
        if upper is not None:  # and stays right once the directory is copied up
            (merged / "fresh" / "added").write_text("x")
            assert sorted(os.listdir(merged / "fresh")) == ["added", "real"]


def test_the_image_marks_exactly_the_directories_holding_whiteouts(converted: Path) -> None:
    origin = "trusted.overlay.origin"
    for path in ("", "fresh", "opq"):
        assert os.getxattr(converted / path, origin) == b"", path
    assert os.getxattr(converted / "opq", "trusted.overlay.opaque") == b"y"
