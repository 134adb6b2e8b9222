"""Merge rules for models of one family, on plain state dicts of tensors, behind one registry.

Each rule is a function registered by name with :func:`register_merge_rule` (in a
:class:`~tunelab.registry.Registry`, declaring whether it needs the base and uses densities); it receives the base
model's state dict (``None`` where a rule does not need one), the models to merge (each a
:class:`MergeInput`: its state dict, ``weight`` and ``density``), ``lambda_`` (the scale of the merged
task vector) and ``seed`` (for the random drops of DARE). A *task vector* is a model's weights minus the
base's, tau_i = theta_i - theta_base. Rules work one tensor at a time, so memory stays at a few copies of
the largest tensor; :func:`merge_state_dicts` checks that every state dict has the same names, shapes
and dtypes first (``tunelab.merging.checks``) and computes in float32 (float64 stays float64), casting
back to the models' dtype.

Written here rather than taken from mergekit, whose licence (LGPL-3.0) the project does not take on,
and because peft's ``add_weighted_adapter`` merges LoRA factors, not whole models.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError
from tunelab.merging.checks import check_state_dicts
from tunelab.registry import Registry

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MergeInput:
    """One model to merge: its weights and how it takes part.

    Attributes:
        state: Parameter name -> tensor, as ``model.state_dict()`` gives it.
        weight: Its share of the merge (relative weight for ``linear`` and TIES, a multiplier of its task
            vector for task arithmetic and DARE).
        density: Fraction of its task-vector entries kept (TIES: the largest by magnitude; DARE: random).
        name: Shown in error messages.
    """

    state: StateDict
    weight: float = 1.0
    density: float = 1.0
    name: str = "model"


# A rule merges one tensor: (base tensor or None, the models' tensors, their inputs, lambda_, a generator
# factory seeded for this tensor and model index) -> merged tensor, all in the compute dtype.
TensorRule = Callable[[torch.Tensor | None, list[torch.Tensor], list[MergeInput], float, Callable[[int], torch.Generator]], torch.Tensor]


@dataclass(frozen=True)
class MergeRule:
    """A registered rule: its per-tensor function, its one-line summary and what it declared.

    Attributes:
        needs_base: It merges task vectors, so it needs the base model.
        uses_density: It drops task-vector entries by each model's ``density`` (others would ignore one).
        averages: It is a weighted average of whole weights: no task vector for ``lambda_`` to scale, and
            the weights must not sum to 0.
    """

    name: str
    function: TensorRule
    needs_base: bool
    summary: str
    uses_density: bool = False
    averages: bool = False


MERGE_RULES: Registry[MergeRule] = Registry("merge method")


def register_merge_rule(name: str, *, needs_base: bool = True, uses_density: bool = False,
                        averages: bool = False) -> Callable[[TensorRule], TensorRule]:
    """Function decorator: register a per-tensor merge rule under ``name`` (its docstring's first line is its summary)."""

    def register(function: TensorRule) -> TensorRule:
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        MERGE_RULES.register(name, MergeRule(name, function, needs_base, summary, uses_density, averages),
                             needs_base=needs_base, uses_density=uses_density, averages=averages)
        return function

    return register


def merge_rule_names() -> list[str]:
    """The names of the registered merge rules, sorted."""
    return MERGE_RULES.names()


def get_merge_rule(name: str) -> MergeRule:
    """The rule registered as ``name``; a TunelabError naming the close matches and the rules when there is none."""
    rule = MERGE_RULES.find(name)
    if rule is None:
        raise TunelabError(MERGE_RULES.unknown(name))
    return rule


def merge_state_dicts(method: str, base: StateDict | None, models: list[MergeInput], *, lambda_: float = 1.0,
                      seed: int = 0) -> StateDict:
    """Merge ``models`` (and ``base``) with the rule called ``method``; the inputs are not modified.

    Args:
        method: A registered rule: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``.
        base: The base model's state dict; required by every rule but ``linear``.
        models: The fine-tuned models, at least one.
        lambda_: Scale of the merged task vector (ignored by ``linear``).
        seed: Seed of DARE's random drops; the same seed gives the same merge on any machine.

    Raises:
        TunelabError: An unknown rule, a missing base, bad weights or densities, or state dicts that differ
            in parameter names, shapes or dtypes (named in the message).
    """
    rule = get_merge_rule(method)
    _check_inputs(rule, base, models)
    check_state_dicts(base, models)
    reference = base if base is not None else models[0].state
    merged: StateDict = {}
    first_of_storage: dict[tuple, str] = {}
    states = ([base] if base is not None else []) + [m.state for m in models]
    for name, tensor in reference.items():
        # Tied parameters (input and output embedding) share storage: merge them once, so that a random
        # rule cannot untie them by drawing two different masks. Only where every input ties them alike.
        key = (tuple(tensor.shape), *((s[name].untyped_storage().data_ptr(), s[name].storage_offset()) for s in states)) \
            if tensor.numel() else None
        if key in first_of_storage:
            merged[name] = merged[first_of_storage[key]]
            continue
        if key is not None:
            first_of_storage[key] = name
        merged[name] = _merge_tensor(rule, name, base, models, lambda_, seed)
    return merged


def _check_inputs(rule: MergeRule, base: StateDict | None, models: list[MergeInput]) -> None:
    if not models:
        raise TunelabError(f"merge {rule.name}: give at least one model to merge")
    if rule.needs_base and base is None:
        raise TunelabError(f"merge {rule.name}: needs the base model (task vectors are differences from it); give base")
    for m in models:
        if not 0.0 < m.density <= 1.0:
            raise TunelabError(f"merge {rule.name}: {m.name} has density {m.density}; give a fraction in (0, 1]")
    if rule.averages and abs(sum(m.weight for m in models)) < 1e-12:
        raise TunelabError(f"merge {rule.name}: the weights sum to 0, so there is no weighted average; give weights with a "
                           "non-zero sum")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge_tensor(rule: MergeRule, name: str, base: StateDict | None, models: list[MergeInput], lambda_: float,
                  seed: int) -> torch.Tensor:
    reference = base[name] if base is not None else models[0].state[name]
    if not reference.is_floating_point():
        return reference.clone()  # integer buffers (ids, counters) are equal in every model: checked
    dtype = _compute_dtype(reference.dtype)
    base_tensor = base[name].to(dtype) if base is not None else None
    tensors = [m.state[name].to(dtype) for m in models]

    def generator(model_index: int) -> torch.Generator:
        # A generator per (seed, tensor name, model): the drops of one tensor do not depend on how many
        # tensors came before it or on the order of the state dict. crc32, not hash(): str hashes are salted.
        g = torch.Generator(device="cpu")
        g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + model_index) % (2**63))
        return g

    return rule.function(base_tensor, tensors, models, lambda_, generator).to(reference.dtype)


