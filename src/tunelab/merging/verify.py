"""Check that a folded model computes what the tuned model did: logits on held prompts, greedy answers.

A fold is exact in principle (W + BA is the same linear map as W then + BA), so the check is strict:
the largest |difference| of any logit over every prompt token, and the greedy answers token for token.
The prompts are the run's own held-out (eval) conversations where it has them, else the built-in general
probe questions, so a fold that broke something outside the task (an embedding row, a tied weight) shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError

# Largest |Δ logit| accepted per dtype: fp32 folds are exact up to summation order; 16-bit weights round
# the folded sum to 8 (bf16) or 11 (fp16) bits of mantissa.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


@dataclass
class Reference:
    """What the unmerged model computed on the held prompts."""

    source: str
    conversations: list[list[dict]]
    logits: list[torch.Tensor] = field(default_factory=list)  # one (T, V) float32 per prompt
    answers: list[str] = field(default_factory=list)


def held_conversations(run: Any, limit: int) -> tuple[str, list[list[dict]]]:
    """(where they came from, up to ``limit`` conversations to answer): the run's eval examples, else the probe."""
    from tunelab.data import load_examples
    from tunelab.evaluation.report import load_probe
    from tunelab.evaluation.run import split_example

    files = (run.config.get("data") or {}).get("eval") or []
    files = [files] if isinstance(files, str) else list(files)
    if files and all(Path(f).exists() for f in files):
        examples = load_examples(files, **run.data_settings())[:limit]
        conversations = [split_example(e)[0] for e in examples]
        if conversations and all(conversations):
            return f"data.eval ({', '.join(files)})", conversations
    probe = load_probe(True)[:limit]
    return "built-in general probe", [[{"role": "user", "content": item["question"]}] for item in probe]


@torch.no_grad()
def prompt_logits(model: Any, tokenizer: Any, conversations: list[list[dict]]) -> list[torch.Tensor]:
    """Logits (T, V) in float32 over every token of each rendered prompt, one prompt at a time (no padding)."""
    from tunelab.generation import render_prompt

    model.eval()
    device = next(model.parameters()).device
    out = []
    for conversation in conversations:
        ids = torch.tensor([render_prompt(tokenizer, conversation)], device=device)  # (1, T)
        out.append(model(input_ids=ids).logits[0].float().cpu())  # (T, V)
    return out


def reference_of(model: Any, tokenizer: Any, source: str, conversations: list[list[dict]], new_tokens: int) -> Reference:
    """Run the unmerged model on the held prompts (logits and greedy answers) before it is folded."""
    from tunelab.evaluation.generate import generate_answers

    ref = Reference(source, conversations)
    ref.logits = prompt_logits(model, tokenizer, conversations)
    ref.answers = generate_answers(model, tokenizer, conversations, max_new_tokens=new_tokens)
    return ref


def compare(reference: Reference, model: Any, tokenizer: Any, new_tokens: int, tolerance: float) -> dict[str, Any]:
    """The verification part of the merge report: max |Δ logit|, answer agreement, and whether it passed."""
    from tunelab.evaluation.generate import generate_answers

    logits = prompt_logits(model, tokenizer, reference.conversations)
    deltas = []
    for before, after in zip(reference.logits, logits):
        if before.shape != after.shape:
            raise TunelabError(f"merge verification: logits of shape {tuple(after.shape)} after folding, "
                               f"{tuple(before.shape)} before (the vocabulary changed); this is a bug, please report it")
        deltas.append(float((before - after).abs().max()))
    answers = generate_answers(model, tokenizer, reference.conversations, max_new_tokens=new_tokens)
    differing = [{"prompt": c[-1]["content"], "unmerged": a, "merged": b}
                 for c, a, b in zip(reference.conversations, reference.answers, answers) if a != b]
    max_delta = max(deltas, default=0.0)
    return {
        "prompts": reference.source,
        "n_prompts": len(reference.conversations),
        "prompt_tokens": sum(int(t.shape[0]) for t in logits),
        "max_abs_logit_diff": max_delta,
        "tolerance": tolerance,
        "new_tokens": new_tokens,
        "answers_agree": len(answers) - len(differing),
        "answers_differ": differing,
        "passed": max_delta <= tolerance and not differing,
    }
