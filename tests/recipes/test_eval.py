"""``tunelab eval`` on tiny models: run directories, base + adapter, generation metrics and loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.recipes import sft

REPO = Path(__file__).resolve().parents[2]


def _eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tunelab", "eval", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_eval_run_dir_and_adapter_agree_and_scores_are_reproducible(make_config, chat_data, tiny_llama, tmp_path):
    run = sft.main(make_config("train.max_steps=2")).run_dir
    out_run, out_adapter = tmp_path / "a.json", tmp_path / "b.json"
    proc = _eval("--model", str(run), "--data", str(chat_data["eval"]), "--metric", "exact_match", "--out", str(out_run), "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    proc = _eval("--model", str(tiny_llama), "--adapter", str(run / "adapter"), "--data", str(chat_data["eval"]),
                 "--metric", "exact_match", "--out", str(out_adapter), "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(out_run.read_text()), json.loads(out_adapter.read_text())
    assert a["n"] == 6 and len(a["examples"]) == 6
    assert [e["prediction"] for e in a["examples"]] == [e["prediction"] for e in b["examples"]]
    # an independent scorer reproduces the score from the saved predictions
    recomputed = sum(" ".join(e["prediction"].split()).casefold() == " ".join(e["reference"].split()).casefold() for e in a["examples"]) / a["n"]
    assert a["score"] == recomputed
    assert all(e["source"].startswith(str(chat_data["eval"])) for e in a["examples"])


def test_eval_loss_metric_and_bad_input(chat_data, tiny_llama, tmp_path):
    out = tmp_path / "loss.json"
    proc = _eval("--model", str(tiny_llama), "--data", str(chat_data["eval"]), "--metric", "loss", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert 4.0 < report["score"] < 7.0 and report["perplexity"] > 1  # random tiny model: about ln(vocab)
    proc = _eval("--model", str(tiny_llama), "--data", str(chat_data["eval"]), "--metric", "no_such_metric", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()


def test_training_reports_before_after_baselines_and_forgetting(make_config, tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Colour {i}?", "answers": ["red", "blue"]}) + "\n" for i in range(3)))
    result = sft.main(make_config("train.max_steps=3", f"eval.probe={probe}", "eval.few_shot=2", "eval.metric=contains", "eval.max_new_tokens=6"))
    report = json.loads((result.run_dir / "eval.json").read_text())
    assert set(report["baselines"]) == {"zero_shot", "few_shot"} and report["metric"] == "contains"
    assert len(report["tuned"]["examples"]) == 6 and "prediction" in report["tuned"]["examples"][0]
    forgetting = report["forgetting"]
    assert forgetting["items"] == 3 and len(forgetting["before"]) == len(forgetting["after"]) == 3
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["eval_summary"]["tuned_score"] == report["tuned"]["score"]
    assert (result.run_dir / "eval_before.json").is_file()


def test_bad_eval_settings_fail_before_training(make_config, tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="needs option"):
        sft.main(make_config("eval.metric=sql_exec", output="sql"))
    with pytest.raises(TunelabError, match="does not take option"):
        sft.main(make_config("eval.metric=exact_match", "eval.lables=[a]", output="typo"))
    assert not (tmp_path / "sql").exists() and not (tmp_path / "typo").exists()
