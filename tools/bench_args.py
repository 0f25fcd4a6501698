"""Comma-separated lists on the start-up benchmarks' command lines (tools/bench_run,
tools/bench_startup): each cell of a run is one chunk size and one EROFS layout."""

from __future__ import annotations

from converter.mkfs import ErofsLayout


def comma_list(text: str) -> list[str]:
    """`"4M, 512K,"` -> `["4M", "512K"]`."""
    return [item.strip() for item in text.split(",") if item.strip()]


def erofs_layouts(text: str) -> list[str]:
    """The layout names of `text` (`lazyfs convert --erofs-layout` values); SystemExit for one
    that is not a layout."""
    names = comma_list(text)
    known = [layout.value for layout in ErofsLayout]
    for name in names:
        if name not in known:
            raise SystemExit(f"bench: --erofs-layout {name}: one of {', '.join(known)}")
    return names
