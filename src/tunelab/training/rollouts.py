"""Rollouts for on-policy training (GRPO): ``G`` sampled completions per prompt, and the token rows they train on.

Sampling goes through ``tunelab.generation`` (batched ``model.generate`` with its KV cache, rows stop at
their end-of-turn token, the chat template of training); every prompt is rendered once and repeated ``G``
times in the batch. The sampling seed is a function of the run's seed and the step, so a resumed run
draws exactly the completions an uninterrupted one would have (the weights at the step are restored
from the checkpoint), with no random state to save.

A rollout row is the rendered prompt followed by the completion's tokens (its end-of-turn token
included when it stopped), labelled ``-100`` on the prompt, so ``training.logprobs`` scores exactly the
sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.collate import collate
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.data.tool_render import render_chat
from tunelab.generation import Completion, SamplingSettings, generate, render_prompt


@dataclass
class Rollouts:
    """``P × G`` completions, group by group (the ``G`` completions of prompt ``i`` at rows ``i*G .. i*G+G-1``)."""

    prompt_index: list[int]  # (N,) which prompt of the step each row answers
    completions: list[Completion]
    rows: list[TokenizedExample]
    group_size: int

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c.token_ids) for c in self.completions], dtype=torch.float32)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of ``step``: distinct per step, the same on a resume."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: list, indices: list[int], *, group_size: int, settings: SamplingSettings,
                    batch_size: int, tools: list | None = None) -> Rollouts:
    """Sample ``group_size`` completions for each of ``prompts[i]`` (conversations), ``i`` in ``indices``; ``tools[i]``
    (when given and not empty) are rendered into prompt ``i`` as training renders them."""
    rendered = {i: render_prompt(tokenizer, render_chat(tokenizer, prompts[i], tools[i], add_generation_prompt=True)
                                 if tools and tools[i] else prompts[i]) for i in indices}
    was_training = model.training
    model.eval()
    cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = True
    completions = generate(model, tokenizer, [rendered[i] for i in indices for _ in range(group_size)], settings,
                           batch_size=batch_size)
    model.config.use_cache = cache
    model.train(was_training)
    rows = []
    for n, (index, completion) in enumerate(zip((i for i in indices for _ in range(group_size)), completions)):
        ids = rendered[index] + list(completion.token_ids)
        labels = [IGNORE_INDEX] * len(rendered[index]) + list(completion.token_ids)
        rows.append(TokenizedExample(ids, labels, f"prompt {index} sample {n % group_size}"))
    return Rollouts([i for i in indices for _ in range(group_size)], completions, rows, group_size)


def rollout_batch(rows: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` of rollout rows (an empty completion scores nothing)."""
    return collate(rows, pad_id)
