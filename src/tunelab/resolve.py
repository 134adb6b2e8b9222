"""Resolve once: a config file plus ``key=value`` overrides become the typed run description every stage reads.

This is the one place a run config meets the registries. ``config/`` reads and validates the file and knows no
method or recipe (it imports nothing above it); here each section's ``name`` picks the registered method or
recipe, whose own options class validates the section, the recipe declares what the planner needs, and the
method fills in the learning rate the config left out. What it returns is frozen: nothing downstream assigns
into it (a derived description is a copy, ``tunelab.config.schema.updated``). Every problem is reported at once, with its file:line.

It sits in the application layer, above ``config/``, ``methods/`` and the recipes' registry, and below the
commands that load configs (``cli``, ``compare``, ``pipeline``, the dashboard's launch rules). It reads only
what methods and recipes *declare* (``tunelab.methods``, ``tunelab.recipes``: options classes, default rate,
needs), never their implementations, so loading a config imports no torch, transformers or peft and commands
that only read configs (``tunelab plan``, the dashboard) start fast; ``tests/unit/test_light_config.py`` holds it so.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.config.load import problem_at, read_tree, validate_tree
from tunelab.config.schema import RunConfig, updated
from tunelab.errors import ConfigError


def _method_options(name: str):
    from tunelab.methods import METHODS

    return METHODS.capabilities(name)["options_class"]


def _recipe_options(name: str):
    from tunelab.recipes import RECIPES

    return RECIPES.get(name).options_class


OPTIONS_OF = {"method": _method_options, "recipe": _recipe_options}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override, validate and resolve a run configuration.

    Args:
        path: YAML file, or None to start from an empty mapping (overrides only).
        overrides: ``key.sub=value`` strings applied on top of the file.

    Returns:
        The run description: ``config.method`` and ``config.recipe`` are the method's and the recipe's own typed
        options (``name`` included), ``config.recipe.needs`` what the recipe declared for the planner, and
        ``train.lr`` the method's rate where the config left it out.

    Raises:
        ConfigError: with every problem found (unreadable YAML, unknown keys, bad values, bad method or recipe options).
    """
    return resolve_tree(*read_tree(path, overrides))


def resolve_tree(tree: dict, lines: dict | None = None, source: str = "config") -> RunConfig:
    """:func:`load_config` of an already read mapping (``lines``: its keys' lines, for the messages).

    Raises:
        ConfigError: with every problem found.
    """
    lines = lines or {}
    config, problems = validate_tree(tree, lines, source, OPTIONS_OF)
    if config is not None:
        config, declared = _declare(config, lines, source)
        problems += declared
    if problems:
        raise ConfigError(problems, source=source)
    assert config is not None
    return config


def _declare(config: RunConfig, lines: dict, source: str) -> tuple[RunConfig, list[str]]:
    """The config with what the method and the recipe declare filled in; the problems of combining them with the rest."""
    from tunelab.methods import METHODS
    from tunelab.recipes import RECIPES

    recipe = RECIPES.get(config.recipe.name)
    config.recipe.declare(recipe.needs(config.recipe))  # still resolving: nothing has read this config yet
    if config.train.lr is None:
        config = updated(config, train=updated(config.train, lr=METHODS.capabilities(config.method.name)["default_lr"]))
    if config.data.format == "fim" and not recipe.trains_fim:
        readers = " or ".join(name for name, entry in RECIPES.items() if entry.trains_fim)
        return config, [problem_at(lines, source, "data.format", f"data.format fim trains on code files with recipe "
                                   f"{readers} (this is recipe {recipe.name})")]
    return config, []


def validate_method_options(method_tree: dict) -> list[str]:
    """Problems of a ``method`` mapping (``name`` and options) on its own; empty if it is fine."""
    return validate_tree({"method": method_tree, "data": {"train": "-"}}, {}, "config", OPTIONS_OF)[1]
