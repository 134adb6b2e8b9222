"""The loop of the GRPO recipe: sample, score, normalise within groups, update ``num_iterations`` times.

One step of the plan is one round: the step's prompts (``batch_size × grad_accum`` of them) are answered
``G`` times each by the current policy (``training.rollouts``), every reward function scores every
completion (``tunelab.rewards.functions``), advantages are normalised within each prompt's group
(``training.grpo``), and the clipped policy-ratio objective takes ``num_iterations`` optimizer steps on
those samples (the ratio is to the policy that sampled them). Checkpoints fall between rounds, and the
sampling seed is a function of (seed, step), so a resume draws the same completions as an uninterrupted
run. The optional KL term's reference is the policy with its tuning method switched off.

Logged per round: the mean and std of each reward function and of the weighted total, the share of
groups whose rewards are all equal (no learning signal), the mean completion length and how many ran
out of tokens, the clip fraction and the KL; every ``samples_every`` rounds a few completions with their
rewards go to ``samples.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from tunelab.generation import SamplingSettings
from tunelab.training import distributed, hooks
from tunelab.training.grpo import group_advantages, grpo_loss_sum, grpo_normaliser
from tunelab.training.logprobs import token_logprobs, token_logprobs_and_entropy
from tunelab.training.loss import to_device
from tunelab.training.optim import optimizer_step, set_lr
from tunelab.training.reporter import StepReporter
from tunelab.training.rollouts import Rollouts, rollout_batch, sample_rollouts, step_seed
from tunelab.training.state import TrainingState


@dataclass(frozen=True)
class GrpoSettings:
    """The GRPO knobs the loop reads (the recipe's options, as plain values)."""

    num_generations: int
    temperature: float
    top_p: float
    max_completion_length: int
    scale_rewards: str
    epsilon: float
    epsilon_high: float | None
    aggregation: str
    num_iterations: int
    beta: float
    seed: int
    generation_batch_size: int
    samples_every: int


def _micro_batches(rollouts: Rollouts, advantages: torch.Tensor, prompt_groups: list[list[int]], pad_id: int, device):
    """The step's rows split as the plan's micro-batches of prompts (each prompt's whole group together)."""
    g = rollouts.group_size
    out, start = [], 0
    for group in prompt_groups:
        rows = list(range(start * g, (start + len(group)) * g))
        start += len(group)
        batch = to_device(rollout_batch([rollouts.rows[r] for r in rows], pad_id), device)
        out.append({"batch": batch, "advantages": advantages[rows].to(device), "mask": (batch["labels"][:, 1:] != -100)})
    return out


def _logps(model, mb) -> torch.Tensor:
    b = mb["batch"]
    return token_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])


def _with_signal(micro: list[dict], settings: GrpoSettings) -> list[dict]:
    """The micro-batches whose rows carry an advantage (one kept if none does, so the optimizer still steps). Without
    a KL term a micro-batch of zero advantages (groups whose samples all scored the same) adds exactly zero to the
    gradient, so its forward and backward are skipped: the update is the same, the policy statistics (entropy,
    clip ratios) cover the rows trained on. With several processes every rank runs its micro-batches (lockstep)."""
    if settings.beta > 0 or distributed.world().distributed:
        return micro
    return [mb for mb in micro if bool(mb["advantages"].abs().sum() > 0)] or micro[:1]


@torch.no_grad()
def _fixed_logps(model, micro: list[dict], settings: GrpoSettings, disabled: Callable | None) -> None:
    """The sampling policy's log-probabilities (when updated more than once) and the reference's (KL)."""
    for mb in micro:
        if settings.num_iterations > 1:
            mb["old"] = _logps(model, mb)
        if settings.beta > 0 and disabled is not None:
            with disabled(model):
                mb["ref"] = _logps(model, mb)


