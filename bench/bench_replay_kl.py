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
import copy
import time

import torch
from rich.console import Console


def replay_batches(model: str, tokenizer, batch: int, steps: int) -> list[dict[str, torch.Tensor]]:
    from tunelab.config import load_config
    from tunelab.data.collate import collate
    from tunelab.data.records import load_examples
    from tunelab.data.tokenize import tokenize_examples
    from tunelab.stages.replay import resolve_self_replay
    from tunelab.training.loss import to_device

    config = load_config(None, [f"model={model}", "data.train=x.jsonl", "data.replay={path: self, ratio: 0.2}"])
    resolve_self_replay(config, Console(stderr=True))
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
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.methods import get_method
    from tunelab.models.load import resolve_model_path
    from tunelab.stages.replay import _switched_off
    from tunelab.training.distill import distill_loss_sum

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = replay_batches(args.model, tokenizer, args.batch, args.steps)
    base = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    size = sum(p.numel() * p.element_size() for p in frozen.parameters()) / 2**20
    tuned = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=True)).train()
    lora = get_method("lora")
    print(f"{args.model}: {args.steps} replay micro-batches of {args.batch}, LoRA r=16; the frozen copy holds {size:,.0f} MiB")

    def live(model, batch):
        return distill_loss_sum(model, model, batch, kind="forward_kl", alpha=0.5, teacher_context=lambda: _switched_off(lora, model))

    def copied(model, batch):
        return distill_loss_sum(model, frozen, batch, kind="forward_kl", alpha=0.5)

    a = time_loss("LoRA switched off (no copy)", live, tuned, batches)
    b = time_loss("frozen copy", copied, tuned, batches)
    print(f"switched off / copy: {a / b:.2f}x the time")


if __name__ == "__main__":
    main()
