"""``tunelab demo``: the main job on the embedded default model, end to end, in a few minutes on a CPU.

Evaluates the untuned SmolLM2-135M-Instruct on held-out product reviews (one-word sentiment), trains
LoRA on 320 raw review records turned into instructions by a Jinja template, reloads the adapter with
plain ``peft.PeftModel.from_pretrained`` and evaluates again.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.config import load_config
from tunelab.recipes import sft

PROMPT = ("Classify the sentiment of this review of a {{ product }} as positive, negative or mixed. "
          "Answer with one word.\n\nReview: {{ review }}")


def _accuracy(model, tokenizer, records: list[dict]) -> tuple[float, list[str]]:
    from jinja2 import Template

    from tunelab.evaluation.generate import generate_answers

    template = Template(PROMPT)
    conversations = [[{"role": "user", "content": template.render(**r)}] for r in records]
    answers = generate_answers(model, tokenizer, conversations, max_new_tokens=6)
    first_words = [(a.split() or [""])[0].strip(".,!").lower() for a in answers]
    correct = sum(w == r["sentiment"] for w, r in zip(first_words, records))
    return correct / len(records), answers


def run_demo(output_root: str = "runs", console: Console | None = None) -> Path:
    """Run the demo; returns the run directory."""
    from peft import PeftModel

    from tunelab.models.load import load_model, load_tokenizer

    console = console or Console(stderr=True)
    data_dir = files("tunelab.examples") / "reviews"
    run_dir = Path(output_root) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_config(None, [
        "model=smollm2-135m-instruct", "method.name=lora", "method.r=16", "method.alpha=32",
        f"data.train={data_dir / 'train.jsonl'}", f"data.eval={data_dir / 'eval.jsonl'}", "data.format=raw",
        f"data.template.prompt={json.dumps(PROMPT)}", "data.template.response='{{ sentiment }}'",
        "data.max_length=256", "train.epochs=1", "train.batch_size=8", "train.lr=2e-4", "train.warmup_ratio=0.05",
        f"output_dir={run_dir}",
    ])
    held_out = [json.loads(line) for line in (data_dir / "eval.jsonl").read_text().splitlines()]

    from tunelab.models.load import resolve_model_path

    model_path = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(model_path)
    t0 = time.time()
    before, before_answers = _accuracy(load_model(model_path), tokenizer, held_out)
    console.print(f"Base model: {before:.0%} of {len(held_out)} held-out reviews classified correctly ({time.time() - t0:.0f} s).")

    result = sft.main(config, console=console)

    adapter_config = json.loads((result.artifact_dir / "adapter_config.json").read_text())
    tuned = PeftModel.from_pretrained(load_model(adapter_config["base_model_name_or_path"]), result.artifact_dir)
    after, after_answers = _accuracy(tuned, tokenizer, held_out)

    table = Table(title="tunelab demo: SmolLM2-135M-Instruct, LoRA r=16, product-review sentiment")
    for column in ("", "before", "after"):
        table.add_column(column)
    table.add_row("held-out accuracy", f"{before:.0%}", f"{after:.0%}")
    table.add_row("train loss (last step)", "-", f"{result.train_loss:.3f}")
    table.add_row("eval loss", "-", f"{result.eval_loss:.3f}" if result.eval_loss is not None else "-")
    table.add_row("training time", "-", f"{result.train_seconds:.0f} s")
    for record, a, b in list(zip(held_out, before_answers, after_answers))[:3]:
        table.add_row(f"[dim]{record['review'][:48]}… ({record['sentiment']})", repr(a[:40]), repr(b[:40]))
    Console().print(table)
    console.print(f"Adapter (loads with plain peft): {result.artifact_dir}")
    return result.run_dir
