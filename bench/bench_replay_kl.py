"""What the replay's KL costs per step: the untuned model as LoRA switched off against a frozen copy.

``data.replay.kl`` runs the untuned model once more on each replayed micro-batch. For LoRA (and the other
methods that start at the base and can be switched off) that model is the tuned one with the adapter disabled
(``stages.replay``); for full fine-tuning it is a frozen copy of the weights. This times one forward and
backward of the replay loss, both ways, on the real model and the self-replay set, and prints the copy's size:
the two must give the same loss (tests/recipes/test_mixture.py checks value and gradients on a tiny model).

    python bench/bench_replay_kl.py --steps 6 --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console


def replay_batches(model: str, tokenizer, batch: int, steps: int) -> list[dict[str, torch.Tensor]]:
    from tunelab.resolve import load_config
    from tunelab.data.collate import collate
    from tunelab.data.records import load_examples
    from tunelab.data.tokenize import tokenize_examples
    from tunelab.stages.replay import resolve_self_replay
    from tunelab.training.loss import to_device

    config = load_config(None, [f"model={model}", "data.train=x.jsonl", "data.replay={path: self, ratio: 0.2}"])
    config = resolve_self_replay(config, Console(stderr=True))
    examples = load_examples([config.data.replay.path])
    tokenized, _ = tokenize_examples(examples, tokenizer)
    pad = tokenizer.pad_token_id or 0
    return [to_device(collate([tokenized[(i * batch + j) % len(tokenized)] for j in range(batch)], pad), "cpu")
            for i in range(steps)]


def time_loss(name: str, loss, model, batches) -> float:
    loss(model, batches[0]).backward()  # warm-up
    model.zero_grad()
    start = time.perf_counter()
    total = 0.0
    for batch in batches:
        value = loss(model, batch)
        value.backward()
        model.zero_grad()
        total += float(value.detach())
    seconds = (time.perf_counter() - start) / len(batches)
    print(f"{name:<28} {seconds * 1000:8.0f} ms a micro-batch   (mean summed loss {total / len(batches):.4f})")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.resolve import load_config
    from tunelab.methods import get_method
    from tunelab.models.load import resolve_model_path
    from tunelab.stages.replay import replay_kl_loss

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = replay_batches(args.model, tokenizer, args.batch, args.steps)
    base = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    overrides = [f"model={args.model}", "data.train=x.jsonl", "data.replay={path: self, ratio: 0.2, kl: 0.5}"]
    lora, full = load_config(None, overrides), load_config(None, [*overrides, "method.name=full"])
    said = Console(stderr=True)
    live = replay_kl_loss(lora, base, lambda model: model, said)["replay"]  # the shipped code, both ways
    copied = replay_kl_loss(full, base, lambda model: model, said)["replay"]  # a frozen copy of base
    tuned = get_method("lora").apply(base, lora.method).train()
    print(f"{args.model}: {args.steps} replay micro-batches of {args.batch}, LoRA r={lora.method.r}")
    a = time_loss("LoRA switched off (no copy)", live, tuned, batches)
    b = time_loss("frozen copy", copied, tuned, batches)
    print(f"switched off / copy: {a / b:.2f}x the time")


if __name__ == "__main__":
    main()
