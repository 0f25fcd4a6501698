"""The cache layer knows the format and nothing above it: no FUSE, no HTTP, no fetching."""

from __future__ import annotations

import ast
from pathlib import Path

import lazyfs.cache

ALLOWED_LAZYFS = ("lazyfs.cache", "lazyfs.format", "lazyfs.errors")
FORBIDDEN = ("pyfuse3", "httpx")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_cache_imports_only_the_format_layer() -> None:
    package = Path(lazyfs.cache.__file__).parent
    files = sorted(package.glob("*.py"))
    assert len(files) >= 2
    for path in files:
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {module}"
            if top == "lazyfs":
                assert module.startswith(ALLOWED_LAZYFS), f"{path.name} imports {module}"