def _objective(settings: GrpoSettings):
    def loss_fn(model, mb):
        b = mb["batch"]
        logps, entropy = token_logprobs_and_entropy(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss, stats = grpo_loss_sum(logps, mb.get("old", logps.detach()), mb["advantages"], mb["mask"], epsilon=settings.epsilon,
                                    epsilon_high=settings.epsilon_high, aggregation=settings.aggregation,
                                    max_completion_length=settings.max_completion_length, ref_logps=mb.get("ref"),
                                    beta=settings.beta)
        # the policy's entropy over the completion tokens (a collapse towards 0 means it stopped exploring)
        stats = {**stats, "entropy": (entropy * mb["mask"]).sum(), "entropy@n": mb["mask"].sum().float()}
        return loss, 0, stats
    return loss_fn


def _reward_stats(names: list[str], per_fn: torch.Tensor, total: torch.Tensor, zero_share: float, lengths: torch.Tensor,
                  truncated: torch.Tensor) -> dict[str, float]:
    stats = {"reward": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
             "zero_variance_groups": float(zero_share), "completion_length": float(lengths.mean()),
             "truncated": float(truncated.float().mean())}
    for i, name in enumerate(names):
        stats[f"rewards/{name}"] = float(per_fn[:, i].mean())
        stats[f"rewards/{name}_std"] = float(per_fn[:, i].std()) if len(per_fn) > 1 else 0.0
    return stats


@dataclass
class _Scored:
    """A round's rewards over every rank's real prompts (fillers left out), and this rank's advantages."""

    advantages: torch.Tensor  # (this rank's rows,): fillers' rows 0
    zero_share: float
    stats: dict[str, float]


def _score_round(rollouts: Rollouts, per_fn: torch.Tensor, total: torch.Tensor, real_prompts: int, names: list[str],
                 settings: GrpoSettings) -> _Scored:
    """Group-normalised advantages and the logged reward statistics of a round. With several processes the
    rewards of all ranks are gathered first, so ``scale_rewards: batch`` and the statistics are the global
    batch's, as in one process."""
    g = settings.num_generations
    rows = real_prompts * g
    lengths = rollouts.lengths()
    truncated = torch.tensor([c.finish_reason == "length" for c in rollouts.completions])
    mine = (total[:rows].cpu(), per_fn[:rows].cpu(), lengths[:rows], truncated[:rows])
    parts = distributed.gather_objects(mine)
    whole = [torch.cat([p[i] for p in parts]) for i in range(4)]
    advantages, zero_share = group_advantages(whole[0].view(-1, g), settings.scale_rewards)
    start = sum(len(p[0]) for p in parts[: distributed.world().rank])
    own = torch.cat([advantages.reshape(-1)[start : start + rows], torch.zeros(len(total) - rows)])
    return _Scored(own, zero_share, _reward_stats(names, whole[1], whole[0], zero_share, whole[2], whole[3]))


def _write_samples(run_dir: Path, step: int, prompts: list, rollouts: Rollouts, total: torch.Tensor, keep: int = 4) -> None:
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for row in range(0, min(len(rollouts.completions), keep * rollouts.group_size), rollouts.group_size):
            index = rollouts.prompt_index[row]
            sample = {"step": step, "prompt": prompts[index][-1]["content"], "completion": rollouts.completions[row].text,
                      "reward": float(total[row])}
            if hasattr(rollouts, "episodes"):  # a whole episode: every message, and what it cost
                e = rollouts.episodes[row]
                sample.update(messages=e.messages, turns=e.turns, tool_calls=e.tool_calls, tool_errors=e.tool_errors)
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def _sample_and_score(model, tokenizer, prompts: list, fields: list[dict], indices: list[int], rewards, sampling: SamplingSettings,
                      settings: GrpoSettings, episodes, step: int):
    """``(rollouts, per_function (N, F), total (N,), names)`` of one round: single completions, or whole episodes."""
    if episodes is None:
        rollouts = sample_rollouts(model, tokenizer, prompts, indices, group_size=settings.num_generations, settings=sampling,
                                   batch_size=settings.generation_batch_size, tools=[f.get("tools") for f in fields])
        per_fn, total = rewards.score(rollouts.texts, [prompts[i] for i in rollouts.prompt_index],
                                      [fields[i] for i in rollouts.prompt_index])
        return rollouts, per_fn, total, rewards.names
    rollouts = episodes.sample(model, tokenizer, prompts, fields, indices, group_size=settings.num_generations, settings=sampling,
                               batch_size=settings.generation_batch_size, step=step)
    per_fn, total, names = episodes.score(rewards, rollouts, [prompts[i] for i in rollouts.prompt_index],
                                          [fields[i] for i in rollouts.prompt_index])
    return rollouts, per_fn, total, names


def run_grpo(state: TrainingState, prompts: list, fields: list[dict], rewards, *, tokenizer, settings: GrpoSettings,
             disabled: Callable | None, console: Console, episodes=None) -> StepReporter:
    """Train ``state`` by GRPO on ``prompts`` (conversations ending with a user turn; ``fields[i]`` reach the reward
    functions) from its start step; ``disabled(model)`` switches the tuning method off (the KL reference, when
    ``settings.beta`` > 0). With ``episodes`` (a :class:`tunelab.training.episodes.EpisodeSampler`) each sample is a
    multi-turn episode against its environment, and ``rewards`` (or None) score the final answers. Returns the reporter."""
    plan, device, seconds, run_dir = state.plan, state.accelerator.device, state.seconds_spent, state.run_dir
    model = state.accelerator.unwrap_model(state.model)
    loss_fn = _objective(settings)
    with StepReporter(run_dir, plan, state.start_step, console) as reporter:
        for step in range(state.start_step, plan.total):
            started = hooks.clock()
            groups, fillers = [list(ids) for ids in plan.micro_batches(step)], plan.fillers(step)
            indices = [i for group in groups for i in group]
            sampling = SamplingSettings(temperature=settings.temperature, top_p=settings.top_p, seed=step_seed(settings.seed, step),
                                        max_new_tokens=settings.max_completion_length)
            rollouts, per_fn, total, names = _sample_and_score(model, tokenizer, prompts, fields, indices, rewards, sampling,
                                                               settings, episodes, step)
            scored = _score_round(rollouts, per_fn, total, sum(len(gr) for gr in groups[: len(groups) - fillers]),
                                  names, settings)
            micro = _micro_batches(rollouts, scored.advantages, groups, tokenizer.pad_token_id, device)
            count = sum(grpo_normaliser(mb["mask"], settings.aggregation, settings.max_completion_length)
                        for mb in micro[: len(micro) - fillers])  # over every row, those skipped below included
            micro = _with_signal(micro, settings)
            _fixed_logps(model, micro, settings, disabled)
            set_lr(state.optimizer, lr := plan.lr(step, seconds))
            state.model.train()
            for _ in range(settings.num_iterations):
                outcome = optimizer_step(state.model, state.optimizer, state.params.values(), micro, loss_fn,
                                         accelerator=state.accelerator, count=count, max_grad_norm=state.max_grad_norm,
                                         fillers=fillers)
            seconds += hooks.clock() - started
            done = step + 1
            last = plan.is_last(done, seconds)
            reporter.step(done, outcome, lr=lr, last=last, input_tokens=sum(len(r.input_ids) for r in rollouts.rows),
                          reduced={**scored.stats, **(rollouts.stats() if episodes is not None else {})})
            if settings.samples_every and (done % settings.samples_every == 0 or last) and distributed.is_main():
                _write_samples(run_dir, done, prompts, rollouts, total)
            if hooks.finish_step(state, reporter, outcome, done, last, seconds):
                break
    return reporter
