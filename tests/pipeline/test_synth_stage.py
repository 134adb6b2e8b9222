"""A pipeline's ``synth`` stage: documents → question-answer pairs → an SFT stage trained on them and evaluated on
the held-out split (``NAME.eval``); a re-run skips both, an interrupted synth stage resumes from its reply cache,
an edited document re-runs both, bad synth settings are reported with their line."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from tunelab.errors import ConfigError
from tunelab.models.tiny import build_tiny_tokenizer
from tunelab.pipeline.runner import run_pipeline
from tunelab.pipeline.spec import load_pipeline

from synth.scripted import Scripted

SENTENCES = [f"The {colour} mug holds {n} hundred millilitres of tea." for n, colour in
             enumerate(["red", "blue", "green", "yellow", "purple", "orange", "white", "black"], 2)]


@pytest.fixture
def generators(monkeypatch):
    made = []

    def scripted(spec, model=None, batch_size=16):
        made.append(Scripted())
        made[-1].tokenizer = build_tiny_tokenizer()
        return made[-1]

    monkeypatch.setattr("tunelab.synth.generators.open_generator", scripted)
    return made


def _write(tmp_path, tiny, extra: str = "") -> str:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "mugs.txt").write_text(" ".join(SENTENCES))
    (tmp_path / "sft.yaml").write_text(f"model: {tiny}\ndata: {{train: none.jsonl}}\nmethod: {{name: lora, r: 4}}\n"
                                       "train: {batch_size: 2, max_steps: 2, lr: 1.0e-2, warmup_ratio: 0}\n"
                                       "eval: {probe: false, before: false, max_new_tokens: 4, metric: rouge_l}\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nstages:\n"
                    f"  - {{name: docs, kind: synth, data: {docs}, synth: {{chunk_tokens: 400, overlap: 0, eval_fraction: 0.3{extra}}}}}\n"
                    f"  - {{name: sft, kind: sft, config: {tmp_path / 'sft.yaml'}, set: {{data.train: docs, data.eval: docs.eval}}}}\n")
    return str(path)


def _actions(planned) -> list[str]:
    return [p.action for p in planned]


def test_synth_feeds_training_and_resumes_from_its_cache(tmp_path, tiny_llama, generators):
    spec = load_pipeline(_write(tmp_path, tiny_llama))
    console = Console(quiet=True)
    assert _actions(run_pipeline(spec, console)) == ["run", "run"]
    out = tmp_path / "out"
    train = [json.loads(line) for line in (out / "docs" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "docs" / "eval.jsonl").read_text().splitlines()]
    assert len(train) + len(held) == 8 and held
    resolved = (out / "sft" / "run" / "config.yaml").read_text()
    assert str(out / "docs" / "train.jsonl") in resolved and str(out / "docs" / "eval.jsonl") in resolved
    assert (out / "docs" / "train.provenance.jsonl").is_file()
    page = (out / "pipeline_report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<td>docs</td><td>synth</td><td>run</td>" in page
    assert _actions(run_pipeline(spec, console)) == ["skip", "skip"]

    record = json.loads((out / "docs" / "stage.json").read_text())
    (out / "docs" / "stage.json").write_text(json.dumps({**record, "status": "running"}))  # as if killed mid-stage
    planned = run_pipeline(spec, console)
    assert _actions(planned) == ["resume", "skip"]
    assert generators[-1].calls == 0 and planned[0].summary["replies_from_cache"] == 9  # one question prompt, 8 answers

    (tmp_path / "docs" / "mugs.txt").write_text(" ".join(SENTENCES[:-1]))
    planned = run_pipeline(spec, console)
    assert _actions(planned) == ["run", "run"] and "changed: file" in planned[0].why

    loose = load_pipeline(_write(tmp_path, tiny_llama, extra=", min_support: 0.1"))
    (tmp_path / "docs" / "mugs.txt").write_text(" ".join(SENTENCES[:-1]))
    planned = run_pipeline(loose, console)  # a new threshold: the stage re-runs on the replies it already has
    assert _actions(planned) == ["run", "run"] and generators[-1].calls == 0 and planned[0].summary["replies_from_cache"] == 8


def test_bad_synth_settings_are_reported_with_their_line(tmp_path, tiny_llama):
    with pytest.raises(ConfigError) as error:
        load_pipeline(_write(tmp_path, tiny_llama, extra=", chunk_size: 3, overlap: -1"))
    message = str(error.value)
    assert "pipeline.yaml:3: stages[0].synth.chunk_size: unknown key" in message
    assert "stages[0].synth.overlap" in message
