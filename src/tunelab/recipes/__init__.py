"""Training recipes behind one registry, picked by the config's top-level ``recipe:`` key (default ``sft``).

A recipe is a short linear script, ``main(config, *, resume, force, console) -> TrainResult``, over the
components in ``training/`` and the config stages in ``stages/``; it has its own loop and no base class.
It is declared here, in :data:`RECIPES` (a :class:`tunelab.registry.Registry`), as a :class:`Recipe`: its name,
the module holding its ``main`` (and its ``inspect`` for ``tunelab data inspect``, if it has one), the pydantic
class that validates its options (the ``recipe:`` section, in ``tunelab.recipes.options``), a one-line summary,
and what it declares for ``tunelab plan`` (``needs``: its rows per example, its generation phase, a teacher).
Loading a config reads only that, so it imports no recipe module, stage, torch or transformers; the module is
imported when the recipe runs. Adding a recipe: its options class in ``recipes/options.py``, one
``register_recipe`` line below, its module with ``main``, and its tests; never ``cli.py``, the planner or
another recipe's schema.

:meth:`Recipe.main` runs the module's ``main`` inside ``stages.run.failures_recorded``, so a run that any error
or Ctrl-C ends is marked failed or interrupted in its manifest, whichever recipe it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from tunelab.config.sections import RecipeNeeds
from tunelab.recipes.options import DistillOptions, DpoOptions, GrpoOptions, PretrainOptions, RewardOptions, SftOptions
from tunelab.registry import Registry

if TYPE_CHECKING:
    from rich.console import Console

    from tunelab.config.schema import RunConfig
    from tunelab.stages.training import TrainResult

__all__ = ["RECIPES", "Recipe", "RecipeNeeds", "TrainResult", "get_recipe", "recipe_names", "register_recipe"]


def _plain_step(options: BaseModel) -> RecipeNeeds:
    return RecipeNeeds()


@dataclass(frozen=True)
class Recipe:
    """A declared recipe: where it lives and what it declares, all readable without importing it.

    Attributes:
        module: The module with the recipe's ``main`` and, optionally, its ``inspect(config, example_index,
            console)`` for ``tunelab data inspect``; imported when either is first used.
        needs: ``needs(options) -> RecipeNeeds``: what a step of this recipe adds for the planner (default: one
            row per example, no generation phase, no second model).
        trains_fim: it reads ``data.format: fim`` (code files as fill-in-the-middle documents).
    """

    name: str
    options_class: type[BaseModel]
    module: str
    summary: str  # one line for `tunelab recipes`
    needs: Callable[[Any], RecipeNeeds] = _plain_step
    trains_fim: bool = False

    def main(self, config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
        """Run the recipe (its module's ``main``), its failure or interruption recorded in the run's manifest."""
        from tunelab.stages.run import failures_recorded

        main = importlib.import_module(self.module).main
        with failures_recorded():
            return main(config, resume=resume, force=force, console=console)

    @property
    def inspect(self) -> Callable[..., None] | None:
        """The module's ``inspect(config, example_index, console)``, or None where the recipe has none."""
        return getattr(importlib.import_module(self.module), "inspect", None)


RECIPES: Registry[Recipe] = Registry("recipe")


def register_recipe(recipe: Recipe) -> Recipe:
    """Register ``recipe`` under its name; returns it."""
    return RECIPES.register(recipe.name, recipe)


register_recipe(Recipe("sft", SftOptions, "tunelab.recipes.sft",
                       "supervised fine-tuning on prompt→response examples (loss on the answers)",
                       needs=lambda options: RecipeNeeds(data_defaults=True)))
register_recipe(Recipe("pretrain", PretrainOptions, "tunelab.recipes.pretrain",
                       "continued pre-training on raw text (.txt/.md or a text column), loss on every token",
                       trains_fim=True))
register_recipe(Recipe("dpo", DpoOptions, "tunelab.recipes.dpo",
                       "preference tuning on chosen/rejected pairs (DPO, IPO, hinge, ORPO, SimPO)",
                       needs=lambda options: RecipeNeeds(rows_per_example=2)))
register_recipe(Recipe("reward", RewardOptions, "tunelab.recipes.reward",
                       "reward model on chosen/rejected pairs (scalar head, pairwise loss)",
                       needs=lambda options: RecipeNeeds(rows_per_example=2)))
register_recipe(Recipe("distill", DistillOptions, "tunelab.recipes.distill",
                       "knowledge distillation from a teacher's token distributions (KL, JSD)",
                       needs=lambda options: RecipeNeeds(teacher=options.teacher)))
register_recipe(Recipe("grpo", GrpoOptions, "tunelab.recipes.grpo",
                       "GRPO: reinforcement learning from reward functions (any eval metric)",
                       needs=lambda options: RecipeNeeds(rows_per_example=options.num_generations,
                                                         completion_length=options.max_completion_length,
                                                         generation_rows=options.generation_batch_size)))


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
