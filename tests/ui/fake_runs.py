"""Run directories written by hand, shaped like a recipe writes them, for the dashboard tests."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _write(folder: Path, manifest: dict, metrics: list[dict], eval_json: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "config.yaml").write_text(f"recipe: {{name: {manifest['recipe']}}}\nmethod: {{name: {manifest['method']}}}\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if eval_json is not None:
        (folder / "eval.json").write_text(json.dumps(eval_json))
    (folder / "adapter").mkdir(exist_ok=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    return folder


def _example(n: int, prediction: str, right: bool) -> dict:
    return {"source": f"test.jsonl:{n}", "prompt": f"Question {n}?", "reference": f"answer {n}", "prediction": prediction,
            "score": 1.0 if right else 0.0}


def make_runs(root: Path) -> dict[str, Path]:
    """finished (sft, with predictions and probe changes), running (fresh metrics), interrupted (stale), failed."""
    base = {"model": {"spec": "tiny", "resolved": "/tmp/tiny"}, "created": "2026-12-01T10:00:00", "recipe": "sft",
            "method": "lora", "train_seconds": 12.5, "steps_done": 4, "artifact_mb": 0.002}
    finished = _write(root / "sql-lora", {**base, "status": "finished",
                                          "eval_summary": {"zero_shot_score": 0.25, "tuned_score": 0.75, "probe_retention": 0.5}},
                      [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 5)],
                      {"metric": "exact_match",
                       "baselines": {"zero_shot": {"examples": [_example(1, "wrong", False), _example(2, "answer 2", True),
                                                                _example(3, "nope", False), _example(4, "no", False)]}},
                       "tuned": {"examples": [_example(1, "answer 1", True), _example(2, "answer 2", True),
                                              _example(3, "answer 3", True), _example(4, "still no", False)]},
                       "forgetting": {"lost": [{"id": "snow", "question": "What colour is snow?", "after": "Blue."}],
                                      "gained": []}})
    running = _write(root / "pipeline" / "dpo" / "run", {**base, "recipe": "dpo", "status": "running"},
                     [{"step": 1, "loss": 0.69, "lr": 1e-4}, {"step": 2, "loss": 0.6, "lr": 1e-4}])
    stale = _write(root / "old-run", {**base, "status": "running"}, [{"step": 1, "loss": 1.0}])
    old = time.time() - 3600
    for f in stale.iterdir():
        os.utime(f, (old, old))
    failed = _write(root / "diverged", {**base, "status": "failed"}, [{"step": 1, "loss": 9.0}])
    (root / ".hidden" / "x").mkdir(parents=True)
    return {"finished": finished, "running": running, "interrupted": stale, "failed": failed}
