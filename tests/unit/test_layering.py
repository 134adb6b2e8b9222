"""The import rules of the package, checked on its source: every import counts, also those inside functions
and under ``if TYPE_CHECKING`` (``ast.walk`` visits every node of a module).

- ``config`` is the lowest layer: it imports only ``config``, ``errors`` and the shared leaves (``atomic``,
  ``safeyaml``, ``registry``, ``webguard``, ``runs``), never methods, recipes or stages.
- Components (training, data, evaluation, generation, models, methods, runs and the small shared modules)
  never import the layers above them: stages (config → components), planning, recipes, compare, cli.
- stages rank above planning: stages may import planning (the memory plan behind
  ``gradient_checkpointing: auto``), planning never imports stages. Neither imports recipes, compare or cli.
- No import cycle between modules, inside a package too: the graph of every import (``from pkg import name``
  counted as an import of the submodule ``pkg.name`` where there is one) has no cycle.
- No module imports another module's private (``_``-prefixed) names.
- Method knowledge lives in ``methods/``: no comparison with a method's name elsewhere (use the method's
  capability flags and defaults).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunelab
from tunelab.methods import method_names

ROOT = Path(tunelab.__file__).parent
UPPER = ("tunelab.stages", "tunelab.planning", "tunelab.recipes", "tunelab.compare", "tunelab.pipeline", "tunelab.cli", "tunelab.demo",
         "tunelab.resolve", "tunelab.reference")  # the application layer
COMPONENTS = ("training", "data", "evaluation", "generation", "models", "methods", "runs", "merging", "export", "serving", "datagen", "synth", "rewards",
              "atomic.py", "errors.py", "clikit.py", "webguard.py", "safeyaml.py", "registry.py",
              "examples")
FORBIDDEN = {
    **{component: UPPER for component in COMPONENTS},
    # the dashboard is an application: it resolves the configs it launches, and runs everything else as a job
    "ui": tuple(m for m in UPPER if m != "tunelab.resolve"),
    "stages": ("tunelab.recipes", "tunelab.compare", "tunelab.cli", "tunelab.resolve", "tunelab.reference"),
    "planning": ("tunelab.stages", "tunelab.recipes", "tunelab.compare", "tunelab.cli", "tunelab.resolve", "tunelab.reference"),
}
# What config/ may import besides itself: the shared leaves.
CONFIG_MAY_IMPORT = ("tunelab.config", "tunelab.errors", "tunelab.atomic", "tunelab.safeyaml", "tunelab.registry",
                     "tunelab.webguard", "tunelab.runs")


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import in ``path``, relative imports resolved."""
    package = ".".join(("tunelab",) + path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return sorted(found)


def _layer(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def test_components_never_import_the_layers_above_them():
    problems = []
    for path in _modules():
        forbidden = FORBIDDEN.get(_layer(path), ())
        for line, module, _ in _imports(path):
            if any(module == layer or module.startswith(layer + ".") for layer in forbidden):
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_no_module_imports_another_modules_private_names():
    problems = []
    for path in _modules():
        for line, module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if module.startswith("tunelab") and private:
                problems.append(f"{path.relative_to(ROOT)}:{line}: from {module} import {', '.join(private)}")
    assert not problems, "private names imported across modules:\n" + "\n".join(problems)


def test_config_imports_only_config_and_the_shared_leaves():
    paths = {_module_name(path) for path in _modules()}
    problems = []
    for path in _modules():
        if _layer(path) != "config":
            continue
        for line, module, names in _imports(path):
            for target in _targets(module, names, paths):
                inside = target == "tunelab" or any(target == ok or target.startswith(ok + ".") for ok in CONFIG_MAY_IMPORT)
                if target.startswith("tunelab") and not inside:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
    assert not problems, "config/ imports above itself:\n" + "\n".join(problems)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("tunelab",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def _targets(module: str, names: list[str], paths: set[str] | dict[str, Path]) -> list[str]:
    """The modules one import statement runs: ``from pkg import sub`` the submodule pkg.sub where there is
    one, ``from pkg import name`` pkg itself (its ``__init__``)."""
    return list(dict.fromkeys(f"{module}.{n}" if f"{module}.{n}" in paths else module for n in names)) or [module]


def _import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported module: where (``file:line``)}, over the package's own modules only."""
    paths = {_module_name(path): path for path in _modules()}
    graph: dict[str, dict[str, str]] = {name: {} for name in paths}
    for name, path in paths.items():
        for line, module, names in _imports(path):
            for target in _targets(module, names, paths):
                if target in paths and target != name:
                    graph[name].setdefault(target, f"{path.relative_to(ROOT)}:{line}")
    return graph


def _components(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _shortest_cycle(graph: dict[str, dict[str, str]], start: str, members: set[str]) -> list[str]:
    """The shortest chain start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(previous[chain[-1]])
                    return [start, *reversed(chain[:-1]), start] if node != start else [start, start]
                if nxt in members and nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    return []


def _cycles() -> list[str]:
    """Each cycle as ``a -> b -> a`` with where each import is; one shortest cycle through every module of a cycle."""
    graph = _import_graph()
    reports, seen = [], set()
    for component in _components(graph):
        for start in component:
            chain = _shortest_cycle(graph, start, set(component))
            key = frozenset(zip(chain, chain[1:]))
            if key in seen:
                continue
            seen.add(key)
            where = ", ".join(graph[a][b] for a, b in zip(chain, chain[1:]))
            reports.append(f"{' -> '.join(chain)}  ({where})")
    return reports


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def _method_name_comparisons(path: Path, names: set[str]) -> list[str]:
    hits = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            constants = {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
            if constants and constants <= names:  # ({"prompt", "completion"} <= keys is a data format, not a method)
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: compares with method name(s) {sorted(constants & names)}")
    return hits


def test_method_names_are_compared_only_inside_methods():
    names = set(method_names())
    problems = [hit for path in _modules() if _layer(path) != "methods" for hit in _method_name_comparisons(path, names)]
    assert not problems, "method knowledge outside methods/:\n" + "\n".join(problems)


@pytest.mark.parametrize("rule", ["layers", "method names", "planning", "config", "cycles"])
def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch, rule):
    """The checks are not vacuous: a module breaking a rule is reported."""
    bad = tmp_path / "training" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from tunelab.recipes import sft\nif name == 'lora':\n    pass\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    if rule == "layers":
        with pytest.raises(AssertionError, match="training/bad.py:1: imports tunelab.recipes"):
            test_components_never_import_the_layers_above_them()
    elif rule == "method names":
        with pytest.raises(AssertionError, match="bad.py:2: compares with method name"):
            test_method_names_are_compared_only_inside_methods()
    elif rule == "planning":
        (tmp_path / "planning").mkdir()
        (tmp_path / "planning" / "data.py").write_text("def f():\n    from tunelab.stages.setup import tokenize\n")
        with pytest.raises(AssertionError, match="planning/data.py:2: imports tunelab.stages.setup"):
            test_components_never_import_the_layers_above_them()
    elif rule == "config":
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "load.py").write_text("from tunelab.errors import ConfigError\n\n\ndef f():\n"
                                                     "    from tunelab.methods import get_method\n")
        with pytest.raises(AssertionError, match="config/load.py:5: imports tunelab.methods") as caught:
            test_config_imports_only_config_and_the_shared_leaves()
        assert "load.py:1:" not in str(caught.value)  # errors is a shared leaf
    else:  # a cycle inside a package, one edge a function-local import, one through ``from pkg import module``
        (tmp_path / "evaluation").mkdir()
        (tmp_path / "evaluation" / "__init__.py").write_text("")
        (tmp_path / "evaluation" / "metrics.py").write_text("def f():\n    from tunelab.evaluation.sql_exec import run\n")
        (tmp_path / "evaluation" / "sql_exec.py").write_text("from tunelab.evaluation import metrics\n")
        expected = (r"tunelab.evaluation.metrics -> tunelab.evaluation.sql_exec -> tunelab.evaluation.metrics  "
                    r"\(evaluation/metrics.py:2, evaluation/sql_exec.py:1\)")
        with pytest.raises(AssertionError, match=expected):
            test_no_import_cycles()
