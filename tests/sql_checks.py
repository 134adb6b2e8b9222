"""What a short text-to-SQL run on a real model must show, checked by code written here, not tunelab's scorer:
eval.json's scores reproduced by executing the predictions, an adapter that holds no embedding matrix, and tuned
answers that stop instead of running to max_new_tokens. Shared by the slow real-model test and the dashboard's
demo test (the demo is this run, started from the page)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path


def _rows(connection, sql):
    try:
        return connection.execute(sql).fetchall()
    except sqlite3.Error:
        return None


def check_sql_run(run_dir: Path, artifact_dir: Path, db: Path, max_new_tokens: int, probe_items: int) -> dict:
    """Assert the run's figures; returns its eval.json."""
    from transformers import AutoTokenizer

    report = json.loads((run_dir / "eval.json").read_text())
    adapter_mb = (artifact_dir / "adapter_model.safetensors").stat().st_size / 1e6
    assert adapter_mb < 25, adapter_mb  # LoRA matrices only (a saved embedding would be 113 MB / 671 MB)
    tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
    lengths = [len(tokenizer(e["prediction"], add_special_tokens=False).input_ids) for e in report["tuned"]["examples"]]
    assert sum(n < max_new_tokens - 2 for n in lengths) >= 0.75 * len(lengths), lengths  # answers stop
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    for key, section in [("zero_shot", report["baselines"]["zero_shot"]), ("tuned", report["tuned"])]:
        right = 0
        for example in section["examples"]:
            sql = re.sub(r"^```(?:sql)?\s*|\s*```$", "", example["prediction"].strip()).strip().rstrip(";")
            gold, predicted = _rows(connection, example["reference"]), _rows(connection, sql)
            ordered = "ORDER BY" in example["reference"].upper()
            right += predicted is not None and (predicted == gold if ordered else Counter(predicted) == Counter(gold))
        assert section["score"] == right / len(section["examples"]), key
    assert report["forgetting"]["items"] == probe_items and "retention" in report["forgetting"]
    return report
