"""The untuned model's saved results are reused only when they were scored exactly as the run scores now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from tunelab.errors import TunelabError
from tunelab.evaluation.run import LoadedModel
from tunelab.stages import evaluation
from tunelab.stages.evaluation import check_eval_settings, evaluate_before, save_before
from tunelab.stages.setup import load_base_model, load_prepared_tokenizer, read_examples


@pytest.fixture
def untuned(make_config):
    config = make_config()
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    return LoadedModel(load_base_model(config, model_path, tokenizer, added, "cpu"), tokenizer, "untuned")


@pytest.fixture
def calls(monkeypatch):
    """Which untuned results were computed (not reused)."""
    seen: list[str] = []
    real_task, real_probe = evaluation.evaluate_task, evaluation.probe_answers
    monkeypatch.setattr(evaluation, "evaluate_task", lambda *a, **k: seen.append(a[3]) or real_task(*a, **k))
    monkeypatch.setattr(evaluation, "probe_answers", lambda *a, **k: seen.append("probe") or real_probe(*a, **k))
    return seen


def _before(config, loaded) -> tuple[dict, str]:
    console = Console(record=True, width=300)
    result = evaluate_before(config, loaded, read_examples(config), Path(config.output_dir), console)
    save_before(Path(config.output_dir), result)
    return result, console.export_text()


@pytest.fixture
def probe(tmp_path) -> Path:
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Colour {i}?", "answers": ["red"]}) + "\n" for i in range(3)))
    return path


def test_changed_eval_settings_recompute_only_what_they_change(make_config, untuned, calls, probe):
    base = ["eval.max_new_tokens=4", f"eval.probe={probe}", "eval.few_shot=2"]
    first, _ = _before(make_config(*base), untuned)
    assert first["settings"]["task"]["metric"] == "exact_match" and len(calls) == 3
    calls.clear()

    # batch_size does not change greedy answers: everything is reused
    again, text = _before(make_config(*base, "eval.batch_size=2"), untuned)
    assert calls == [] and again["zero_shot"] == first["zero_shot"] and "again" not in text

    # another metric: the task results are scored again, the probe (which does not use the metric) is kept
    changed, text = _before(make_config(*base, "eval.metric=contains"), untuned)
    assert sorted(calls) == ["untuned, 2-shot", "untuned, zero-shot"]
    assert changed["zero_shot"]["metric"] == "contains" and changed["settings"]["task"]["metric"] == "contains"
    assert changed["probe"] == first["probe"]
    assert "metric: 'exact_match' → 'contains'" in text
    calls.clear()

    # the probe file's content changed (same path): only the probe is asked again
    probe.write_text(probe.read_text().replace("Colour 0?", "Colour zero?"))
    _, text = _before(make_config(*base, "eval.metric=contains"), untuned)
    assert calls == ["probe"] and "probe.items_hash" in text
    calls.clear()

    # fewer examples (eval.limit): scored again
    limited, _ = _before(make_config(*base, "eval.metric=contains", "eval.limit=2"), untuned)
    assert "untuned, zero-shot" in calls and limited["zero_shot"]["n"] == 2


def test_a_file_without_recorded_settings_is_recomputed(make_config, untuned, calls):
    config = make_config("eval.max_new_tokens=4")
    old, _ = _before(config, untuned)
    old.pop("settings")
    (Path(config.output_dir) / "eval_before.json").write_text(json.dumps(old))
    calls.clear()
    result, text = _before(config, untuned)
    assert calls == ["untuned, zero-shot"] and "settings" in result and "older tunelab" in text


def test_before_from_scored_another_way_is_refused_before_anything_loads(make_config, untuned, tmp_path):
    shared = make_config("eval.max_new_tokens=4", output="shared")
    _before(shared, untuned)
    shared_file = Path(shared.output_dir) / "eval_before.json"
    same = make_config("eval.max_new_tokens=4", "eval.batch_size=3", f"eval.before_from={shared_file}", output="same")
    check_eval_settings(same, read_examples(same))  # batch_size only: fine
    result, _ = _before(same, untuned)
    assert result["zero_shot"] == json.loads(shared_file.read_text())["zero_shot"]
    other = make_config("eval.max_new_tokens=5", f"eval.before_from={shared_file}", output="other")
    with pytest.raises(TunelabError, match=r"eval.before_from.*other evaluation settings.*max_new_tokens: 4 → 5"):
        check_eval_settings(other, read_examples(other))
