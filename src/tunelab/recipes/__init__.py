"""Training recipes behind one registry, picked by the config's top-level ``recipe:`` key (default ``sft``).

A recipe is a short linear script, ``main(config, *, resume, force, console) -> TrainResult``, over the
components in ``training/`` and the config stages in ``stages/``; it has its own loop and no base class.
It registers itself with :func:`register_recipe` together with the pydantic class that validates its
options (the ``recipe:`` section), so adding a recipe touches its module, one import below and its
tests, never ``cli.py`` or another recipe's schema.

The registry runs each recipe's ``main`` inside ``stages.run.failures_recorded``, so a run that any error or
Ctrl-C ends is marked failed or interrupted in its manifest, whichever recipe it is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

from pydantic import BaseModel

from tunelab.stages.run import failures_recorded
from tunelab.stages.training import TrainResult

_MODULES = ("sft", "pretrain", "dpo", "reward", "distill", "grpo")  # importing a recipe module registers it
__all__ = ["Recipe", "TrainResult", "get_recipe", "recipe_names", "register_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    options_class: type[BaseModel]
    main: Callable[..., TrainResult]
    summary: str  # one line for `tunelab recipes`
    inspect: Callable[..., None] | None = None  # inspect(config, example_index, console) for `tunelab data inspect`


_REGISTRY: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Register ``recipe`` (its ``main`` wrapped to record a failure in the run's manifest); returns what was registered."""
    if recipe.name in _REGISTRY:
        raise ValueError(f"recipe {recipe.name!r} is registered twice")
    main = recipe.main

    @functools.wraps(main)
    def recorded(*args, **kwargs) -> TrainResult:
        with failures_recorded():
            return main(*args, **kwargs)

    _REGISTRY[recipe.name] = registered = dataclasses.replace(recipe, main=recorded)
    return registered


def _load_all() -> None:
    for module in _MODULES:
        import_module(f"tunelab.recipes.{module}")


def get_recipe(name: str) -> Recipe:
    """The registered recipe called ``name``; KeyError if there is none."""
    _load_all()
    return _REGISTRY[name]


def recipe_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
