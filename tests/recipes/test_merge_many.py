"""Merging several models from a MERGE.yaml and blending a run with its base, on tiny models: the file's errors
with file:line, refusals of models of another family, a two-run TIES merge end to end, and the interpolation table
(t=0 is the base, t=1 the tuned run)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tunelab.errors import ConfigError, TunelabError
from tunelab.merging import (MergeInput, fold_in_memory, interpolate_run, load_merge_spec, merge_models, merge_state_dicts,
                             pick_blend)
from tunelab.recipes import sft

QUICK = ("eval.max_new_tokens=8",)


def train(make_config, *overrides, output="run"):
    return sft.main(make_config(*QUICK, "train.max_steps=3", "train.lr=5e-2", *overrides, output=output)).run_dir


def write_spec(path, merge):
    path.write_text(yaml.safe_dump({"merge": merge}, sort_keys=False))
    return path


def test_a_bad_merge_file_reports_every_problem_with_its_line(tmp_path, tiny_llama):
    (tmp_path / "empty").mkdir()
    spec = tmp_path / "merge.yaml"
    spec.write_text(
        "merge:\n"
        "  method: ties\n"
        f"  base: {tiny_llama}\n"
        "  models:\n"
        f"    - path: {tiny_llama}\n"
        "      density: 1.5\n"
        f"    - path: {tiny_llama}\n"
        "      wieght: 2\n"
        "  lamda: 0.5\n")
    with pytest.raises(ConfigError) as caught:
        load_merge_spec(spec)
    problems = caught.value.problems
    assert any(p.startswith(f"{spec}:6: merge.models[0].density:") and "less than or equal to 1" in p for p in problems)
    assert any(p.startswith(f"{spec}:8: merge.models[1].wieght: unknown key") for p in problems)
    assert any(p.startswith(f"{spec}:9: merge.lamda: unknown key") for p in problems)

    spec.write_text(f"merge:\n  method: soup\n  models:\n    - path: {tiny_llama}\n")
    with pytest.raises(ConfigError, match=r"merge.yaml:2: merge.method: unknown merge method 'soup'; choose one of: .*dare_ties"):
        load_merge_spec(spec)
    spec.write_text("merge:\n  method: task_arithmetic\n  lambda: 0.5\n  models:\n"
                    f"    - {{path: {tmp_path / 'nowhere'}}}\n    - {{path: {tmp_path / 'empty'}, density: 0.5}}\n")
    with pytest.raises(ConfigError) as caught:
        load_merge_spec(spec)
    problems = caught.value.problems
    assert len(problems) == 4, problems
    assert any(p.startswith(f"{spec}:2: merge.method: task_arithmetic merges task vectors") and "set merge.base" in p for p in problems)
    assert any(p.startswith(f"{spec}:5: merge.models[0].path:") and "not found" in p for p in problems)
    assert any(p.startswith(f"{spec}:6: merge.models[1].path:") and "neither manifest.json" in p for p in problems)
    assert any(p.startswith(f"{spec}:6: merge.models[1].density:") and "density applies to ties" in p for p in problems)


def test_a_valid_merge_file_reads_back(tmp_path, tiny_llama):
    spec = load_merge_spec(write_spec(tmp_path / "m.yaml", {"method": "dare_ties", "base": str(tiny_llama), "models": [
        {"path": str(tiny_llama), "weight": 0.7, "density": 0.3}], "lambda": 0.8, "seed": 5}))
    assert (spec.method, spec.lambda_, spec.seed, spec.models[0].weight, spec.models[0].density) == ("dare_ties", 0.8, 5, 0.7, 0.3)


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


@pytest.mark.parametrize("kind, message", [
    ("architecture", r"config model_type: 'llama' vs 'qwen2'"),
    ("size", r"config num_hidden_layers: 2 vs 6"),
    ("template", r"chat template differs"),
    ("vocabulary", r"vocabulary size"),
])
def test_models_of_another_family_are_refused_naming_what_differs(tmp_path, tiny_llama, tiny_qwen2, six_block_llama, kind, message):
    from transformers import AutoTokenizer

    def new_template(d):
        config = json.loads((d / "tokenizer_config.json").read_text())
        (d / "chat_template.jinja").unlink(missing_ok=True)
        config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        (d / "tokenizer_config.json").write_text(json.dumps(config))

    def more_tokens(d):
        tok = AutoTokenizer.from_pretrained(d)
        tok.add_tokens(["<extra>"])
        tok.save_pretrained(d)

    other = {"architecture": lambda: tiny_qwen2, "size": lambda: six_block_llama, "template": lambda: _variant(tiny_llama, tmp_path / "t", new_template),
             "vocabulary": lambda: _variant(tiny_llama, tmp_path / "v", more_tokens)}[kind]()
    spec = load_merge_spec(write_spec(tmp_path / "m.yaml", {"method": "ties", "base": str(tiny_llama), "models": [
        {"path": str(tiny_llama)}, {"path": str(other)}]}))
    with pytest.raises(TunelabError, match=f"(?s)cannot merge {tiny_llama} with {other}: they are not the same model family:.*{message}"):
        merge_models(spec, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_run_that_cannot_be_folded_is_refused(make_config, tmp_path, tiny_llama):
    run = sft.main(make_config("eval.before=false", "eval.max_new_tokens=2", "train.max_steps=1", "method.num_virtual_tokens=2",
                                 method="prompt")).run_dir
    spec = load_merge_spec(write_spec(tmp_path / "m.yaml", {"method": "ties", "base": str(tiny_llama), "models": [{"path": str(run)}]}))
    with pytest.raises(TunelabError, match="cannot merge .*virtual tokens.*Serve the adapter instead"):
        merge_models(spec, tmp_path / "merged")


def test_ties_merge_of_two_runs_end_to_end(make_config, tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    sql = train(make_config, "eval.probe=true", output="sql")
    reviews = train(make_config, "train.seed=1", "train.lr=3e-2", "method.r=2", output="reviews")
    spec_file = write_spec(tmp_path / "m.yaml", {"method": "ties", "base": str(tiny_llama), "models": [
        {"path": str(sql), "weight": 1.0, "density": 0.5}, {"path": str(reviews), "weight": 0.5, "density": 0.7}], "lambda": 0.9})
    report = merge_models(load_merge_spec(spec_file), tmp_path / "merged", prompts=3)

    # the written weights are the rule applied to the runs folded into full weights
    folded = [fold_in_memory(r)[1].model.state_dict() for r in (sql, reviews)]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    expected = merge_state_dicts("ties", base, [MergeInput(folded[0], 1.0, 0.5), MergeInput(folded[1], 0.5, 0.7)], lambda_=0.9)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(written[k], expected[k]) for k in expected)

    assert [r["model"] for r in report["scores"]] == ["base", "sql", "reviews", "merged"]
    assert [t["name"] for t in report["tasks"]] == ["sql", "reviews"]
    for row, run in zip(report["scores"][1:3], (sql, reviews)):  # each single model scores its own task as its run did
        own = json.loads((run / "eval.json").read_text())["tuned"]["score"]
        assert row["tasks"][run.name]["score"] == own
    base_zero_shot = json.loads((sql / "eval_before.json").read_text())["zero_shot"]["score"]
    assert report["scores"][0]["tasks"]["sql"]["score"] == base_zero_shot
    base_probe = report["scores"][0]["probe"]  # the base against itself: all it knew kept; undefined if it knew nothing
    assert base_probe["retention"] == (1.0 if base_probe["right_before"] else None) and report["scores"][-1]["probe"] is not None
    assert report["verification"]["passed"] and report["verification"]["prompts"].startswith("data.eval")
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text()) == report
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "# Merge: ties of 2 models" in card and "| **merged** |" in card and "TIES (Yadav et al. 2023" in card


def test_merge_command_takes_a_merge_file(make_config, tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run = train(make_config, "eval.before=false")
    spec_file = write_spec(tmp_path / "m.yaml", {"method": "dare_linear", "base": str(tiny_llama), "models": [
        {"path": str(run), "density": 0.5}], "seed": 3})
    result = CliRunner().invoke(app, ["merge", str(spec_file), "--out", str(tmp_path / "merged"), "--prompts", "2"])
    assert result.exit_code == 0, result.output
    assert "dare_linear merge" in result.output and "greedy answers equal" in result.output
    refused = CliRunner().invoke(app, ["merge", str(spec_file), "--out", str(tmp_path / "m2"), "--interpolate", "0.5"])
    assert refused.exit_code == 2 and "give a run directory" in refused.output


def test_interpolation_table_runs_from_the_base_to_the_tuned_run(make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    run = train(make_config, "eval.probe=true")
    recorded, before = (json.loads((run / f).read_text()) for f in ("eval.json", "eval_before.json"))
    report = interpolate_run(run, [0.5, 1.0], tmp_path / "blend", pick="0.5", prompts=2)

    t0, half, t1 = report["table"]
    assert [r["t"] for r in report["table"]] == [0.0, 0.5, 1.0] and t0["reference"]
    assert t0["task_score"] == before["zero_shot"]["score"] and t0["retention"] == (1.0 if t0["probe_right_before"] else None)
    assert t1["task_score"] == recorded["tuned"]["score"]
    assert t1["retention"] == recorded["forgetting"]["retention"] and t1["lost"] == [i["id"] for i in recorded["forgetting"]["lost"]]
    assert report["picked_t"] == 0.5 and report["verification"]["passed"]

    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "manifest.json").read_text())["model"]["resolved"]).state_dict()
    tuned = fold_in_memory(run)[1].model.state_dict()
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "blend").state_dict()
    assert all(torch.allclose(written[k], base[k] + 0.5 * (tuned[k] - base[k]), atol=1e-6) for k in base)
    card = (tmp_path / "blend" / "README.md").read_text()
    assert "| 0.5 (picked) |" in card and "| 0 (base) |" in card


def test_interpolate_command_prints_the_table_and_refuses_a_pick_it_cannot_make(make_config, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run = train(make_config, "eval.before=false")  # no probe (eval.probe=false): retention cannot be ranked
    runner = CliRunner()
    refused = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "b"), "--interpolate", "0.5,1", "--pick", "best-retention"])
    assert refused.exit_code == 2 and "no forgetting probe" in refused.output and not (tmp_path / "b").exists()
    result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "b"), "--interpolate", "1,0.5", "--prompts", "2",
                                 "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "Blends base + t" in result.output and "(picked)" in result.output and "t=0.5: task" in result.output
    report = json.loads((tmp_path / "b" / "merge_report.json").read_text())
    assert report["limit"] == 2 and report["examples"] == 2 and "first 2 eval examples" in (tmp_path / "b" / "README.md").read_text()
    assert runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "c"), "--pick", "0.5"]).exit_code == 2
    assert runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "c"), "--limit", "3"]).exit_code == 2


ROWS = [{"t": 0.0, "task_score": 0.1, "retention": 1.0}, {"t": 0.5, "task_score": 0.6, "retention": 0.9},
        {"t": 0.75, "task_score": 0.7, "retention": 0.8}, {"t": 1.0, "task_score": 0.7, "retention": 0.7}]


def test_pick_rules():
    ts = [0.5, 0.75, 1.0]
    assert pick_blend(ROWS, ts, None, None)["t"] == 0.75  # best task score; the tie goes to better retention
    assert pick_blend(ROWS, ts, "best-retention", None)["t"] == 0.5  # the base (t=0, not asked for) is not a candidate
    assert pick_blend(ROWS, ts, None, 0.85)["t"] == 0.5
    assert pick_blend(ROWS, ts, "1", None)["t"] == 1.0
    with pytest.raises(TunelabError, match=r"no blend keeps probe retention >= 0.95 \(t=0.5: task 0.600, retention 0.900"):
        pick_blend(ROWS, ts, None, 0.95)
    with pytest.raises(TunelabError, match="t=0.25 is not among the blends evaluated"):
        pick_blend(ROWS, ts, "0.25", None)
    with pytest.raises(TunelabError, match="leave out --pick best-retention"):
        pick_blend(ROWS, ts, "best-retention", 0.5)
