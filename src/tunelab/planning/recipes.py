"""What a recipe adds to an SFT step's memory, from what the recipe declares (``config.recipe.needs``, a
:class:`tunelab.config.sections.RecipeNeeds` set at resolution from the recipe's registration).

* a pair recipe (DPO, a reward model: two rows per example) runs both sides of each pair in one forward: twice
  the rows of the micro-batch; DPO's reference costs no weights (the method switched off, or a precomputed table)
  and a no-grad forward whose activations are freed block by block (not modelled: small next to the trained pass);
* a teacher (distillation) is held in the base dtype, plus one chunk of its logits and its hidden states at the
  trained positions (``training.distill`` never forms all logits of both models).
* a generation phase (GRPO) trains on ``rows_per_example`` rows per prompt, and samples them first: a phase
  holding the weights, the trainable parameters and their optimizer state (gradients are freed between steps),
  the KV cache of ``generation_rows`` rows over prompt + completion positions, and their float32 logits and
  sampling probabilities at the last position (prefill activations are freed layer by layer: not modelled).
"""

from __future__ import annotations

from tunelab.config.schema import RunConfig
from tunelab.training.linear_cross_entropy import chunk_rows


def rows_per_example(config: RunConfig) -> int:
    """Sequences one training example puts in a micro-batch (a GRPO prompt: its group of completions)."""
    return config.recipe.needs.rows_per_example


def completion_positions(config: RunConfig) -> int:
    """Positions a training row holds beyond ``data.max_length``: a GRPO row is its prompt plus a sampled completion."""
    return config.recipe.needs.completion_length


def generation_phase(config: RunConfig, shape, resident: int, kv_bytes: int) -> tuple[int, int, int, str | None]:
    """For a recipe with a generation phase: (bytes of the phase's tensors, its KV cache, its logits, a note);
    zeros and None otherwise. ``resident`` is what stays through it (weights, trainable, optimizer state);
    ``kv_bytes`` the bytes of one cached key or value element."""
    needs = config.recipe.needs
    if not needs.generation_rows:
        return 0, 0, 0, None
    group = needs.rows_per_example
    rows = min(needs.generation_rows, config.train.batch_size * group)
    positions = config.data.max_length + needs.completion_length
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * rows * positions * kv_bytes
    logits = 2 * rows * shape.vocab * 4
    note = (f"recipe {config.recipe.name}: {group} completions per prompt; sampling {rows} rows at a time holds a KV "
            f"cache of {kv / 2**30:.2f} GiB ({positions} positions: max_length + max_completion_length); the time below "
            "counts the training passes only, not the sampling (most of a GRPO step)")
    return resident + kv + logits, kv, logits, note


def teacher_bytes(config: RunConfig, weight_bytes: int, logit_rows: float) -> tuple[int, str | None]:
    """(bytes the teacher adds, a note for the plan) for a recipe that holds one; (0, None) otherwise."""
    from tunelab.planning.shape import load_shape
    from tunelab.runs import open_run

    teacher = config.recipe.needs.teacher
    if not teacher:
        return 0, None
    run = open_run(teacher)
    spec = (str(run.artifact_dir) if run.artifact_dir.name == "model" else run.base_model) if run else teacher
    shape = load_shape(config.model_copy(update={"model": config.model.model_copy(update={"path": spec})}))
    weights = weight_bytes * sum(shape.parameter_table().values())
    extra = int(chunk_rows(shape.vocab) * shape.vocab * 4 + logit_rows * shape.hidden * 4)
    return weights + extra, (f"distillation teacher {teacher}: {weights / 2**30:.2f} GiB of weights and "
                             f"{extra / 2**30:.2f} GiB of its chunked logits and hidden states")
