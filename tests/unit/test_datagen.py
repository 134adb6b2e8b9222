"""Training data made by a model, on tiny models: `tunelab data generate` (a teacher's answers as SFT data with
provenance) and `tunelab data preferences` (pairs from a run's own mistakes, never on its evaluation split)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data import load_examples
from tunelab.data.preferences import load_preferences
from tunelab.datagen.generate import complete, generate_sft, load_teacher
from tunelab.datagen.mistakes import find_mistakes
from tunelab.datagen.prompts import Prompt, read_prompts
from tunelab.errors import DataError
from tunelab.generation import SamplingSettings, generate

SYSTEM = {"role": "system", "content": "Answer briefly."}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat(n: int, seed: int = 0) -> list[dict]:
    words = ["red", "blue", "green", "black", "white", "pink"]
    return [{"messages": [{"role": "user", "content": f"Colour {i % 7}?"}, {"role": "assistant", "content": f"It is {words[(i + seed) % 6]}."}]}
            for i in range(n)]


def _invoke(*args: str):
    return CliRunner().invoke(app, ["data", *args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama):
    """A LoRA run of a few steps on the tiny llama, with a recorded eval split."""
    from tunelab.resolve import load_config
    from tunelab.recipes import sft

    root = tmp_path_factory.mktemp("datagen-run")
    train, held = _jsonl(root / "train.jsonl", _chat(24)), _jsonl(root / "eval.jsonl", _chat(6, seed=3))
    cfg = load_config(None, [f"model={tiny_llama}", f"data.train={train}", f"data.eval={held}", f"output_dir={root / 'run'}",
                             "train.batch_size=4", "train.lr=5e-2", "train.max_steps=3", "train.warmup_ratio=0",
                             "eval.probe=false", "eval.before=false", "eval.max_new_tokens=8", "method.name=lora", "method.r=4"])
    return SimpleNamespace(dir=sft.main(cfg).run_dir, train=train, eval=held)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return _jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [SYSTEM, {"role": "user", "content": "Colour 1?"}]},
        {"messages": [{"role": "user", "content": "Colour 2?"}, {"role": "assistant", "content": "ignored answer"}]},
        {"prompt": "Colour 3?", "completion": "also ignored"},
        {"prompt": "Colour 4?", "system": "Be terse."},
    ])


def test_generate_writes_sft_data_that_validates_with_provenance(tmp_path, tiny_llama, prompts_file):
    out = tmp_path / "gen" / "sft.jsonl"
    result = _invoke("generate", "--model", str(tiny_llama), "--prompts", str(prompts_file), "--out", str(out),
                     "--max-new-tokens", "4", "--keep-truncated")
    assert result.exit_code == 0, result.output
    examples = load_examples([str(out)])  # tunelab's own validation accepts it (and ignores meta)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(examples) == len(records) == 4
    contexts = [r["messages"][:-1] for r in records]
    assert contexts[0] == [SYSTEM, {"role": "user", "content": "Colour 1?"}]
    assert contexts[1] == [{"role": "user", "content": "Colour 2?"}]  # the answer in the prompts file is not kept
    assert contexts[3][0] == {"role": "system", "content": "Be terse."}
    assert all(r["messages"][-1]["content"] not in ("ignored answer", "also ignored") for r in records)
    for line, record in enumerate(records, start=1):
        meta = record["meta"]
        assert meta["source"] == f"{prompts_file}:{line}"
        assert meta["teacher"] == {"spec": str(tiny_llama), "kind": "model", "resolved": str(tiny_llama.resolve())}
        assert meta["decoding"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4, "seed": 0, "stop": [], "batch_size": 16}
        assert meta["finish_reason"] in ("stop", "length")


def test_generate_from_a_run_answers_as_evaluation_loads_it(tmp_path, tiny_run, prompts_file):
    from tunelab.evaluation.generate import generate_answers
    from tunelab.evaluation.run import load_for_eval

    teacher = load_teacher(str(tiny_run.dir))
    assert teacher.provenance["kind"] == "run" and teacher.provenance["resolved"] == str(tiny_run.dir.resolve())
    assert teacher.provenance["artifact"].endswith("adapter") and teacher.provenance["config_hash"]
    prompts = read_prompts(str(prompts_file))
    records, summary = generate_sft(teacher, prompts, SamplingSettings(max_new_tokens=6), batch_size=3, keep_truncated=True)
    loaded = load_for_eval(str(tiny_run.dir))
    expected = generate_answers(loaded.model, loaded.tokenizer, [list(p.messages) for p in prompts], max_new_tokens=6)
    written = {r["meta"]["source"]: r["messages"][-1]["content"] for r in records}
    assert written == {p.source: a for p, a in zip(prompts, expected) if a}
    assert summary.n_prompts == 4 and summary.n_written == len(records)
    assert teacher.provenance["base"] in {r["meta"]["teacher"]["base"] for r in records}


def test_sampled_answers_in_batches_equal_one_seeded_generate_call(tiny_llama):
    teacher = load_teacher(str(tiny_llama))
    conversations = [[{"role": "user", "content": f"Colour {i}?"}] for i in range(5)]
    settings = SamplingSettings(temperature=1.0, max_new_tokens=5, seed=7)
    batched = complete(teacher.loaded, conversations, settings, batch_size=2)
    whole = generate(teacher.loaded.model, teacher.loaded.tokenizer, conversations, settings, batch_size=2)
    assert [c.token_ids for c in batched] == [c.token_ids for c in whole]
    other = complete(teacher.loaded, conversations, SamplingSettings(temperature=1.0, max_new_tokens=5, seed=8), batch_size=2)
    assert [c.token_ids for c in other] != [c.token_ids for c in whole]  # the seed is used


def test_truncated_answers_are_left_out_unless_kept(tiny_llama):
    teacher = load_teacher(str(tiny_llama))
    prompts = [Prompt(({"role": "user", "content": f"Colour {i}?"},), f"p.jsonl:{i}") for i in range(1, 4)]
    settings = SamplingSettings(max_new_tokens=2)
    kept, summary = generate_sft(teacher, prompts, settings, keep_truncated=True)
    dropped, _ = generate_sft(teacher, prompts, settings)
    assert len(dropped) == len(kept) - len(summary.truncated)
    assert all(r["meta"]["finish_reason"] == "stop" for r in dropped)


def test_bad_prompts_file_lists_every_bad_line_and_writes_nothing(tmp_path, tiny_llama):
    bad = _jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "fine"},
        "{not json",
        {"messages": [{"role": "assistant", "content": "no question"}]},
        {"messages": [{"role": "user", "content": "q"}, SYSTEM]},
        {"prompt": "   "},
        ["a list"],
        {"question": "wrong field"},
        {"messages": [{"role": "robot", "content": "q"}]},
    ])
    with pytest.raises(DataError) as caught:
        read_prompts(str(bad))
    lines = list(dict.fromkeys(p.split(": ", 1)[0] for p in caught.value.problems))  # in file order, line 4 twice
    assert lines == [f"{bad}:{n}" for n in range(2, 9)], caught.value.problems
    assert "end with a user turn" in caught.value.problems[1] and "'prompt' or 'messages'" not in caught.value.problems[1]
    out = tmp_path / "out.jsonl"
    result = _invoke("generate", "--model", str(tiny_llama), "--prompts", str(bad), "--out", str(out))
    assert result.exit_code == 2 and f"{bad}:3" in result.output and not out.exists()


def test_instruction_files_in_other_formats_are_read_without_their_answer(tmp_path):
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a colour.", "input": "", "output": "Red."}])
    [prompt] = read_prompts(str(alpaca), system_prompt="Be brief.")
    assert prompt.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."})
    assert prompt.source == f"{alpaca}:1"


def test_a_failed_generation_leaves_the_previous_output_untouched(tmp_path, tiny_llama, prompts_file, monkeypatch):
    import tunelab.datagen.generate as datagen

    calls = []

    def fail_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("generation died")
        return generate(*args, **kwargs)

    monkeypatch.setattr(datagen, "generate", fail_on_second_batch)
    out = tmp_path / "sft.jsonl"
    out.write_text("previous good file\n")
    result = _invoke("generate", "--model", str(tiny_llama), "--prompts", str(prompts_file), "--out", str(out),
                     "--max-new-tokens", "3", "--batch-size", "2", "--keep-truncated")
    assert isinstance(result.exception, RuntimeError) and len(calls) == 2
    assert out.read_text() == "previous good file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "sft.jsonl"]  # no temporary left behind


def test_generate_refuses_to_overwrite_its_prompts(tiny_llama, prompts_file):
    before = prompts_file.read_text()
    result = _invoke("generate", "--model", str(tiny_llama), "--prompts", str(prompts_file), "--out", str(prompts_file))
    assert result.exit_code == 2 and "is the input file" in result.output and prompts_file.read_text() == before


@pytest.mark.parametrize("copy", [False, True], ids=["same path", "a copy"])
def test_preferences_refuse_the_runs_evaluation_split(tmp_path, tiny_run, copy):
    data = tiny_run.eval
    if copy:
        data = tmp_path / "renamed.jsonl"
        shutil.copy(tiny_run.eval, data)
    out = tmp_path / "pairs.jsonl"
    result = _invoke("preferences", "--model", str(tiny_run.dir), "--data", str(data), "--metric", "exact_match", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "evaluation split" in result.output and str(tiny_run.eval) in result.output
    assert not out.exists() and not (tmp_path / "pairs.summary.json").exists()
    assert "Never use the evaluation split" in " ".join(_invoke("preferences", "--help").output.split())


def test_preferences_need_a_run_directory(tmp_path, tiny_llama):
    result = _invoke("preferences", "--model", str(tiny_llama), "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "p.jsonl"))
    assert result.exit_code == 2 and "not a tunelab run directory" in result.output


def _answers(run_dir: Path, questions: list[str]) -> list[str]:
    """The run's greedy answers (8 new tokens, as its eval recorded) to single-turn questions."""
    from tunelab.evaluation.generate import generate_answers
    from tunelab.evaluation.run import load_for_eval

    loaded = load_for_eval(str(run_dir))
    return generate_answers(loaded.model, loaded.tokenizer, [[{"role": "user", "content": q}] for q in questions], max_new_tokens=8)


