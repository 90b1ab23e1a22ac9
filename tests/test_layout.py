"""The package's shape: the import graph has no cycle, configuration imports no stage, nothing but the CLI
imports the benches, and the runner that travels to devices imports nothing from the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Modules that are neither stages nor configuration: any layer may import them.
SHARED = {"pipeline", "pipeline.errors", "pipeline.artifacts", "pipeline.console", "pipeline.rundir"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions (a lazy import is still a
    dependency). `from . import x` counts as importing the module x."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n")
    (pkg / "b.py").write_text("from .sub import a\n")
    graph = import_graph(pkg)
    assert graph["pipeline.sub.a"] == {"pipeline.b"} and graph["pipeline.b"] == {"pipeline.sub.a"}
    assert find_cycle(graph) == ["pipeline.b", "pipeline.sub.a", "pipeline.b"]


def test_package_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_configuration_imports_no_stage_module():
    for module, imports in import_graph().items():
        if module.startswith("pipeline.config"):
            stages = sorted(i for i in imports if not i.startswith("pipeline.config") and i not in SHARED)
            assert stages == [], f"{module} imports stage code {stages}"


def test_only_the_cli_imports_the_benches():
    for module, imports in import_graph().items():
        if not module.startswith("pipeline.bench") and module != "pipeline.cli":
            assert not [i for i in imports if i.startswith("pipeline.bench")], module


@pytest.mark.parametrize("module", ["pipeline.measure.ort_runner"])
def test_the_runner_that_travels_to_devices_imports_nothing_from_the_package(module):
    assert import_graph()[module] == set()
