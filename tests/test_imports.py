"""The layer rules of the packages, read from their import statements: imports point down,
and no chain of imports comes back to where it started."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lazyfs", "converter")

# Module prefix -> the project modules it may import (prefixes; a module may always import
# from its own prefix). The most specific prefix applies.
RULES: dict[str, tuple[str, ...]] = {
    "lazyfs.errors": (),
    "lazyfs.exception_groups": (),
    "lazyfs.format": ("lazyfs.errors",),
    "lazyfs.fetch": ("lazyfs", "lazyfs.errors", "lazyfs.exception_groups", "lazyfs.format"),
    "converter": ("lazyfs.errors", "lazyfs.format"),
    "converter.image": ("lazyfs.errors", "lazyfs.exception_groups", "lazyfs.format",
                        "lazyfs.fetch", "converter"),
}
# Third-party modules a layer must not use at all.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "lazyfs.format": ("trio", "httpx", "pyfuse3"),
    "lazyfs.fetch": ("pyfuse3",),
    "converter": ("pyfuse3",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES
            for path in sorted((REPO_ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, wherever the statement stands (functions and
    TYPE_CHECKING blocks too): `from a import b` is `a.b` when that is a module."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import"
            yield node.module
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    yield f"{node.module}.{alias.name}"


IMPORTS = {name: sorted(set(_imports(path))) for name, path in MODULES.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _rule_of(module: str, table: dict[str, tuple[str, ...]]) -> str | None:
    matching = [prefix for prefix in table if _within(module, prefix)]
    return max(matching, key=len) if matching else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    rule = _rule_of(module, RULES)
    forbidden = FORBIDDEN.get(_rule_of(module, FORBIDDEN) or "", ())
    for imported in IMPORTS[module]:
        assert not any(_within(imported, name) for name in forbidden), (module, imported)
        if rule is None or not imported.startswith(PACKAGES):
            continue
        allowed = (rule, *RULES[rule])
        # A module of converter's core may not reach up into converter.image.
        below = not (rule == "converter" and _within(imported, "converter.image"))
        assert below and any(_within(imported, prefix) for prefix in allowed), (
            f"{module} imports {imported}; {rule} may import only {allowed}"
        )


def test_only_the_cli_imports_the_converter() -> None:
    for module, imported in IMPORTS.items():
        if _within(module, "lazyfs") and not _within(module, "lazyfs.cli"):
            assert not any(_within(name, "converter") for name in imported), module


def test_no_import_cycles() -> None:
    graph = {module: [name for name in imported if name in MODULES and name != module]
             for module, imported in IMPORTS.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module):], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
