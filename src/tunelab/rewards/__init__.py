"""Score completions from Python with a trained reward model (a ``recipe: reward`` run).

    >>> from tunelab import rewards
    >>> rm = rewards.load("runs/reward")
    >>> rm.score(["How many orders?"], ["SELECT COUNT(*) FROM orders;"])
    [1.73]

A prompt is a string (one user turn) or a list of chat messages ending with a user turn; the completion is
rendered as the assistant's answer with the run's own chat template, exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError

if TYPE_CHECKING:  # torch stays unimported here: the reward worker (rewards.guard) starts without it
    import torch

__all__ = ["RewardModel", "load"]


@dataclass
class RewardModel:
    model: Any
    head: torch.nn.Module
    tokenizer: Any
    max_length: int = 1024

    def score(self, prompts: list[str | list[dict]], completions: list[str], *, batch_size: int = 8) -> list[float]:
        """One float per (prompt, completion); higher is preferred."""
        import torch

        with torch.no_grad():
            return self._score(prompts, completions, batch_size)

    def _score(self, prompts: list[str | list[dict]], completions: list[str], batch_size: int) -> list[float]:
        from tunelab.data import collate
        from tunelab.data.records import Example
        from tunelab.data.tokenize import tokenize_examples
        from tunelab.training.reward_model import scores

        if len(prompts) != len(completions):
            raise TunelabError(f"score: {len(prompts)} prompts but {len(completions)} completions; give one completion per prompt")
        examples = [Example((*_context(p), {"role": "assistant", "content": c}), f"item {i}")
                    for i, (p, c) in enumerate(zip(prompts, completions))]
        tokenized, _ = tokenize_examples(examples, self.tokenizer, loss_on="last_turn", max_length=self.max_length)
        device = next(self.head.parameters()).device
        out: list[float] = []
        for start in range(0, len(tokenized), batch_size):
            batch = collate(tokenized[start: start + batch_size], self.tokenizer.pad_token_id)
            out += scores(self.model, self.head, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        return out


def _context(prompt: str | list[dict]) -> tuple[dict, ...]:
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},)
    if not prompt or prompt[-1].get("role") != "user":
        raise TunelabError("score: a prompt given as messages must end with a user turn")
    return tuple(prompt)


def load(run_dir: str | Path) -> RewardModel:
    """The reward model a ``recipe: reward`` run saved (its base, its method's artifact and its head)."""
    from tunelab.evaluation.run import load_for_eval
    from tunelab.runs import open_run
    from tunelab.training.reward_model import HEAD_FILE, load_head

    run = open_run(run_dir)
    if run is None or not (run.artifact_dir / HEAD_FILE).is_file():  # what a reward run saves, whatever its recipe
        raise TunelabError(f"{run_dir}: not a `recipe: reward` run directory (no {HEAD_FILE} beside its artifact; its "
                           f"manifest says recipe {(run.record.recipe if run else None)!r}); train one with recipe: reward")
    loaded = load_for_eval(str(run_dir))
    loaded.model.eval()
    max_length = int((run.config.get("data") or {}).get("max_length", 1024))
    return RewardModel(loaded.model, load_head(run.artifact_dir).eval(), loaded.tokenizer, max_length)
