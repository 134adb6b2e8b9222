"""Training recipes behind one registry, picked by the config's top-level ``recipe:`` key (default ``sft``).

A recipe is a short linear script, ``main(config, *, resume, force, console) -> TrainResult``, over the
components in ``training/`` and the config stages in ``stages/``; it has its own loop and no base class.
It registers itself with :func:`register_recipe` in :data:`RECIPES` (a :class:`tunelab.registry.Registry`)
together with the pydantic class that validates its options (the ``recipe:`` section) and what it declares
for ``tunelab plan`` (``needs``: its rows per example, its generation phase, a teacher), so adding a recipe
touches its module, one entry in ``_MODULES`` and its tests, never ``cli.py``, the planner or another
recipe's schema.

The registry runs each recipe's ``main`` inside ``stages.run.failures_recorded``, so a run that any error or
Ctrl-C ends is marked failed or interrupted in its manifest, whichever recipe it is. Importing this package
imports no stage, so that resolving a config (``tunelab.resolve``) stays light.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from tunelab.config.sections import RecipeNeeds
from tunelab.registry import Registry

if TYPE_CHECKING:
    from tunelab.stages.training import TrainResult

_MODULES = ("sft", "pretrain", "dpo", "reward", "distill", "grpo")  # importing a recipe module registers it
__all__ = ["RECIPES", "Recipe", "RecipeNeeds", "TrainResult", "get_recipe", "recipe_names", "register_recipe"]


def _plain_step(options: BaseModel) -> RecipeNeeds:
    return RecipeNeeds()


@dataclass(frozen=True)
class Recipe:
    """A registered recipe and what it declares.

    Attributes:
        needs: ``needs(options) -> RecipeNeeds``: what a step of this recipe adds for the planner (default: one
            row per example, no generation phase, no second model).
        trains_fim: it reads ``data.format: fim`` (code files as fill-in-the-middle documents).
    """

    name: str
    options_class: type[BaseModel]
    main: Callable[..., TrainResult]
    summary: str  # one line for `tunelab recipes`
    inspect: Callable[..., None] | None = None  # inspect(config, example_index, console) for `tunelab data inspect`
    needs: Callable[[Any], RecipeNeeds] = _plain_step
    trains_fim: bool = False


RECIPES: Registry[Recipe] = Registry("recipe", modules=tuple(f"tunelab.recipes.{m}" for m in _MODULES))

def register_recipe(recipe: Recipe) -> Recipe:
    """Register ``recipe`` (its ``main`` wrapped to record a failure in the run's manifest); returns what was registered."""
    main = recipe.main

    @functools.wraps(main)
    def recorded(*args, **kwargs) -> TrainResult:
        from tunelab.stages.run import failures_recorded

        with failures_recorded():
            return main(*args, **kwargs)

    return RECIPES.register(recipe.name, dataclasses.replace(recipe, main=recorded))


def get_recipe(name: str) -> Recipe:
    """The registered recipe called ``name``; KeyError (naming the close matches) if there is none."""
    return RECIPES.get(name)


def recipe_names() -> list[str]:
    return RECIPES.names()


def __getattr__(name: str) -> Any:
    # ``from tunelab.recipes import TrainResult`` (the recipe modules) without importing stages at package import.
    if name == "TrainResult":
        from tunelab.stages.training import TrainResult

        return TrainResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
