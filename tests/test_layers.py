"""The layer rule of lazyfs: imports point down only (errors → format → fetch → image, eager,
cache → fuse → mount → container, snapshotter → cli). A module may import its own layer and
any below; `TYPE_CHECKING` and function-level imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

LAZYFS = Path(__file__).resolve().parents[1] / "lazyfs"

RANKS = {
    "errors": 0,
    "exception_groups": 0,
    "format": 1,
    "fetch": 2,
    "cache": 3,
    "image": 3,
    "eager": 3,
    "fuse": 4,
    "mount": 5,
    "container": 6,
    "snapshotter": 6,
    "cli": 7,
    "__main__": 7,
}


def _layer(module: str) -> str:
    """`lazyfs.mount.state` -> `mount`; `lazyfs` itself (its version) counts as base."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "lazyfs" or name.startswith("lazyfs.")}


def test_every_lazyfs_import_points_down() -> None:
    upward = []
    for path in sorted(LAZYFS.rglob("*.py")):
        relative = path.relative_to(LAZYFS.parent).with_suffix("")
        own = _layer(".".join(relative.parts))
        if own == "__init__":
            continue
        for module in _imports(path):
            if RANKS[_layer(module)] > RANKS[own]:
                upward.append(f"{relative}: imports {module}")
    assert upward == []


def test_every_package_has_a_layer() -> None:
    names = {p.stem if p.is_file() else p.name for p in LAZYFS.iterdir()}
    names -= {"__init__", "__pycache__"}
    assert names <= set(RANKS), names - set(RANKS)
