"""The import rules of the package, checked on its source (every import, also those inside functions).

- Components (training, data, evaluation, generation, models, methods, runs and the small shared modules)
  never import the layers above them: stages (config → components), planning, recipes, compare, cli.
- stages and planning never import recipes, compare or cli.
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
UPPER = ("tunelab.stages", "tunelab.planning", "tunelab.recipes", "tunelab.compare", "tunelab.pipeline", "tunelab.cli", "tunelab.demo")
COMPONENTS = ("training", "data", "evaluation", "generation", "models", "methods", "runs", "merging", "export", "serving", "datagen", "synth", "ui", "rewards",
              "atomic.py", "errors.py", "clikit.py", "webguard.py", "safeyaml.py", "registry.py",
              "examples")
FORBIDDEN = {
    **{component: UPPER for component in COMPONENTS},
    "stages": ("tunelab.recipes", "tunelab.compare", "tunelab.cli"),
    "planning": ("tunelab.recipes", "tunelab.compare", "tunelab.cli"),
}


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
    return found


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


@pytest.mark.parametrize("rule", ["layers", "method names"])
def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch, rule):
    """The checks are not vacuous: a module breaking a rule is reported."""
    bad = tmp_path / "training" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from tunelab.recipes import sft\nif name == 'lora':\n    pass\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    if rule == "layers":
        with pytest.raises(AssertionError, match="training/bad.py:1: imports tunelab.recipes"):
            test_components_never_import_the_layers_above_them()
    else:
        with pytest.raises(AssertionError, match="bad.py:2: compares with method name"):
            test_method_names_are_compared_only_inside_methods()
