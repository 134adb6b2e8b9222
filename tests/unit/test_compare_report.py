import json
import re

import pytest

from tunelab.compare import report as report_module
from tunelab.compare import results as results_module
from tunelab.compare.choose import choose, recommend, within
from tunelab.compare.report import write_report
from tunelab.compare.results import CandidateResult, display, format_mb, format_param_share, format_score, format_seconds
from tunelab.errors import TunelabError

TOTAL = 134_515_008


def cand(name, kind="trained", status="finished", score=None, retention=None, lost=(), trainable=None, **extra):
    record = {"name": name, "kind": kind, "status": status, "metric": "sql_exec", "score": score, "retention": retention,
              "probe_lost": list(lost)}
    if kind == "trained" and status == "finished":
        record.update(
            probe_right_before=30, probe_right_after=30 - len(lost) if retention is not None else None,
            probe_items=40 if retention is not None else None, trainable_parameters=trainable, total_parameters=TOTAL,
            artifact_mb=trainable * 4 / 2**20 if trainable else None, peak_memory_mb=2100.5,
            peak_memory_kind="cuda_max_allocated", train_seconds=95.25, tokens_per_s=5321.4,
            loss_curve=[(s, 3.0 / (1 + s / 20)) for s in range(1, 101, 10)], eval_seconds=14.2, run_dir=f"runs/{name}")
    record.update(extra)
    return CandidateResult.from_dict(record)


def sweep():
    return [
        cand("zero_shot", "baseline", score=0.125, eval_seconds=5.0),
        cand("few_shot", "baseline", score=0.4),
        cand("rag", "baseline", score=0.55),
        cand("prompt", score=0.3, retention=1.0, trainable=9216),
        cand("lora", score=0.78, retention=0.9, lost=["p1", "p2", "p3"], trainable=921_600),
        cand("ia3", score=0.70, retention=29 / 30, lost=["p1"], trainable=30_000),
        cand("full", score=0.80, retention=23 / 30, lost=[f"p{i}" for i in range(7)], trainable=TOTAL),
        cand("qlora", status="failed", error="bitsandbytes needs a CUDA GPU | pip install bitsandbytes"),
        cand("prefix", status="skipped", error="budget exhausted"),
    ]


META = {"model": "smollm2-135m-instruct", "task": "sql", "config": "sql.yaml", "metric": "sql_exec", "eval_examples": 40,
        "budget": "200 steps each", "device": "CPU (test)", "date": "2025-01-01"}


# --- recommendation ---------------------------------------------------------------------------------


def test_tolerance_is_absolute_points_or_relative_share():
    assert within(0.78, 0.80)  # 2 points (despite 0.80 - 0.78 > 0.02 in floating point)
    assert not within(0.77, 0.80)  # 3 points and 96.25%
    assert within(0.95, 0.975)  # 2.5 points, but 97.4% of the best
    assert within(0.975, 1.0) and not within(0.96, 1.0) and within(0.0, 0.0) and within(0.9, 0.8)


def test_lora_within_tolerance_of_full_wins_on_retention_and_says_why_in_numbers():
    rec = choose(sweep())
    assert rec.choice == "lora" and rec.fine_tune is True
    text = rec.text
    assert "lora reaches 97.5% of full's score (78.0% vs 80.0%" in text
    assert "retention 90.0% vs 76.7%; loses 3 probe items instead of 7" in text
    assert "0.685% of the parameters instead of 100%" in text
    assert "rag, scores 55.0%" in text and text.count("Choose lora.") == 1
    # failed and skipped are excluded and listed with their error
    assert "qlora (failed: bitsandbytes needs a CUDA GPU" in text and "prefix (skipped: budget exhausted)" in text
    assert recommend(sweep()) == text


def test_equal_retention_prefers_fewer_trainable_parameters_then_smaller_artifact():
    candidates = [cand("full", score=0.80, retention=0.9, lost=["a"], trainable=TOTAL),
                  cand("lora", score=0.79, retention=0.9, lost=["a"], trainable=921_600)]
    rec = choose(candidates)
    assert rec.choice == "lora" and "it trains fewer parameters (921.6K vs 134.5M)" in rec.text
    same_params = [cand("a", score=0.8, retention=0.9, trainable=1000, artifact_mb=9.0),
                   cand("b", score=0.8, retention=0.9, trainable=1000, artifact_mb=2.0)]
    assert choose(same_params).choice == "b" and "artifact is smaller (2.0 MB vs 9.0 MB)" in choose(same_params).text


