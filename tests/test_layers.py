"""The import rule of the layout, enforced: imports point down the layer table, never up or
sideways. The table is README's "Layout" section; a module that needs something from a layer
it may not import is in the wrong room, or the thing it needs is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BASE = {"lazyfs", "lazyfs.errors", "lazyfs.exception_groups", "lazyfs.sizes"}

# layer -> the layers it may import (besides itself and the base modules).
ALLOWED: dict[str, set[str]] = {
    "format": set(),
    "erofs": {"format"},
    "fetch": {"format"},
    "cache": {"format"},
    "layer": {"format", "fetch", "cache"},
    "startup": {"format", "fetch", "cache", "layer"},
    "oci": {"format", "fetch", "cache", "layer", "startup"},
    "eager": {"format", "fetch"},
    "containerd": {"format", "fetch"},
    "fuse": {"format", "fetch", "cache", "layer"},
    "mount": {"format", "fetch", "cache", "layer", "startup", "oci", "eager", "fuse"},
    "container": {"format", "fetch", "cache", "layer", "startup", "oci", "eager", "fuse",
                  "mount"},
    "snapshotter": {"format", "fetch", "cache", "layer", "startup", "oci", "eager", "fuse",
                    "mount", "containerd"},
    "audit": {"format", "erofs", "fetch", "eager", "converter", "converter.image"},
    "cri": {"format", "fetch", "cache", "layer", "startup", "oci", "eager", "fuse", "mount",
            "containerd", "snapshotter"},
    "node": {"format", "fetch", "cache", "layer", "startup", "oci", "eager", "fuse", "mount",
             "containerd", "snapshotter", "cri"},
    "bench": {"format", "fetch", "cache", "layer", "startup", "oci", "eager", "fuse", "mount",
              "container"},
    "cli": {"format", "erofs", "fetch", "cache", "layer", "startup", "oci", "eager", "fuse",
            "mount", "container", "snapshotter", "containerd", "converter", "converter.image",
            "audit", "cri", "node", "bench"},
    "converter": {"format", "erofs"},
    "converter.image": {"format", "erofs", "fetch", "converter"},
}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to; None for the base and for third parties."""
    parts = module.split(".")
    if module in BASE:
        return None
    if parts[0] == "converter":
        return "converter.image" if parts[1:2] == ["image"] else "converter"
    if parts[0] != "lazyfs":
        return None
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every lazyfs/converter module `source` imports, anywhere in the file (functions and
    TYPE_CHECKING blocks included), relative imports resolved."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in {"lazyfs", "converter"}}


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """`module imports target` lines for every import against the table.

    `sources` maps a dotted module name to (its source, whether it is a package __init__).
    """
    known = set(sources)
    found = []
    for module, (source, is_package) in sorted(sources.items()):
        own = layer_of(module)
        for target in sorted(imported_modules(source, module, is_package)):
            if target not in known and target.rpartition(".")[0] in known:
                continue  # `from pkg.mod import name`: the name, not a module
            other = layer_of(target)
            if own is None:
                if other is not None:
                    found.append(f"{module} (base) imports {target} ({other})")
                continue
            if other is None or other == own or other in ALLOWED[own]:
                continue
            found.append(f"{module} ({own}) imports {target} ({other})")
    return found


def project_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for top in ("lazyfs", "converter"):
        for path in sorted((REPO / top).rglob("*.py")):
            relative = path.relative_to(REPO).with_suffix("")
            parts = list(relative.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            sources[".".join(parts)] = (path.read_text(), is_package)
    return sources


def test_every_package_is_in_the_table() -> None:
    layers = {layer_of(module) for module in project_sources()}
    assert layers - {None} <= set(ALLOWED), sorted(layers - {None} - set(ALLOWED))


def test_imports_point_down_the_layer_table() -> None:
    assert violations(project_sources()) == []


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("lazyfs.format.frames", "from lazyfs.fetch.http import HttpBlobReader"),
        ("lazyfs.fetch.http", "import lazyfs.layer.remote_image"),
        ("lazyfs.layer.remote_image", "from lazyfs.startup import open"),
        ("lazyfs.erofs.reader", "from lazyfs.layer import loader"),
        ("lazyfs.layer.remote_image", "from lazyfs.mount import daemon"),
        ("lazyfs.mount.daemon", "from lazyfs.cli import main"),
        ("lazyfs.node.config", "from lazyfs.cli import UserError"),
        ("lazyfs.sizes", "from lazyfs.cli import UserError"),
        ("lazyfs.container.runner", "from lazyfs.snapshotter import service"),
        ("converter.encoder", "from lazyfs.fetch import http"),
        ("converter.image.convert", "from lazyfs.layer import remote_image"),
        ("lazyfs.errors", "from lazyfs.format import errors"),
        ("lazyfs.format.chunk_table", "from ..fetch import http"),
    ],
)
def test_a_planted_import_against_the_table_is_reported(module: str, line: str) -> None:
    sources = project_sources()
    source, is_package = sources.get(module, ("", False))
    sources[module] = (f"{source}\ndef planted() -> None:\n    {line}\n", is_package)
    assert any(report.startswith(f"{module} ") for report in violations(sources))


# Third-party modules a layer must not use at all: the format is bytes only, and nothing
# below the FUSE layer knows FUSE.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "format": ("trio", "httpx", "pyfuse3", "grpc"),
    "fetch": ("pyfuse3",),
    "cache": ("httpx", "pyfuse3"),
    "image": ("pyfuse3",),
    "converter": ("pyfuse3", "httpx", "trio"),
}


def third_party_imports(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_layers_use_only_their_own_libraries() -> None:
    found = []
    for module, (source, _) in sorted(project_sources().items()):
        banned = FORBIDDEN.get(layer_of(module) or "", ())
        found += [f"{module} imports {name}" for name in sorted(third_party_imports(source))
                  if name in banned]
    assert found == []


def test_the_packages_never_import_the_scripts() -> None:
    """tools/ are scripts on top of the packages, never below them."""
    found = []
    for module, (source, _) in sorted(project_sources().items()):
        for node in ast.walk(ast.parse(source)):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and not node.level else [])
            found += [f"{module} imports {name}" for name in names
                      if name.split(".")[0] == "tools"]
    assert found == []


def test_no_import_cycles() -> None:
    sources = project_sources()
    graph = {
        module: sorted(name for name in imported_modules(source, module, is_package)
                       if name in sources and name != module)
        for module, (source, is_package) in sources.items()
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def floor_of(layer: str) -> int:
    """1 for a layer that may import no other; else one above the highest it may import."""
    return 1 + max((floor_of(other) for other in ALLOWED[layer]), default=0)


def test_readmes_floors_are_the_tables() -> None:
    """README's "How it is built" draws the packages as floors: the ones this table makes."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## How it is built"):text.index("**One byte, from")]
    drawn: dict[str, int] = {}
    for line in section.splitlines():
        cells = line.split(" | ")
        if len(cells) > 2 and cells[0].lstrip("| ").isdigit():
            for path in cells[1].split(", "):
                module = path.strip("`/").replace("/", ".")
                layer = layer_of(module) if module.startswith("lazyfs.") else module
                drawn[str(layer)] = int(cells[0].lstrip("| "))
    assert drawn == {layer: floor_of(layer) for layer in ALLOWED}
