"""Proof that a tiny VLM learns from pixels (issue 35): the shapes task trained and evaluated twice through
``tunelab``'s SFT recipe, once with the images and once with the same records' images blanked (uniform grey).

The question says only whether the colour or the shape is asked (three of each), so without the pixels a
model can be right about one time in three; the gap to the run with images is what it read from them.
Usage: ``python bench/bench_vlm_shapes.py [--arch llava] [--steps 200] [--method full] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tunelab.data import load_examples
from tunelab.evaluation.run import load_for_eval
from tunelab.evaluation.vision import vision_accuracy
from tunelab.examples.shapes.task import COLOURS, SHAPES, generate
from tunelab.models.vision import load_processor, save_tiny_vlm
from tunelab.recipes import sft
from tunelab.resolve import load_config


def run(root: Path, model: Path, blank: bool, args) -> dict:
    """Train on the task (images real or blanked) and measure held-out accuracy the same way."""
    train, test = generate(root / ("blank" if blank else "images"), train=args.train, test=args.test, blank=blank)
    config = load_config(None, [f"model={model}", f"data.train={train}", f"output_dir={root / ('run_blank' if blank else 'run')}",
                                f"method.name={args.method}", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
                                "train.batch_size=8", "train.warmup_ratio=0", "train.defaults=fixed", "eval.before=false",
                                "eval.probe=false", f"train.seed={args.seed}"])
    start = time.time()
    done = sft.main(config)
    seconds = time.time() - start
    tuned = load_for_eval(str(done.run_dir)).model
    result = vision_accuracy(tuned, load_processor(str(model)), load_examples([str(test)]))
    by_kind = {}
    for kind, answers in (("colour", set(COLOURS)), ("shape", set(SHAPES))):
        pairs = [(p, r) for p, r in result["predictions"] if r in answers]
        by_kind[kind] = round(sum(p == r for p, r in pairs) / max(len(pairs), 1), 3)
    return {"accuracy": result["accuracy"], "by_question": by_kind, "n": result["n"], "final_train_loss": done.train_loss,
            "train_seconds": round(seconds, 1), "examples": result["predictions"][:8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="llava")
    parser.add_argument("--method", default="full")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunelab-vlm-shapes-") as tmp:
        root = Path(tmp)
        model = save_tiny_vlm(root / "model", args.arch)
        results = {"arch": args.arch, "method": args.method, "steps": args.steps,
                   "with_images": run(root, model, False, args), "images_blanked": run(root, model, True, args)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
