"""``tunelab pipeline`` on a tiny model: sft → pairs from its mistakes → dpo on them → merge → GGUF → eval, end to
end; a second run skips every stage; a changed stage re-runs with its descendants only; a kill mid-stage resumes
that stage; the file's mistakes are reported at once with their lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import chat_records, write_jsonl

REPO = Path(__file__).resolve().parents[2]
STAGES = ["sft", "mistakes", "dpo", "merged", "gguf", "check"]


def tunelab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})})


def _pipeline(folder: Path, tiny: Path, epochs: int = 1) -> Path:
    (folder / "sft.yaml").write_text(f"model: {tiny}\ndata: {{train: {folder / 'train.jsonl'}, eval: {folder / 'eval.jsonl'}}}\n"
                                     "method: {name: lora, r: 4}\ntrain: {batch_size: 2, grad_accum: 2, lr: 1.0e-2, warmup_ratio: 0}\n"
                                     "eval: {probe: false}\n")
    (folder / "dpo.yaml").write_text(f"recipe: dpo\nmodel: {tiny}\nmethod: {{name: lora, r: 4}}\ndata: {{train: none.jsonl}}\n"
                                     "train: {batch_size: 2, max_steps: 3, lr: 1.0e-2, warmup_ratio: 0}\n"
                                     "eval: {probe: false, before: false}\n")
    path = folder / "pipeline.yaml"
    path.write_text(f"output_dir: {folder / 'out'}\nstages:\n"
                    f"  - {{name: sft, kind: sft, config: {folder / 'sft.yaml'}, set: {{train.epochs: {epochs}}}}}\n"
                    f"  - {{name: mistakes, kind: preferences, model: sft, data: {folder / 'train.jsonl'}}}\n"
                    f"  - {{name: dpo, kind: dpo, config: {folder / 'dpo.yaml'}, set: {{init_from: sft, data.train: mistakes}}}}\n"
                    "  - {name: merged, kind: merge, from: dpo, prompts: 2}\n"
                    "  - {name: gguf, kind: export, from: merged, format: gguf, quant: f16, prompts: 2, max_new_tokens: 4}\n"
                    f"  - {{name: check, kind: eval, model: dpo, data: {folder / 'eval.jsonl'}}}\n")
    return path


def actions(folder: Path) -> dict[str, str]:
    return {row["stage"]: row["action"] for row in json.loads((folder / "out" / "pipeline_report.json").read_text())}


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("pipeline")
    write_jsonl(folder / "train.jsonl", chat_records(12))
    write_jsonl(folder / "eval.jsonl", chat_records(4, seed=3))
    done = tunelab("pipeline", str(_pipeline(folder, tiny_llama)))
    assert done.returncode == 0, done.stderr[-4000:]
    return folder


def test_the_whole_pipeline_runs_and_each_stage_records_its_lineage(ran):
    out = ran / "out"
    assert actions(ran) == dict.fromkeys(STAGES, "run")
    records = {name: json.loads((out / name / "stage.json").read_text()) for name in STAGES}
    assert all(r["status"] == "finished" for r in records.values())
    assert set(records["dpo"]["inputs"]["parents"]) == {"sft", "mistakes"}
    assert records["gguf"]["inputs"]["parents"] == {"merged": records["merged"]["key"]}
    dpo_manifest = json.loads((out / "dpo" / "run" / "manifest.json").read_text())
    assert dpo_manifest["parent"]["run_dir"] == str(out / "sft" / "run")  # init_from the sft stage
    assert (out / "mistakes" / "pairs.jsonl").is_file() and list((out / "gguf" / "export").glob("*.gguf"))
    report = (out / "pipeline_report.md").read_text()
    assert "| sft | sft | run |" in report and "| check | eval | run |" in report


def test_a_second_run_skips_everything_and_a_change_reruns_only_downstream(ran, tiny_llama):
    again = tunelab("pipeline", str(ran / "pipeline.yaml"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert actions(ran) == dict.fromkeys(STAGES, "skip")
    (ran / "eval.jsonl").write_text((ran / "eval.jsonl").read_text().replace("It is", "It's"))  # only check and sft read it
    dry = tunelab("pipeline", str(ran / "pipeline.yaml"), "--dry-run")
    assert dry.returncode == 0 and "changed: file" in dry.stderr + dry.stdout
    assert actions(ran) == dict.fromkeys(STAGES, "skip")  # a dry run changes nothing, not even the report
    changed = tunelab("pipeline", str(ran / "pipeline.yaml"))
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert actions(ran) == dict.fromkeys(STAGES, "run")  # sft reads eval.jsonl, and everything descends from sft


def test_an_edit_reruns_the_edited_stage_and_its_descendants_only(ran):
    path = ran / "pipeline.yaml"
    path.write_text(path.read_text().replace("quant: f16", "quant: q8_0"))
    done = tunelab("pipeline", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert actions(ran) == {"sft": "skip", "mistakes": "skip", "dpo": "skip", "merged": "skip", "gguf": "run", "check": "skip"}
    assert list((ran / "out" / "gguf" / "export").glob("*q8_0*.gguf"))


def test_a_kill_mid_stage_resumes_that_stage(ran, tiny_llama, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", chat_records(12))
    write_jsonl(tmp_path / "eval.jsonl", chat_records(4, seed=3))
    path = _pipeline(tmp_path, tiny_llama, epochs=2)
    killed = tunelab("pipeline", str(path), env={"TUNELAB_TEST_SIGKILL_AT_STEP": "4"})  # sft has 6 steps
    assert killed.returncode == -9
    assert json.loads((tmp_path / "out" / "sft" / "stage.json").read_text())["status"] == "running"
    resumed = tunelab("pipeline", str(path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert actions(tmp_path)["sft"] == "resume" and "Resuming from" in resumed.stderr
    assert json.loads((tmp_path / "out" / "check" / "stage.json").read_text())["status"] == "finished"
    # An edit, a re-run killed mid-stage, the edit undone: the finished result kept aside comes back, nothing re-runs.
    path.write_text(path.read_text().replace("train.epochs: 2", "train.epochs: 3"))
    assert tunelab("pipeline", str(path), env={"TUNELAB_TEST_SIGKILL_AT_STEP": "2"}).returncode == -9
    path.write_text(path.read_text().replace("train.epochs: 3", "train.epochs: 2"))
    restored = tunelab("pipeline", str(path))
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert actions(tmp_path) == {"sft": "restore", **dict.fromkeys(STAGES[1:], "skip")}


def test_every_mistake_in_the_file_is_reported_with_its_line(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("output_dir: out\nstages:\n"
                    "  - {name: a, kind: sft}\n"
                    "  - {name: b, kind: teleport}\n"
                    "  - {name: c, kind: merge, format: gguf}\n"
                    "  - {name: a, kind: eval, model: x, data: y, colour: red}\n")
    done = tunelab("pipeline", str(path), "--dry-run")
    assert done.returncode == 2
    text = " ".join(done.stderr.split())
    for needed in (":3: stages[0]: a sft stage needs config:", ":4: stages[1].kind: unknown kind 'teleport'",
                   ":5: stages[2].format: does not apply to a merge stage", ":5: stages[2]: a merge stage needs from:",
                   ":6: stages[3].colour: unknown key"):
        assert needed in text, needed
