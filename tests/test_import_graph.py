"""Imports inside gensar_core point one way: no cycle among its modules (imports inside functions
counted), the model layer never reaches the pipeline, and an import sits inside a function only
where deferring a heavy package is deliberate and the module says why."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gensar_core"
# packages slow enough to import that a module may defer them on purpose
HEAVY = {"torch", "transformers", "pyspark", "airflow", "mlflow", "matplotlib", "peft", "sentence_transformers"}
# the pipeline defers every step's module: the DAG file imports it at each Airflow parse
DEFERS_STEPS = {"gensar_core.pipeline"}


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import in the file; `from a import b`
    names `a.b` when that is a module of the package, else `a`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = module_names()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) not in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full if full in modules else base, id(node) not in top))
    return out


def internal(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in imports(path, name):
            if target.startswith("gensar_core"):
                found = internal(target, modules)
                if found and found != name:
                    graph[name].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_gensar_core_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_model_layer_does_not_import_the_pipeline():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t == "gensar_core.pipeline")
           for m, targets in graph.items() if m.startswith("gensar_core.model")}
    assert not {m: t for m, t in bad.items() if t}


@pytest.mark.parametrize("name", sorted(module_names()))
def test_imports_sit_at_the_top_unless_a_heavy_one_is_deferred_on_purpose(name):
    path = module_names()[name]
    inner = sorted({target for target, in_function in imports(path, name) if in_function})
    allowed = {t for t in inner if t.split(".")[0] in HEAVY or name in DEFERS_STEPS}
    assert set(inner) == allowed, f"{path.name}: move these imports to the top: {sorted(set(inner) - allowed)}"
    if inner:
        text = path.read_text().lower()
        assert "deferred" in text or "deliberately" in text, f"{path.name} defers {inner} without saying why"
