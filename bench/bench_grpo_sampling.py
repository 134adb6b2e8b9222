"""GRPO's sampling, the part that dominates its step time: tunelab's group sampling against plain ``generate``.

The same prompts (the SQL task's first training questions, rendered with the model's chat template), the same
group size, temperature 1, the same token budget; three ways:

- ``one_at_a_time``: plain transformers, one ``model.generate`` call per completion (a loop over prompts x
  group), the way a hand-written GRPO loop often starts;
- ``hf_grouped``: plain transformers, one ``generate`` call per prompt with ``num_return_sequences = group``;
- ``tunelab``: ``training.rollouts.sample_rollouts`` (what ``recipe: grpo`` runs): every prompt x group row
  in batches of ``--batch-size``, finished rows stopped, the prompt encoded once per row.

The figure is completions per second and generated tokens per second of wall time (sampled completions are
not the same across the three: only their count and token budget are).

    python bench/bench_grpo_sampling.py                          # SmolLM2-135M, 8 prompts x 8 samples, 40 tokens
    python bench/bench_grpo_sampling.py --model tiny --prompts 2 --group 2 --max-new-tokens 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def load(model: str, folder: Path):
    from tunelab.data.templates import prepare_tokenizer
    from tunelab.models.load import load_model, load_tokenizer, resolve_model_path

    if model == "tiny":
        from tunelab.models.tiny import save_tiny_model

        path = str(save_tiny_model(folder / "tiny", "llama"))
    else:
        path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    prepare_tokenizer(tokenizer, "auto")
    return load_model(path, "float32").eval(), tokenizer


def prompts(n: int) -> list[list[dict]]:
    from tunelab.data import load_examples

    here = Path(__file__).resolve().parents[1] / "src/tunelab/examples/sql/train.jsonl"
    return [list(e.messages[:-1]) for e in load_examples([str(here)])[:n]]


def plain(model, tokenizer, conversations, group: int, new_tokens: int, grouped: bool) -> tuple[int, int]:
    """(completions, generated tokens) with plain ``generate``: per completion, or per prompt with a group."""
    import torch

    from tunelab.generation import render_prompt

    done = tokens = 0
    for conversation in conversations:
        ids = torch.tensor([render_prompt(tokenizer, conversation)])
        for _ in range(1 if grouped else group):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                                 max_new_tokens=new_tokens, num_return_sequences=group if grouped else 1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, ids.shape[1]:]:
                done += 1
                tokens += int((row != tokenizer.pad_token_id).sum())
    return done, tokens


def ours(model, tokenizer, conversations, group: int, new_tokens: int, batch_size: int) -> tuple[int, int]:
    from tunelab.generation import SamplingSettings
    from tunelab.training.rollouts import sample_rollouts

    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=0)
    rollouts = sample_rollouts(model, tokenizer, conversations, list(range(len(conversations))), group_size=group,
                               settings=settings, batch_size=batch_size)
    return len(rollouts.completions), sum(len(c.token_ids) for c in rollouts.completions)


def main() -> None:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench_grpo_sampling.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(args.model, Path(tmp))
        conversations = prompts(args.prompts)
        results = {}
        for name, run in (("one_at_a_time", lambda: plain(model, tokenizer, conversations, args.group, args.max_new_tokens, False)),
                          ("hf_grouped", lambda: plain(model, tokenizer, conversations, args.group, args.max_new_tokens, True)),
                          ("tunelab", lambda: ours(model, tokenizer, conversations, args.group, args.max_new_tokens, args.batch_size))):
            started = time.perf_counter()
            with torch.no_grad():
                completions, tokens = run()
            seconds = time.perf_counter() - started
            results[name] = {"completions": completions, "tokens": tokens, "seconds": round(seconds, 2),
                             "completions_per_s": round(completions / seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
            print(name, results[name], flush=True)
    report = {"model": args.model, "prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
