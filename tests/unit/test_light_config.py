"""Loading a config imports only ``config/`` and what the methods and recipes declare: never torch, transformers or
peft, nor a method's or recipe's implementation. Commands that only read configs (``tunelab plan``, the dashboard's
launch checks, ``tunelab compare``) stay fast, and a heavy import creeping into an options class is caught here.

Each config loads in a fresh interpreter, so what an earlier test imported does not hide it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab

REPO = Path(__file__).resolve().parents[2]
SRC = Path(tunelab.__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets")
# The modules loading a run config may import: the schema, the shared leaves, and the declarations of the methods,
# recipes and preference losses (their options classes, needs, default rates).
ALLOWED = {
    "tunelab", "tunelab.config", "tunelab.config.load", "tunelab.config.schema", "tunelab.config.sections",
    "tunelab.errors", "tunelab.registry", "tunelab.safeyaml", "tunelab.resolve",
    "tunelab.methods", "tunelab.methods.base", "tunelab.methods.options",
    "tunelab.recipes", "tunelab.recipes.options",
    "tunelab.training", "tunelab.training.preference_options", "tunelab.rewards", "tunelab.rewards.guard",
}
# A pipeline file names its stages' configs and is loaded by its own reader, which also checks synthesis settings.
ALLOWED_PIPELINE = ALLOWED | {"tunelab.pipeline", "tunelab.pipeline.spec", "tunelab.synth", "tunelab.synth.settings"}

_PROBE = """
import glob, json, sys
path, kind = sys.argv[1], sys.argv[2]
if kind == "pipeline":
    from tunelab.pipeline.spec import load_pipeline
    load_pipeline(path)
else:
    from tunelab.resolve import load_config
    for config in sorted(glob.glob(path + "/*.yaml")) if kind == "folder" else [path]:
        load_config(config)
print(json.dumps(sorted(sys.modules)))
"""


def _imported(path: Path, kind: str) -> list[str]:
    """Every module a fresh interpreter has imported after loading ``path`` (a ``run`` or ``pipeline`` file, or a
    ``folder`` of run configs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path), kind], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _problems(modules: list[str], allowed: set[str]) -> list[str]:
    heavy = sorted({m.split(".")[0] for m in modules if m.split(".")[0] in HEAVY})
    return heavy + [m for m in modules if m.startswith("tunelab") and m not in allowed]


def _is_pipeline(path: Path) -> bool:
    return any(line.startswith("stages:") for line in path.read_text(encoding="utf-8").splitlines())


def test_there_are_configs_of_every_kind():
    assert CONFIGS and any(_is_pipeline(p) for p in CONFIGS) and not all(_is_pipeline(p) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_loading_a_shipped_config_imports_only_config_and_declarations(path):
    kind = "pipeline" if _is_pipeline(path) else "run"
    problems = _problems(_imported(path, kind), ALLOWED_PIPELINE if kind == "pipeline" else ALLOWED)
    assert not problems, f"loading {path.name} imported {problems}: keep what config loading reads in the declarations"


def test_every_method_with_every_recipe_loads_light(tmp_path):
    """Each declared method and recipe, not only those the shipped configs use."""
    from tunelab.methods import method_names
    from tunelab.recipes import recipe_names

    for method in method_names():
        for recipe in recipe_names():
            (tmp_path / f"{method}-{recipe}.yaml").write_text(
                f"model: tiny\nmethod: {{name: {method}}}\nrecipe: {recipe}\ndata: {{train: train.jsonl}}\n", encoding="utf-8")
    problems = _problems(_imported(tmp_path, "folder"), ALLOWED)
    assert not problems, f"loading a config imported {problems}"


def test_the_check_catches_a_heavy_import():
    assert _problems(["torch.nn", "tunelab.methods.lora", "tunelab.resolve"], ALLOWED) == ["torch", "tunelab.methods.lora"]


def test_a_declared_entry_is_imported_only_when_it_is_got(tmp_path, monkeypatch):
    from tunelab.registry import Registry

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "declared_entry_mod.py").write_text(
        "from tunelab_test_registry import REG\nREG.register('one', 'the entry', extra=2)\n", encoding="utf-8")
    (tmp_path / "declared_nothing_mod.py").write_text("", encoding="utf-8")
    registry = Registry("thing")
    monkeypatch.setitem(sys.modules, "tunelab_test_registry", type(sys)("tunelab_test_registry"))
    sys.modules["tunelab_test_registry"].REG = registry
    registry.declare("one", "declared_entry_mod", light=1)
    registry.declare("two", "declared_nothing_mod")
    assert registry.names() == ["one", "two"] and "one" in registry
    assert registry.capabilities("one") == {"light": 1} and "declared_entry_mod" not in sys.modules
    assert registry.get("one") == "the entry" and registry.capabilities("one") == {"light": 1, "extra": 2}
    with pytest.raises(LookupError, match="declared_nothing_mod was declared to register it"):
        registry.get("two")
    with pytest.raises(ValueError, match="registered twice"):
        registry.declare("one", "declared_entry_mod")
    with pytest.raises(KeyError, match="did you mean 'one'"):
        registry.capabilities("onee")
    registry.declare("three", "declared_nothing_mod", light=1)
    with pytest.raises(ValueError, match="registers light other than it was declared with"):
        registry.register("three", "x", light=2)
    monkeypatch.delitem(sys.modules, "declared_entry_mod")