def test_best_score_wins_when_nothing_else_is_within_tolerance():
    candidates = [cand("lora", score=0.70, retention=1.0, trainable=921_600), cand("full", score=0.80, retention=0.5, lost=["a"], trainable=TOTAL)]
    rec = choose(candidates)
    assert rec.choice == "full" and "full has the best sql_exec score (80.0%)" in rec.text
    assert "the next is lora at 70.0%" in rec.text and "It keeps 50.0% of the probe (loses 1 probe item)" in rec.text


def test_baseline_within_tolerance_means_do_not_fine_tune():
    candidates = [cand("few_shot", "baseline", score=0.785), cand("lora", score=0.80, retention=0.9, trainable=921_600)]
    rec = choose(candidates)
    assert rec.choice == "few_shot" and rec.fine_tune is False
    assert "few_shot scores 78.5% (sql_exec) without any training" in rec.text
    assert "98.1% of the best fine-tune's score (lora, 78.5% vs 80.0%" in rec.text and "Do not fine-tune: use few_shot" in rec.text
    above = choose([cand("rag", "baseline", score=0.9), cand("lora", score=0.80, retention=0.9, trainable=10)])
    assert above.choice == "rag" and "above the best fine-tune (lora, 80.0%)" in above.text and above.fine_tune is False


def test_failed_candidates_are_excluded_even_with_a_score_and_all_failed_means_no_choice():
    candidates = [cand("full", status="failed", score=0.99, error="out of memory"), cand("lora", score=0.5, retention=1.0, trainable=10)]
    rec = choose(candidates)
    assert rec.choice == "lora" and "lora is the only fine-tune that finished (50.0% sql_exec)" in rec.text
    assert "Excluded: full (failed: out of memory)" in rec.text
    nothing = choose([cand("full", status="failed", error="boom"), cand("lora", status="skipped", error="budget")])
    assert nothing.choice is None and nothing.fine_tune is None and "nothing to recommend" in nothing.text
    assert "full (failed: boom); lora (skipped: budget)" in nothing.text
    assert choose([]).choice is None
    no_score = choose([cand("lora", score=None, retention=1.0, trainable=10), cand("ia3", score=0.2, retention=1.0, trainable=10)])
    assert no_score.choice == "ia3" and "lora (finished but no score recorded)" in no_score.text


def test_only_baselines_leaves_the_fine_tuning_question_open():
    rec = choose([cand("zero_shot", "baseline", score=0.1), cand("rag", "baseline", score=0.3), cand("lora", status="failed", error="x")])
    assert rec.choice == "rag" and rec.fine_tune is None and "No fine-tuned candidate finished" in rec.text


def test_ties_go_to_the_candidate_listed_first():
    twins = [cand("ia3", score=0.8, retention=0.9, trainable=100, artifact_mb=1.0, train_seconds=10.0),
             cand("lora", score=0.8, retention=0.9, trainable=100, artifact_mb=1.0, train_seconds=10.0)]
    rec = choose(twins)
    assert rec.choice == "ia3" and "listed first and everything else is equal" in rec.text
    assert choose(list(reversed(twins))).choice == "lora"
    baseline_tie = [cand("few_shot", "baseline", score=0.5), cand("rag", "baseline", score=0.5)]
    assert choose(baseline_tie).choice == "few_shot"


def test_missing_retention_ranks_after_measured_and_is_said():
    candidates = [cand("full", score=0.80, retention=None, trainable=TOTAL), cand("lora", score=0.79, retention=0.8, lost=["a"], trainable=10)]
    rec = choose(candidates)
    assert rec.choice == "lora" and "its forgetting was measured (retention 80.0%) and full's was not" in rec.text
    alone = choose([cand("full", score=0.80, retention=None, trainable=TOTAL)])
    assert "Its forgetting was not measured" in alone.text


# --- records and formatting -------------------------------------------------------------------------


def test_candidate_record_round_trip_and_validation():
    record = {"name": "lora", "kind": "trained", "status": "finished", "score": 0.5, "retention": 0.9,
              "probe_lost": [{"id": "q7", "question": "?", "after": "no"}], "loss_curve": [[1, 2.5], [2, 2.0]], "seed": 3}
    c = CandidateResult.from_dict(record)
    assert c.probe_lost == ["q7"] and c.loss_curve == [(1, 2.5), (2, 2.0)] and c.extra == {"seed": 3}
    assert CandidateResult.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(TunelabError, match="kind"):
        CandidateResult.from_dict({"name": "x", "kind": "other", "status": "finished"})
    with pytest.raises(TunelabError, match="status"):
        CandidateResult.from_dict({"name": "x", "kind": "trained", "status": "done"})
    with pytest.raises(TunelabError, match="name"):
        CandidateResult.from_dict({"kind": "trained", "status": "finished"})