def _weights(models: list[MergeInput], like: torch.Tensor) -> torch.Tensor:
    """The models' weights as a (N, 1, ..., 1) tensor that broadcasts over stacked tensors (N, *shape)."""
    return torch.tensor([m.weight for m in models], dtype=like.dtype).view(-1, *([1] * like.dim()))


def trim_top_magnitude(task: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` entries of ``task`` largest in magnitude; zero the rest."""
    if density >= 1.0:
        return task
    keep = round(density * task.numel())
    flat = task.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[flat.abs().topk(keep).indices] = True
    return (flat * mask).reshape(task.shape)


def dare_drop(task: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``1 - density`` and scale the survivors by ``1 / density``,
    so the expected value of every entry is unchanged (Yu et al. 2023)."""
    if density >= 1.0:
        return task
    keep = torch.rand(task.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, task / density, torch.zeros_like(task))


def elect_and_mean(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean over stacked task vectors ``tasks`` (N, *shape).

    The elected sign of an entry is the sign of its total weighted mass sum_i w_i tau_i (+ where the
    mass is 0); the result is the weighted mean sum_i w_i tau_i / sum_i |w_i| over the models whose
    weighted entry is non-zero and has the elected sign, 0 where none has. With equal weights this is the
    paper's disjoint mean.
    """
    weighted = tasks * weights  # (N, *shape)
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(tasks.dtype)  # (*shape)
    agrees = (torch.sign(weighted) == elected).to(tasks.dtype)  # (N, *shape); 0 entries never agree
    total_weight = (agrees * weights.abs()).sum(dim=0)
    merged = (weighted * agrees).sum(dim=0)
    return torch.where(total_weight != 0, merged / torch.where(total_weight != 0, total_weight, 1.0), torch.zeros_like(merged))


@register_merge_rule("linear", needs_base=False, averages=True)
def linear(base, tensors, models, lambda_, generator) -> torch.Tensor:
    """Weighted average of the models' weights: sum_i w_i theta_i / sum_i w_i (Wortsman et al. 2022, model soups, arXiv:2203.05482)."""
    stacked = torch.stack(tensors)  # (N, *shape)
    weights = _weights(models, tensors[0])
    return (stacked * weights).sum(dim=0) / weights.sum()


@register_merge_rule("task_arithmetic")
def task_arithmetic(base, tensors, models, lambda_, generator) -> torch.Tensor:
    """theta = base + lambda * sum_i w_i (theta_i - base) (Ilharco et al. 2023, arXiv:2212.04089)."""
    tasks = torch.stack([t - base for t in tensors])  # (N, *shape)
    return base + lambda_ * (tasks * _weights(models, base)).sum(dim=0)


@register_merge_rule("ties", uses_density=True)
def ties(base, tensors, models, lambda_, generator) -> torch.Tensor:
    """TIES (Yadav et al. 2023, arXiv:2306.01708): trim each task vector to its top-density entries by
    magnitude, elect each entry's sign by total mass, average the entries that agree, add lambda * that."""
    tasks = torch.stack([trim_top_magnitude(t - base, m.density) for t, m in zip(tensors, models)])  # (N, *shape)
    return base + lambda_ * elect_and_mean(tasks, _weights(models, base))


@register_merge_rule("dare_linear", uses_density=True)
def dare_linear(base, tensors, models, lambda_, generator) -> torch.Tensor:
    """DARE (Yu et al. 2023, arXiv:2311.03099): drop each task-vector entry with probability 1 - density,
    rescale the survivors by 1 / density, then base + lambda * sum_i w_i tau_i."""
    tasks = torch.stack([dare_drop(t - base, m.density, generator(i)) for i, (t, m) in enumerate(zip(tensors, models))])
    return base + lambda_ * (tasks * _weights(models, base)).sum(dim=0)


@register_merge_rule("dare_ties", uses_density=True)
def dare_ties(base, tensors, models, lambda_, generator) -> torch.Tensor:
    """DARE (Yu et al. 2023, arXiv:2311.03099) then TIES: random drop and rescale in place of TIES' trim,
    then sign election and the disjoint mean, base + lambda * that."""
    tasks = torch.stack([dare_drop(t - base, m.density, generator(i)) for i, (t, m) in enumerate(zip(tensors, models))])
    return base + lambda_ * elect_and_mean(tasks, _weights(models, base))
