"""Agentic GRPO's rollout: tunelab's batched multi-turn episodes against one episode at a time with plain ``generate``.

The same prompts (the SQL task's orders questions), the same environment (``tunelab.rewards.tool_envs:ShopSql``:
``run_sql`` over the shop database, in its guarded worker), the same group size, temperature 1, turn limit and
token budget per turn; two ways:

- ``one_at_a_time``: plain transformers, the loop a hand-written agent starts with: for each episode, render the
  conversation with the tools, one ``model.generate`` call, parse the tool calls, run them, append the results,
  render again, until the model answers without a call or the turn limit;
- ``tunelab``: ``training.episodes.EpisodeSampler.sample`` (what ``recipe: grpo`` with ``recipe.environment``
  runs): each turn one batched ``generate`` over the episodes still running, every episode's ids kept as played.

The figure is episodes per second of wall time, with the turns, tool calls and generated tokens per episode
beside it (the episodes sampled are not the same across the two: only their count and budgets are). A model
that never calls the tool makes this the single-turn sampling bench: use one that calls it (the SQL agent's SFT
step, merged: ``tunelab merge runs/smollm2-sql-agent-sft``).

    python bench/bench_episodes.py --model runs/smollm2-sql-agent-sft/merged     # 8 prompts x 8 episodes, 3 turns
    python bench/bench_episodes.py --model tiny --prompts 2 --group 2 --max-new-tokens 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grpo_sampling import load  # noqa: E402


def prompts(n: int) -> tuple[list[list[dict]], list[dict]]:
    from tunelab.data import load_examples

    here = Path(__file__).resolve().parents[1] / "src/tunelab/examples/sql/orders_train.jsonl"
    examples = load_examples([str(here)])[:n]
    return [list(e.messages[:-1]) for e in examples], [{"answer": e.messages[-1]["content"]} for e in examples]


def plain(model, tokenizer, env, conversations, group: int, turns: int, new_tokens: int) -> dict:
    """Episodes played one at a time, each turn a ``generate`` call on the rendered conversation."""
    import torch

    from tunelab.data.tool_parse import parse_tool_calls
    from tunelab.data.tool_render import render_chat

    stats = {"episodes": 0, "turns": 0, "tool_calls": 0, "tokens": 0}
    for index, conversation in enumerate(conversations):
        for g in range(group):
            key = f"plain:{index}:{g}"
            messages = env.reset(key, {"messages": conversation}, g, "bench") or list(conversation)
            for turn in range(turns):
                ids = tokenizer(render_chat(tokenizer, messages, env.tools, add_generation_prompt=True),
                                add_special_tokens=False, return_tensors="pt")["input_ids"]
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                                     max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
                text = tokenizer.decode(out, skip_special_tokens=True)
                stats["turns"] += 1
                stats["tokens"] += int((out != tokenizer.pad_token_id).sum())
                calls = parse_tool_calls(text).calls
                if not calls or turn == turns - 1:
                    break
                calls = [{"id": f"call_{turn}_{k}", **c} for k, c in enumerate(calls)]
                results, _ = env.step(key, calls, "bench")
                stats["tool_calls"] += len(calls)
                messages += [{"role": "assistant", "content": "", "tool_calls": [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls]}, *results]
            env.close_episode(key, "bench")
            stats["episodes"] += 1
    return stats


def ours(model, tokenizer, env, conversations, fields, group: int, turns: int, new_tokens: int, batch_size: int) -> dict:
    from tunelab.generation import SamplingSettings
    from tunelab.training.episodes import EpisodeSampler

    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=0)
    out = EpisodeSampler(env, max_turns=turns, seed=0).sample(
        model, tokenizer, conversations, fields, list(range(len(conversations))), group_size=group, settings=settings,
        batch_size=batch_size, step=0)
    return {"episodes": len(out.episodes), "turns": sum(e.turns for e in out.episodes),
            "tool_calls": sum(e.tool_calls for e in out.episodes), "tokens": sum(len(e.model_tokens) for e in out.episodes)}


def main() -> None:
    import tempfile

    import torch

    from tunelab.rewards.environment import EnvironmentClient

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded alias, an HF folder, or 'tiny'")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench_episodes.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    env = EnvironmentClient("tunelab.rewards.tool_envs:ShopSql", timeout=30)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = load(args.model, Path(tmp))
            conversations, fields = prompts(args.prompts)
            results = {}
            for name, run in (
                    ("tunelab", lambda: ours(model, tokenizer, env, conversations, fields, args.group, args.turns,
                                             args.max_new_tokens, args.batch_size)),
                    ("one_at_a_time", lambda: plain(model, tokenizer, env, conversations, args.group, args.turns,
                                                    args.max_new_tokens))):
                started = time.perf_counter()
                with torch.no_grad():
                    stats = run()
                seconds = time.perf_counter() - started
                n = stats["episodes"]
                results[name] = {**stats, "seconds": round(seconds, 2), "episodes_per_s": round(n / seconds, 3),
                                 "turns_per_episode": round(stats["turns"] / n, 2),
                                 "tool_calls_per_episode": round(stats["tool_calls"] / n, 2),
                                 "tokens_per_s": round(stats["tokens"] / seconds, 1)}
                print(name, results[name], flush=True)
    finally:
        env.close()
    report = {"model": args.model, "prompts": args.prompts, "group": args.group, "turns": args.turns,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "results": results,
              "speedup": round(results["tunelab"]["episodes_per_s"] / results["one_at_a_time"]["episodes_per_s"], 2)}
    print("speedup", report["speedup"])
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
