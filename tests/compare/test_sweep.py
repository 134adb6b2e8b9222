"""tunelab compare on a tiny model: every candidate is a normal run; the report restates their own files."""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.compare.sweep import candidate_tree, parse_candidates, run_compare
from tunelab.errors import TunelabError


@pytest.fixture
def sweep_config(tmp_path, chat_data, tiny_llama):
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_llama), "method": {"name": "lora", "r": 4},
        "data": {"train": str(chat_data["train"]), "eval": str(chat_data["eval"])},
        "train": {"max_steps": 2, "batch_size": 4, "warmup_ratio": 0},
        "eval": {"max_new_tokens": 4, "probe": True},
        "output_dir": str(tmp_path / "run"),
    }))
    return path


def test_sweep_report_matches_each_candidates_own_files(sweep_config, tmp_path):
    sweep = run_compare(sweep_config, [], parse_candidates("zero_shot,few_shot,rag,lora,prompt"), tmp_path / "sweep")
    report = json.loads((sweep / "report.json").read_text())
    rows = {c["name"]: c for c in report["candidates"]}
    assert set(rows) == {"zero_shot", "few_shot", "rag", "lora", "prompt"}
    untuned = json.loads((sweep / "untuned" / "eval_before.json").read_text())
    for name in ("zero_shot", "few_shot", "rag"):
        assert rows[name]["score"] == untuned[name]["score"]
    for name in ("lora", "prompt"):
        own = json.loads((sweep / name / "eval.json").read_text())
        manifest = json.loads((sweep / name / "manifest.json").read_text())
        assert rows[name]["status"] == "finished"
        assert rows[name]["score"] == own["tuned"]["score"]
        assert rows[name]["retention"] == own["forgetting"]["retention"]
        assert rows[name]["trainable_parameters"] == manifest["trainable_parameters"]
        assert rows[name]["artifact_mb"] == manifest["artifact_mb"]
        assert rows[name]["train_seconds"] == manifest["train_seconds"]
        # the shared untuned evaluation was reused, not recomputed
        assert own["baselines"]["zero_shot"]["score"] == untuned["zero_shot"]["score"]
    html = (sweep / "report.html").read_text()
    md = (sweep / "report.md").read_text()
    assert "lora" in html and "prompt" in md and "<svg" in html

    # Re-running the same command reuses finished candidates instead of training them again.
    stamp = (sweep / "lora" / "manifest.json").stat().st_mtime_ns
    run_compare(sweep_config, [], parse_candidates("zero_shot,few_shot,rag,lora,prompt"), tmp_path / "sweep")
    assert (sweep / "lora" / "manifest.json").stat().st_mtime_ns == stamp

    # Other eval settings would put baselines scored one way next to tuned scores scored another: refused
    # before anything is evaluated again.
    untuned_stamp = (sweep / "untuned" / "eval_before.json").stat().st_mtime_ns
    with pytest.raises(TunelabError, match=r"lora was scored with other evaluation settings.*max_new_tokens: 4 → 3"):
        run_compare(sweep_config, ["eval.max_new_tokens=3"], parse_candidates("zero_shot,lora"), tmp_path / "sweep")
    assert (sweep / "untuned" / "eval_before.json").stat().st_mtime_ns == untuned_stamp


def test_a_failing_candidate_is_reported_and_the_sweep_goes_on(sweep_config, tmp_path):
    # The config's own method options are carried to its candidate: freeze with more blocks than the model has fails.
    tree = yaml.safe_load(sweep_config.read_text())
    tree["method"] = {"name": "freeze", "last_n_blocks": 9}
    sweep_config.write_text(yaml.safe_dump(tree))
    sweep = run_compare(sweep_config, [], parse_candidates("zero_shot,freeze,ia3"), tmp_path / "sweep")
    rows = {c["name"]: c for c in json.loads((sweep / "report.json").read_text())["candidates"]}
    assert rows["freeze"]["status"] == "failed" and "last_n_blocks" in rows["freeze"]["error"]
    assert rows["ia3"]["status"] == "finished"


def test_candidate_configs_are_comparable(sweep_config, tmp_path):
    from tunelab.resolve import load_config

    config = load_config(sweep_config, ["train.lr=5e-4"])
    lora = candidate_tree(config, "lora", tmp_path / "l", tmp_path / "b.json")
    full = candidate_tree(config, "full", tmp_path / "f", tmp_path / "b.json")
    qlora = candidate_tree(config, "qlora", tmp_path / "q", tmp_path / "b.json")
    assert lora["train"]["lr"] == 5e-4 and full["train"]["lr"] == 5e-5  # the config's rate only for its own method
    adapter = candidate_tree(config, "adapter", tmp_path / "a", tmp_path / "b.json")
    assert qlora["method"]["r"] == 4 and "r" not in full["method"]  # options carried where the method extends lora's
    assert adapter["method"] == {"name": "adapter"}  # lora's target_modules mean something else there
    from tunelab.resolve import validate_method_options

    for tree in (lora, full, qlora, adapter):
        assert validate_method_options(tree["method"]) == []
    for tree in (lora, full, qlora):
        assert tree["train"]["max_steps"] == 2 and tree["train"]["batch_size"] == 4 and tree["data"] == lora["data"]


