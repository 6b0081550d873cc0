"""The modules of stablelora import each other without a cycle, counting the imports inside
functions too: a function-level import is there to keep a module light to import (torch,
transformers), never to hide a cycle. Leaf modules (stablelora.config.errors, stablelora.probes.quantities,
stablelora.records.atomic) hold what both sides of a former cycle need."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT


def module_files(package_dir: Path) -> dict[str, Path]:
    """``dotted name -> file`` of every module of the package at ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports for annotations only, never run."""
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    """The package's modules an import statement loads (``from p import m``: p.m when m is a
    module, else p)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    found = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            found.append(f"{base}.{alias.name}")
        elif base in modules:
            found.append(base)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """``module -> the package's modules it imports``, at module level or inside a function
    or method (anything but ``if TYPE_CHECKING:`` blocks)."""
    modules = module_files(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        pending: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
        while pending:
            node = pending.pop()
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                edges.update(_imported(child, name, path.name == "__init__.py", modules))
                pending.append(child)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_stablelora_has_no_import_cycle():
    graph = import_graph(ROOT / "stablelora")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph(ROOT / "stablelora")
    # build_run imports the model loader inside the function (stablelora/runner/setup.py stays light).
    assert "stablelora.models" in graph["stablelora.runner.setup"]
    assert "stablelora.probes.quantities" in graph["stablelora.probes.gamma"]


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == set()  # typing only: no edge
    assert find_cycle(graph) is None
    (package / "c.py").write_text("class G:\n    def run(self):\n        import pkg.a\n")
    cycle = find_cycle(import_graph(package))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b", "pkg.c"}


def test_analysis_has_no_import_cycle():
    """The analysis too (its table and plot modules register themselves; the report imports
    them): a leaf module (analysis.tables.ordering) holds the display order that both the
    aggregation and the formatting of a table need."""
    graph = import_graph(ROOT / "analysis")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    assert "analysis.tables.ordering" in graph["analysis.tables.formatting"]