def test_pairs_only_where_the_model_is_wrong_and_they_load_as_preferences(tmp_path, tiny_run):
    questions = [f"Colour {i}?" for i in range(6)]
    answers = _answers(tiny_run.dir, questions)
    assert all(answers), answers  # the trained tiny model answers something to each
    # Even examples: the reference is the model's own answer (right); odd ones: a reference it never gives (wrong).
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a if i % 2 == 0 else f"zz {i} qq"}]}
            for i, (q, a) in enumerate(zip(questions, answers))]
    data, out = _jsonl(tmp_path / "train_subset.jsonl", rows), tmp_path / "pairs.jsonl"
    result = _invoke("preferences", "--model", str(tiny_run.dir), "--data", str(data), "--metric", "exact_match",
                     "--out", str(out), "--max-new-tokens", "8", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    pairs = load_preferences([str(out)])  # what recipe: dpo reads
    assert [p.source for p in pairs] == [f"{out}:{n}" for n in (1, 2, 3)]
    assert [p.chosen for p in pairs] == ["zz 1 qq", "zz 3 qq", "zz 5 qq"]
    assert [p.rejected for p in pairs] == [answers[1], answers[3], answers[5]]
    assert [p.context for p in pairs] == [({"role": "user", "content": questions[i]},) for i in (1, 3, 5)]
    metas = [json.loads(line)["meta"] for line in out.read_text().splitlines()]
    assert [m["source"] for m in metas] == [f"{data}:{n}" for n in (2, 4, 6)] and all(m["score"] == 0.0 for m in metas)
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert (summary["n_examples"], summary["n_wrong"], summary["n_pairs"], summary["score"]) == (6, 3, 3, 0.5)
    assert summary["metric"] == "exact_match" and summary["skipped"] == []


def test_a_model_that_is_always_right_gives_no_pairs(tmp_path, tiny_run):
    from tunelab.evaluation.run import load_for_eval

    questions = ["Colour 1?", "Colour 2?"]
    answers = _answers(tiny_run.dir, questions)
    examples = load_examples([str(_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in zip(questions, answers)]))])
    pairs, summary = find_mistakes(load_for_eval(str(tiny_run.dir)), examples, "exact_match", {}, max_new_tokens=8)
    assert pairs == [] and (summary.n_examples, summary.n_wrong, summary.n_pairs) == (2, 0, 0)
    out = tmp_path / "pairs.jsonl"
    result = _invoke("preferences", "--model", str(tiny_run.dir), "--data", str(tmp_path / "d.jsonl"), "--metric", "exact_match",
                     "--out", str(out), "--max-new-tokens", "8")
    assert result.exit_code == 0 and not out.exists() and "no pairs" in result.output


