"""Two processes against one, at the same global batch, on the SQL demo job with the embedded SmolLM2-135M:

  one   ``tunelab train`` in one process with ``OMP_NUM_THREADS=T`` (default: every core), grad_accum 2·A
  ddp   ``tunelab train --nproc 2`` with ``OMP_NUM_THREADS=T/2`` each, grad_accum A (DDP over gloo on CPU)
  fsdp  the same with ``distributed.strategy=fsdp`` (``--fsdp``)

Evaluation and the probe are off; each run trains ``--steps`` optimizer steps of ``--batch-size`` × 2·A
examples and the manifest's ``tokens_per_s`` (input tokens of all ranks over the training loop) is reported,
with the final loss (which must agree between the runs) and the per-process peak RSS.

Scaling on a 2-core CPU says little about GPUs: the two processes share the cores one process would use
with two threads, gloo all-reduces through shared memory, and a rank computes full logits (the trained-
positions fast path bypasses DDP's forward, see ``training.loss.plain_causal_lm``). It measures the
overhead of the distributed loop, not its speed-up.

    python bench/bench_distributed.py --examples 64 --steps 6 --batch-size 4 --out /tmp/dist.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _config(work: Path, examples: int, batch: int, steps: int) -> Path:
    rows = (REPO / "src/tunelab/examples/sql/train.jsonl").read_text(encoding="utf-8").splitlines()[:examples]
    (work / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = work / "bench.yaml"
    config.write_text(f"model: smollm2-135m-instruct\nmethod: {{name: lora}}\ndata: {{train: {work / 'train.jsonl'}, max_length: 256}}\n"
                      f"train: {{batch_size: {batch}, max_steps: {steps}, warmup_ratio: 0, log_every: 1, seed: 0}}\n"
                      "eval: {before: false, probe: false}\n", encoding="utf-8")
    return config


def _run(name: str, config: Path, work: Path, threads: int, accum: int, nproc: int, extra: list[str]) -> dict:
    out = work / name
    command = [sys.executable, "-m", "tunelab", "train", str(config), f"output_dir={out}", f"train.grad_accum={accum}",
               *extra, *(["--nproc", str(nproc)] if nproc > 1 else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"runner": name, "processes": nproc, "threads_each": threads, "tokens_per_s": manifest["tokens_per_s"],
            "train_seconds": manifest["train_seconds"], "final_train_loss": manifest.get("final_train_loss"),
            "peak_rss_mb_rank0": manifest.get("peak_memory_mb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1, help="grad_accum per process of the two-process runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the one process")
    parser.add_argument("--fsdp", action="store_true", help="also run distributed.strategy=fsdp")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunelab-dist-bench-") as folder:
        work = Path(folder)
        config = _config(work, args.examples, args.batch_size, args.steps)
        half = max(1, args.threads // 2)
        results = [_run("one", config, work, args.threads, 2 * args.accum, 1, []),
                   _run("ddp", config, work, half, args.accum, 2, [])]
        if args.fsdp:
            results.append(_run("fsdp", config, work, half, args.accum, 2, ["distributed.strategy=fsdp"]))
    for row in results:
        print(f"{row['runner']:>5}: {row['processes']} x {row['threads_each']} threads  {row['tokens_per_s']:8.1f} tok/s  "
              f"loss {row['final_train_loss']:.4f}  rank-0 peak RSS {row['peak_rss_mb_rank0']:.0f} MB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
