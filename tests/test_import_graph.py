"""Imports run one way: the module graph of the library and of the baselines has no circle.

Every ``import`` counts, including those inside functions (a function-level import is a
circle postponed, not removed). Imports under ``if TYPE_CHECKING:`` do not run and do not
count. Dynamic loading by name (``importlib.import_module`` in the plugin manager and in
``pcdeq_plugin.__init__``'s lazy attributes) is not an import statement and is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES: dict[str, Path] = {
    "pcdeq_plugin": ROOT / "pcdeq_plugin",
    "pcdeq_baselines": ROOT / "baselines" / "pcdeq_baselines",
}


def module_files(package: str, directory: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``directory``."""
    found: dict[str, Path] = {}
    for path in sorted(directory.rglob("*.py")):
        parts = [package, *path.relative_to(directory).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth (functions, classes, try, if)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)  # the body only runs for type checkers
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def _known(name: str, modules: set[str]) -> str | None:
    """``name`` or its nearest ancestor that is one of ``modules``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that importing ``name`` (from ``path``) runs directly."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            candidates = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        for candidate in candidates:
            target = _known(candidate, modules)
            if target is None or target == name:
                continue
            targets.add(target)
            # importing a.b.c from outside a.b runs a.b's __init__ too
            own = set(_ancestors(name)) | {name}
            targets.update(a for a in _ancestors(target) if a in modules and a not in own)
    return targets


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    files: dict[str, Path] = {}
    for package, directory in packages.items():
        files.update(module_files(package, directory))
    modules = set(files)
    return {name: imported_modules(name, path, modules) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` if it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return [*path[path.index(succ) :], succ]
            if succ not in state:
                cycle = visit(succ)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import X\nimport pkg.a\n"
    )
    (pkg / "c.py").write_text("from pkg.sub.b import thing\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.sub"}
    assert graph["pkg.sub.b"] == {"pkg.a"}  # the TYPE_CHECKING import does not run
    assert graph["pkg.c"] == {"pkg.sub.b", "pkg.sub"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "a.py").write_text("")
    assert find_cycle(import_graph({"pkg": pkg})) is None


@pytest.mark.parametrize("packages", [["pcdeq_plugin"], ["pcdeq_plugin", "pcdeq_baselines"]])
def test_imports_run_one_way(packages: list[str]) -> None:
    graph = import_graph({name: PACKAGES[name] for name in packages})
    assert len(graph) > 10  # the packages were found
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


# module -> the only package modules it may import (the bottom layers of the library)
LAYERS: dict[str, set[str]] = {
    "pcdeq_plugin.checks": set(),
    "pcdeq_plugin.recipes": {"pcdeq_plugin.checks"},
    "pcdeq_plugin.specs": {"pcdeq_plugin.checks", "pcdeq_plugin.recipes"},
    "pcdeq_plugin.spec_registry": {"pcdeq_plugin.specs"},
    "pcdeq_plugin.hookspecs": set(),
    "pcdeq_plugin.activation_checks": {"pcdeq_plugin.specs"},
    # the plugin manager is handed its registries; it imports none of them
    "pcdeq_plugin.plugin_switches": set(),
    "pcdeq_plugin.plugin_hooks": {"pcdeq_plugin.spec_registry"},
    "pcdeq_plugin.plugins": {
        "pcdeq_plugin.hookspecs",
        "pcdeq_plugin.plugin_hooks",
        "pcdeq_plugin.plugin_switches",
        "pcdeq_plugin.spec_registry",
    },
}


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_the_bottom_layers_import_only_what_is_below_them(module: str) -> None:
    graph = import_graph({"pcdeq_plugin": PACKAGES["pcdeq_plugin"]})
    extra = sorted(graph[module] - LAYERS[module])
    assert not extra, f"{module} imports {extra}; it may import only {sorted(LAYERS[module])}"
