"""What a recipe adds to an SFT step's memory, read by recipe name (the planner may not import the recipes).

* pair recipes (``dpo``, ``reward``) run both sides of each pair in one forward: twice the rows of the
  micro-batch; DPO's reference costs no weights (the method switched off, or a precomputed table) and a
  no-grad forward whose activations are freed block by block (not modelled: small next to the trained pass);
* ``distill`` holds the teacher's weights in the base dtype, plus one chunk of its logits and its hidden
  states at the trained positions (``training.distill`` never forms all logits of both models).
"""

from __future__ import annotations

from tunelab.config.schema import RunConfig
from tunelab.training.linear_cross_entropy import chunk_rows

PAIR_RECIPES = frozenset({"dpo", "reward"})


def rows_per_example(config: RunConfig) -> int:
    """Sequences one training example puts in a micro-batch."""
    return 2 if config.recipe.name in PAIR_RECIPES else 1


def teacher_bytes(config: RunConfig, weight_bytes: int, logit_rows: float) -> tuple[int, str | None]:
    """(bytes the teacher adds, a note for the plan) for ``recipe: distill``; (0, None) otherwise."""
    from tunelab.planning.shape import load_shape
    from tunelab.runs import open_run

    teacher = config.recipe.options().get("teacher") if config.recipe.name == "distill" else None
    if not teacher:
        return 0, None
    run = open_run(teacher)
    spec = (str(run.artifact_dir) if run.artifact_dir.name == "model" else run.base_model) if run else teacher
    shape = load_shape(config.model_copy(update={"model": config.model.model_copy(update={"path": spec})}))
    weights = weight_bytes * sum(shape.parameter_table().values())
    extra = int(chunk_rows(shape.vocab) * shape.vocab * 4 + logit_rows * shape.hidden * 4)
    return weights + extra, (f"distillation teacher {teacher}: {weights / 2**30:.2f} GiB of weights and "
                             f"{extra / 2**30:.2f} GiB of its chunked logits and hidden states")
