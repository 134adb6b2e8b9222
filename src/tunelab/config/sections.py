"""The ``method:`` and ``recipe:`` sections of a resolved run: the entry's own typed options, its name included.

``config/`` knows no method or recipe (it imports nothing above it). A resolver that does (``tunelab.resolve``)
hands :func:`section_class` the registered entry's options class; the section it validates *is* an instance of
that class (``config.method`` is a ``LoraOptions``), with ``name`` beside the options and no other key accepted.
``name`` is left out of ``model_dump()``, so the section dumps exactly as its options object does.

A recipe also declares what ``tunelab plan`` needs to know of it (:class:`RecipeNeeds`: its rows per example,
its generation phase, a teacher it holds); the resolver stores that on the section, so the planner reads it
from the run description and never compares a recipe's name.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model


class RecipeNeeds(BaseModel):
    """What a recipe adds to a training step, in the planner's terms (declared by the recipe's registration)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows_per_example: int = Field(1, ge=1, description="sequences one example puts in a micro-batch (2 for a pair, "
                                  "a GRPO prompt's group of completions)")
    completion_length: int = Field(0, ge=0, description="positions a row holds beyond data.max_length (sampled)")
    generation_rows: int = Field(0, ge=0, description="rows sampled at a time in a generation phase before each "
                              "step; 0: no generation phase")
    teacher: str | None = Field(None, description="a second model held in memory beside the trained one")
    data_defaults: bool = Field(False, description="the run chooses train.defaults: data values from its examples")


class MethodConfig(BaseModel):
    """``name`` picks a registered tuning method; the other keys are that method's options.

    A resolved section is an instance of the method's options class too (:func:`section_class`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("lora", exclude=True)

    def options(self) -> dict[str, Any]:
        """The method options (defaults filled in), without ``name``."""
        return self.model_dump()


class RecipeConfig(BaseModel):
    """``name`` picks a registered recipe (``sft`` by default, ``pretrain``, ...); the other keys are its options.

    A resolved section is an instance of the recipe's options class too (:func:`section_class`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("sft", exclude=True)
    _needs: RecipeNeeds = PrivateAttr(default_factory=RecipeNeeds)

    def options(self) -> dict[str, Any]:
        """The recipe options (defaults filled in), without ``name``."""
        return self.model_dump()

    @property
    def needs(self) -> RecipeNeeds:
        """What the recipe declared for the planner (the defaults until a resolver sets them)."""
        return self._needs

    def declare(self, needs: RecipeNeeds) -> None:
        """Record the recipe's declaration (the resolver, once, from the recipe's registration)."""
        self._needs = needs


@functools.cache
def section_class(options_class: type[BaseModel], base: type[BaseModel]) -> type[BaseModel]:
    """``options_class`` with ``base``'s ``name`` (``MethodConfig`` or ``RecipeConfig``): the resolved section type."""
    return create_model(f"{options_class.__name__}Section", __base__=(options_class, base),
                        __module__=options_class.__module__)