def test_formatting_in_human_units():
    assert format_score(0.7812) == "78.1%" and format_score(None) == "—" and format_score(1.0) == "100.0%"
    assert format_param_share(921_600, TOTAL) == "0.685%" and format_param_share(TOTAL, TOTAL) == "100%"
    assert format_seconds(12.34) == "12.3 s" and format_seconds(125) == "2 min 05 s" and format_seconds(7325) == "2 h 02 min"
    assert format_mb(0.5) == "512.0 KB" and format_mb(3.25) == "3.2 MB" and format_mb(2048) == "2.00 GB"
    shown = display(cand("zero_shot", "baseline", score=0.125))
    assert shown["retention"] == "— (untouched)" and shown["score"] == "12.5% sql_exec"
    trained = display(sweep()[4])
    assert trained["trainable"] == "921.6K (0.685%)" and trained["probe"] == "30 → 27 of 40" and trained["probe_lost"] == "p1, p2, p3"
    assert trained["peak_memory"] == "2.05 GB (GPU)" and trained["tokens_per_s"] == "5,321 tok/s"


# --- written report ---------------------------------------------------------------------------------


def _md_rows(markdown: str) -> list[list[str]]:
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table[1:]]


def test_report_files_md_table_html_and_json(tmp_path):
    candidates = sweep()
    md_path, html_path = write_report(tmp_path, candidates, META)
    assert md_path == tmp_path / "report.md" and html_path == tmp_path / "report.html"
    markdown, page = md_path.read_text(), html_path.read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    for plot in ("learned_vs_forgot", "loss_curves", "costs"):
        assert (tmp_path / "report-plots" / f"{plot}.svg").is_file() and f"report-plots/{plot}.svg" in markdown

    # the markdown table: one row per candidate, in order, each cell as display() shows it
    rows = _md_rows(markdown)
    assert len(rows) == len(candidates)
    columns = [key for key, _ in results_module.COLUMNS]
    for row, c in zip(rows, candidates):
        expected = display(c)
        if c.name == "lora":
            expected["name"] = "**lora** ★"
        assert row == [expected[key] for key in columns]
    assert "| 78.0% sql_exec |" in markdown and "| — (untouched) |" in markdown

    # the html: self-contained, three inline svg plots, every name and score string
    assert "http" not in page and "src=" not in page and "<link" not in page
    assert page.count("<svg") == 3 and "<style>" in page
    for c in candidates:
        assert f">{c.name}<" in page or f">{c.name} ★<" in page
        if c.score is not None:
            assert format_score(c.score) in page and format_score(c.score) in markdown
        if c.error:
            assert c.error.split(" | ")[0] in page
    assert "Choose lora." in page and "Choose lora." in markdown
    assert "smollm2-135m-instruct" in page and "200 steps each" in markdown

    # report.json: raw values, the shown strings, the recommendation
    assert data["meta"] == META and data["recommendation"]["choice"] == "lora"
    for record, c in zip(data["candidates"], candidates):
        assert record.pop("display") == display(c)
        assert CandidateResult.from_dict(record) == c


def test_report_with_nothing_finished_still_renders(tmp_path):
    write_report(tmp_path, [cand("full", status="failed", error="out of <memory> & more")], {"task": "t"})
    page = (tmp_path / "report.html").read_text()
    assert "Nothing to plot." in page and "out of &lt;memory&gt; &amp; more" in page and "nothing to recommend" in page
    assert not (tmp_path / "report-plots").exists()


def test_write_is_atomic_and_leaves_no_partial_files(tmp_path, monkeypatch):
    write_report(tmp_path, sweep()[:5], META)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(report_module, "render_html", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, sweep()[:2], META)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        write_report(fresh, sweep()[:2], META)
    assert not fresh.exists() or not any(fresh.rglob("*"))

    monkeypatch.undo()
    calls = []
    real = report_module.write_text_atomic

    def fail_on_html(path, text):  # a crash while writing one file leaves it whole (old or new), never cut
        calls.append(path.name)
        if path.name == "report.html":
            raise OSError("disk full")
        real(path, text)

    monkeypatch.setattr(report_module, "write_text_atomic", fail_on_html)
    with pytest.raises(OSError):
        write_report(tmp_path, sweep()[:3], META)
    assert calls[-1] == "report.html" and (tmp_path / "report.html").read_bytes() == before[tmp_path / "report.html"]
    assert not [p for p in tmp_path.rglob(".report*")]