def test_unknown_candidates_are_refused_before_anything_runs():
    with pytest.raises(TunelabError, match="unknown candidate"):
        parse_candidates("lora,bogus")
    with pytest.raises(TunelabError, match="twice"):
        parse_candidates("lora,lora")


def test_time_budget_gives_every_candidate_the_same_seconds(sweep_config, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunelab import cli
    from tunelab.compare import sweep as sweep_module
    from tunelab.resolve import load_config

    calls = []
    monkeypatch.setattr(sweep_module, "run_compare", lambda *args, **kwargs: calls.append(args))
    result = CliRunner().invoke(cli.app, ["compare", str(sweep_config), "train.seed=1", "--methods", "lora,full", "--time-budget", "90"])
    assert result.exit_code == 0, result.output
    assert calls[0][1] == ["train.seed=1", "train.max_seconds=90"]

    config = load_config(sweep_config, calls[0][1])
    trees = [candidate_tree(config, name, tmp_path / name, tmp_path / "b.json") for name in ("lora", "full", "prompt")]
    assert {tree["train"]["max_seconds"] for tree in trees} == {90}
    assert "90 s of training each (at most 2 steps)" in sweep_module._budget(config)


def test_changed_eval_settings_rescore_the_untuned_model(sweep_config, tmp_path):
    sweep = run_compare(sweep_config, [], ["zero_shot"], tmp_path / "sweep")
    untuned = json.loads((sweep / "untuned" / "eval_before.json").read_text())
    assert untuned["settings"]["task"]["max_new_tokens"] == 4
    run_compare(sweep_config, ["eval.max_new_tokens=3", "eval.batch_size=2"], ["zero_shot"], sweep)
    untuned = json.loads((sweep / "untuned" / "eval_before.json").read_text())
    assert untuned["settings"]["task"]["max_new_tokens"] == 3
    assert all(len(e["prediction"].split()) <= 3 for e in untuned["zero_shot"]["examples"])


def test_an_out_dir_that_is_not_a_sweep_is_refused_and_left_untouched(sweep_config, tmp_path):
    mine = tmp_path / "mine"
    (mine / "lora").mkdir(parents=True)
    (mine / "lora" / "notes.txt").write_text("my notes")
    with pytest.raises(TunelabError, match=r"not a tunelab sweep.*new or empty directory"):
        run_compare(sweep_config, [], ["zero_shot", "lora"], mine)
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["lora", "lora/notes.txt"]


def test_a_candidate_folder_holding_unknown_files_is_never_deleted(sweep_config, tmp_path):
    sweep = run_compare(sweep_config, [], ["zero_shot"], tmp_path / "sweep")
    assert yaml.safe_load((sweep / "sweep.yaml").read_text())["kind"] == "tunelab-sweep"
    (sweep / "full").mkdir()
    (sweep / "full" / "notes.txt").write_text("my notes")
    with pytest.raises(TunelabError, match=r"full.*notes.txt"):
        run_compare(sweep_config, [], ["zero_shot", "full"], sweep)
    assert (sweep / "full" / "notes.txt").read_text() == "my notes"


def test_only_an_attempt_the_trainer_began_is_cleared(tmp_path):
    from tunelab.compare.sweep import _clear_unfinished_attempt

    attempt = tmp_path / "lora"
    attempt.mkdir()
    (attempt / "config.yaml").write_text("method: lora\n")
    (attempt / ".manifest.json.k2j3").write_text("{")  # a temporary file of an interrupted atomic write
    _clear_unfinished_attempt(attempt)
    assert not attempt.exists()
    (attempt / "sub").mkdir(parents=True)
    with pytest.raises(TunelabError, match="sub"):
        _clear_unfinished_attempt(attempt)
    assert (attempt / "sub").is_dir()


def test_run_features_a_method_cannot_take_come_from_its_own_flag(sweep_config, tmp_path, monkeypatch):
    from tunelab.compare import sweep as sweep_module
    from tunelab.resolve import load_config
    from tunelab.methods import get_method

    config = load_config(sweep_config, ["train.packing=true", "train.gradient_checkpointing=true"])
    for name in ("prefix", "prompt"):
        tree = candidate_tree(config, name, tmp_path / name, tmp_path / "b.json")
        assert tree["train"]["packing"] is False and tree["train"]["gradient_checkpointing"] is False
    assert candidate_tree(config, "lora", tmp_path / "l", tmp_path / "b.json")["train"]["packing"] is True

    class NoPacking:  # a new method that cannot pack: nothing in the sweep names it
        def __init__(self, real):
            self.real = real
            self.incompatible = frozenset({"packing"})

        def __getattr__(self, attribute):
            return getattr(self.real, attribute)

    monkeypatch.setattr(sweep_module, "get_method", lambda name: NoPacking(get_method(name)) if name == "ia3" else get_method(name))
    tree = candidate_tree(config, "ia3", tmp_path / "i", tmp_path / "b.json")
    assert tree["train"]["packing"] is False and tree["train"]["gradient_checkpointing"] is True
