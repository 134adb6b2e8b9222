"""The dashboard's data and pages without a browser: runs found under the roots with their status, the ids
mapped back safely, predictions paired untuned/tuned, the JSON API, and no torch import on the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.ui import runs as R

from .fake_runs import make_runs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def roots(tmp_path):
    made = make_runs(tmp_path / "runs")
    return R.Roots.of([tmp_path / "runs"]), made


def test_runs_are_found_with_their_status(roots):
    roots, made = roots
    found = R.find_runs(roots)
    assert sorted(found) == sorted(made.values())
    statuses = {p.name if p.name != "run" else "running": R.status_of(R.open_in(roots, p)) for p in found}
    assert statuses == {"sql-lora": "finished", "running": "running", "old-run": "interrupted", "diverged": "failed"}


def test_ids_map_back_and_nothing_outside_the_roots(roots, tmp_path):
    roots, made = roots
    run_id = roots.run_id(made["running"])
    assert run_id == "0/pipeline/dpo/run" and roots.resolve(run_id) == made["running"]
    outside = tmp_path / "elsewhere"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "manifest.json").write_text("{}")
    for bad in ("0/../elsewhere/x", "1/sql-lora", "x/sql-lora", "0/pipeline", "0//etc/passwd", "0/" + str(outside / "x")):
        assert roots.resolve(bad) is None, bad
    (roots.paths[0] / "linked").symlink_to(outside / "x")  # a link inside the folder to a run outside it
    assert roots.resolve("0/linked") is None and roots.paths[0] / "linked" not in R.find_runs(roots)


def test_predictions_pair_untuned_and_tuned_answers(roots):
    roots, made = roots
    rows = R.predictions(R.open_in(roots, made["finished"]))
    assert [(r["untuned_right"], r["tuned_right"]) for r in rows] == [(False, True), (True, True), (False, True), (False, False)]
    assert rows[0]["untuned"] == "wrong" and rows[0]["tuned"] == "answer 1" and rows[0]["reference"] == "answer 1"
    assert R.probe_changes(R.open_in(roots, made["finished"]))["lost"][0]["id"] == "snow"


def test_pages_and_api(roots):
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    roots, made = roots
    client = TestClient(create_app(list(roots.paths)), base_url="http://127.0.0.1")
    index = client.get("/")
    assert index.status_code == 200 and index.text.count('class="run"') == 4
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert listed["0/sql-lora"]["tuned"] == 0.75 and listed["0/old-run"]["status"] == "interrupted"
    page = client.get("/run/0/sql-lora")
    assert page.status_code == 200 and page.text.count('class="prediction changed"') == 2 and "What colour is snow?" in page.text
    metrics = client.get("/api/metrics/0/pipeline/dpo/run", params={"after": 1}).json()
    assert metrics == {"status": "running", "records": [{"step": 2, "loss": 0.6, "lr": 1e-4}]}
    assert client.get("/run/0/../../etc/passwd").status_code == 404
    assert client.get("/api/metrics/0/nope").status_code == 404
    assert client.get("/static/app.js").status_code == 200


def test_a_run_whose_manifest_is_odd_is_still_shown(roots):
    """A manifest with fields of an unexpected type (edited by hand, another tunelab) or that is no JSON object
    lists its run with what can be read, as the dict reads did, instead of failing the page."""
    import json

    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    roots, made = roots
    odd = roots.paths[0] / "odd"
    odd.mkdir()
    (odd / "manifest.json").write_text(json.dumps({"status": 3, "recipe": "sft", "train_seconds": "12 s", "steps_done": [1],
                                                   "model": {"spec": "tiny", "resolved": "/tmp/tiny"}}))
    (roots.paths[0] / "listed").mkdir()
    (roots.paths[0] / "listed" / "manifest.json").write_text("[1, 2]")
    client = TestClient(create_app(list(roots.paths)), base_url="http://127.0.0.1")
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert listed["0/odd"]["status"] == "3" and listed["0/odd"]["seconds"] == "12 s" and listed["0/odd"]["model"] == "tiny"
    assert listed["0/listed"]["status"] == "unknown" and listed["0/listed"]["model"] is None
    assert client.get("/").text.count('class="run"') == 6 and client.get("/run/0/odd").status_code == 200


def test_the_pages_never_import_torch(roots):
    roots, _ = roots
    code = ("import sys; from fastapi.testclient import TestClient; from tunelab.ui.app import create_app; "
            f"c = TestClient(create_app([{str(roots.paths[0])!r}]), base_url='http://127.0.0.1'); "
            "assert c.get('/').status_code == 200 and c.get('/run/0/sql-lora').status_code == 200; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_ui_command_refuses_a_missing_folder(tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    done = CliRunner().invoke(app, ["ui", "--runs", str(tmp_path / "nope")])
    assert done.exit_code != 0 and "not a folder" in done.output


def _reports(root: Path) -> None:
    import json

    (root / "pipe").mkdir(parents=True)
    (root / "pipe" / "pipeline_report.json").write_text(json.dumps([
        {"stage": "sft", "kind": "sft", "action": "run", "why": "new", "tuned_score": 0.8, "probe_retention": 0.9},
        {"stage": "gguf", "kind": "export", "action": "skip", "why": "unchanged"}]))
    sweep = root / "compare-sql"
    (sweep / "report-plots").mkdir(parents=True)
    (sweep / "sweep.yaml").write_text("candidates: [zero_shot, lora]\n")
    (sweep / "report-plots" / "learned_vs_forgot.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'></svg>")
    (sweep / "report.json").write_text(json.dumps({"recommendation": {"text": "Fine-tune with lora."}, "candidates": [
        {"display": {"name": "zero_shot", "kind": "baseline", "score": "10 %"}},
        {"display": {"name": "lora", "kind": "method", "score": "80 %"}}]}))


def test_pipeline_and_compare_reports(roots):
    from fastapi.testclient import TestClient

    from tunelab.ui import reports
    from tunelab.ui.app import create_app

    roots, _ = roots
    _reports(roots.paths[0])
    assert [(k, p.name) for k, p in reports.find_reports(roots)] == [("compare", "compare-sql"), ("pipeline", "pipe")]
    client = TestClient(create_app(list(roots.paths)), base_url="http://127.0.0.1")
    assert client.get("/reports").text.count('class="report"') == 2
    pipeline = client.get("/report/0/pipe")
    assert pipeline.status_code == 200 and pipeline.text.count('class="stage"') == 2 and "0.800" in pipeline.text
    sweep = client.get("/report/0/compare-sql")
    assert sweep.text.count('class="candidate"') == 2 and "Fine-tune with lora." in sweep.text
    plot = client.get("/file/0/compare-sql/report-plots/learned_vs_forgot.svg")
    assert plot.status_code == 200 and plot.headers["content-type"].startswith("image/svg+xml")
    assert reports.resolve(roots, "0/../..") is None and reports.resolve(roots, "0/sql-lora") is None
    assert reports.plot_file(roots, "0/compare-sql", "../report.json") is None
    assert client.get("/report/0/nope").status_code == 404
