"""What a recipe adds to an SFT step's memory, read by recipe name (the planner may not import the recipes).

* pair recipes (``dpo``, ``reward``) run both sides of each pair in one forward: twice the rows of the
  micro-batch; DPO's reference costs no weights (the method switched off, or a precomputed table) and a
  no-grad forward whose activations are freed block by block (not modelled: small next to the trained pass);
* ``distill`` holds the teacher's weights in the base dtype, plus one chunk of its logits and its hidden
  states at the trained positions (``training.distill`` never forms all logits of both models).
* ``grpo`` trains on ``num_generations`` rows per prompt, and samples them first: a generation phase holding
  the weights, the trainable parameters and their optimizer state (gradients are freed between steps), the
  KV cache of ``generation_batch_size`` rows over prompt + completion positions, and their float32 logits
  and sampling probabilities at the last position (prefill activations are freed layer by layer: not modelled).
"""

from __future__ import annotations

from tunelab.config.schema import RunConfig
from tunelab.training.linear_cross_entropy import chunk_rows

PAIR_RECIPES = frozenset({"dpo", "reward"})
# recipes/grpo.py's GrpoOptions defaults (the planner may not import recipes; tests/unit/test_planning.py checks them)
GRPO_DEFAULTS = {"num_generations": 4, "max_completion_length": 64, "generation_batch_size": 32}


def grpo_option(config: RunConfig, key: str) -> int:
    return int(config.recipe.options().get(key, GRPO_DEFAULTS[key]))


def rows_per_example(config: RunConfig) -> int:
    """Sequences one training example puts in a micro-batch (a GRPO prompt: its group of completions)."""
    if config.recipe.name == "grpo":
        return grpo_option(config, "num_generations")
    return 2 if config.recipe.name in PAIR_RECIPES else 1


def completion_positions(config: RunConfig) -> int:
    """Positions a training row holds beyond ``data.max_length``: a GRPO row is its prompt plus a sampled completion."""
    return grpo_option(config, "max_completion_length") if config.recipe.name == "grpo" else 0


def generation_phase(config: RunConfig, shape, resident: int, kv_bytes: int) -> tuple[int, int, int, str | None]:
    """For ``recipe: grpo``: (bytes of the generation phase's tensors, its KV cache, its logits, a note);
    zeros and None otherwise. ``resident`` is what stays through it (weights, trainable, optimizer state);
    ``kv_bytes`` the bytes of one cached key or value element."""
    if config.recipe.name != "grpo":
        return 0, 0, 0, None
    group = grpo_option(config, "num_generations")
    rows = min(grpo_option(config, "generation_batch_size"), config.train.batch_size * group)
    positions = config.data.max_length + grpo_option(config, "max_completion_length")
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * rows * positions * kv_bytes
    logits = 2 * rows * shape.vocab * 4
    note = (f"recipe grpo: {group} completions per prompt; sampling {rows} rows at a time holds a KV cache of "
            f"{kv / 2**30:.2f} GiB ({positions} positions: max_length + max_completion_length); the time below counts the "
            "training passes only, not the sampling (most of a GRPO step)")
    return resident + kv + logits, kv, logits, note


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
