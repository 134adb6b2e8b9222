"""One GRPO job, two trainers: tunelab's ``recipe: grpo`` against TRL's ``GRPOTrainer``, seconds per step.

The same model, prompts (the SQL task's first training questions), group size, completion budget, learning
rate and a same-shaped reward (1 for a completion that starts with SELECT, else 0: cheap, so the figure is the
trainers' own time), LoRA r=16 on both, no KL (beta 0), DAPO aggregation, ``--steps`` optimizer steps each
(each step samples a new group per prompt). TRL is the field's reference implementation here, not our
trainer; the script skips it when TRL is not installed. Reported: seconds per step (tunelab: its manifest's
``train_seconds`` over steps, sampling included, every step; TRL: between its step-end callbacks, after the
first step, which includes warm-up) and each trainer's whole wall time (model loading included).

    python bench/bench_grpo_step.py                                     # SmolLM2-135M, 4 prompts x 4, 32 tokens
    python bench/bench_grpo_step.py --model tiny --steps 2 --prompts 2  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def reward_select(completions, prompts=None, **_) -> list[float]:
    """1 for a completion that starts with SELECT: both trainers' contracts (TRL passes keywords, tunelab positions)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if t.strip().upper().startswith("SELECT") else 0.0 for t in texts]


def model_path(model: str, folder: Path) -> str:
    if model == "tiny":
        from tunelab.models.tiny import save_tiny_model

        return str(save_tiny_model(folder / "tiny", "llama"))
    from tunelab.models.load import resolve_model_path

    return resolve_model_path(model)


def prompts(n: int) -> list[list[dict]]:
    from tunelab.data import load_examples

    return [list(e.messages[:-1]) for e in load_examples([str(REPO / "src/tunelab/examples/sql/train.jsonl")])[:n]]


def run_tunelab(path: str, conversations, args, folder: Path) -> list[float]:
    from tunelab.resolve import load_config
    from tunelab.recipes import grpo

    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    config = load_config(None, [f"model={path}", "recipe.name=grpo", f"data.train={data}", "method.name=lora", "method.r=16",
                                f"train.batch_size={len(conversations)}", f"train.max_steps={args.steps}", "train.lr=1e-5",
                                "train.warmup_ratio=0", f"recipe.num_generations={args.group}",
                                f"recipe.max_completion_length={args.max_new_tokens}", "recipe.samples_every=0",
                                "eval.probe=false", "eval.before=false", f"output_dir={folder / 'tunelab'}",
                                "recipe.rewards=[{fn: 'bench_grpo_step:reward_select'}]"])
    grpo.main(config)
    manifest = json.loads((folder / "tunelab" / "manifest.json").read_text())
    return [manifest["train_seconds"] / manifest["steps_done"]] * manifest["steps_done"]  # tunelab times its steps only


def run_trl(path: str, conversations, args, folder: Path) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, *_, **__):
            self.marks.append(time.perf_counter())

    clock = Clock()
    config = GRPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=len(conversations) * args.group,
                        num_generations=args.group, max_completion_length=args.max_new_tokens, max_steps=args.steps,
                        learning_rate=1e-5, beta=0.0, loss_type="dapo", logging_steps=1, report_to=[], save_strategy="no",
                        use_cpu=True, temperature=1.0)
    trainer = GRPOTrainer(model=path, reward_funcs=[reward_select], args=config,
                          train_dataset=Dataset.from_list([{"prompt": c} for c in conversations]),
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    marks = [start, *clock.marks]
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench_grpo_step.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))  # the reward function, by module path
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, conversations = model_path(args.model, folder), prompts(args.prompts)
        runners = {"tunelab": run_tunelab}
        try:
            import trl  # noqa: F401

            runners["trl"] = run_trl
        except ImportError:
            print("TRL is not installed: its figure is left out")
        for name, run in runners.items():
            started = time.perf_counter()
            steps = run(path, conversations, args, folder)
            results[name] = {"wall_seconds": round(time.perf_counter() - started, 2), "step_seconds": [round(s, 3) for s in steps],
                             "mean_step_after_first": round(sum(steps[1:]) / max(len(steps) - 1, 1), 3) if steps else None}
            print(name, results[name], flush=True)
    args.out.write_text(json.dumps({"model": args.model, "prompts": args.prompts, "group": args.group,
                                    "max_new_tokens": args.max_new_tokens, "steps": args.steps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