def test_a_wrong_answer_identical_to_the_reference_is_never_a_pair(tmp_path, tiny_run, monkeypatch):
    from tunelab.evaluation.run import load_for_eval

    (tmp_path / "always_wrong.py").write_text("def score(prediction, reference):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [answer] = _answers(tiny_run.dir, ["Colour 1?"])
    rows = [{"messages": [{"role": "user", "content": "Colour 1?"}, {"role": "assistant", "content": answer}]},
            {"messages": [{"role": "user", "content": "Colour 2?"}, {"role": "assistant", "content": "zz never"}]}]
    examples = load_examples([str(_jsonl(tmp_path / "d.jsonl", rows))])
    pairs, summary = find_mistakes(load_for_eval(str(tiny_run.dir)), examples, "always_wrong:score", {}, max_new_tokens=8)
    assert [p["chosen"] for p in pairs] == ["zz never"] and all(p["chosen"] != p["rejected"] for p in pairs)
    assert summary.n_wrong == 2 and summary.n_pairs == 1 and "equals the reference" in summary.skipped[0]["reason"]


@pytest.mark.parametrize("fmt", ["auto", "messages"])
def test_a_runs_recorded_format_still_reads_prompts_without_answers(tmp_path, fmt):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Colour 1?"}]}])
    assert read_prompts(str(prompts), format=fmt, template=None, system_prompt=None)[0].messages == ({"role": "user", "content": "Colour 1?"},)
