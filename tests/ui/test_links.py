"""Symbolic links inside the dashboard's folders (issue 37): a file linked to something outside the folders is not
read, a linked folder is never walked, and the walk over the folders is bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunelab.ui import runs as R

from .fake_runs import make_runs

SECRET = "secret-outside-the-folders"


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "runs"
    made = make_runs(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{SECRET}: 1\n")
    return root, made, outside


def client(root: Path):
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    return TestClient(create_app([root], workdir=root), base_url="http://127.0.0.1")


@pytest.fixture
def listed(monkeypatch):
    """Every folder listed through os.scandir or os.listdir (what pathlib, os.walk and the walk use) while active."""
    seen: list[str] = []
    scandir, listdir = os.scandir, os.listdir

    def spy_scandir(path="."):
        seen.append(os.fspath(path))
        return scandir(path)

    def spy_listdir(path="."):
        seen.append(os.fspath(path))
        return listdir(path)

    monkeypatch.setattr(os, "scandir", spy_scandir)
    monkeypatch.setattr(os, "listdir", spy_listdir)
    return seen


def test_a_config_linked_outside_the_folders_is_not_shown(site):
    root, made, outside = site
    config = made["finished"] / "config.yaml"
    config.unlink()
    config.symlink_to(outside / "secret.txt")
    page = client(root).get("/run/0/sql-lora")
    assert page.status_code == 200 and SECRET not in page.text
    if Path("/etc/hostname").is_file() and Path("/etc/hostname").read_text().strip():
        config.unlink()
        config.symlink_to("/etc/hostname")
        hostname = Path("/etc/hostname").read_text().strip()
        assert f"<pre>{hostname}" not in client(root).get("/run/0/sql-lora").text
    inside = made["running"] / "config.yaml"  # a link that stays inside the folders is followed
    config.unlink()
    config.symlink_to(inside)
    assert "dpo" in client(root).get("/run/0/sql-lora").text.split("<h2>Config</h2>")[1]


def test_run_files_linked_outside_are_not_read(site):
    root, made, outside = site
    (outside / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 123.0, "note": SECRET}) + "\n")
    metrics = made["running"] / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(outside / "metrics.jsonl")
    site_client = client(root)
    assert site_client.get("/api/metrics/0/pipeline/dpo/run").json()["records"] == []
    (outside / "eval.json").write_text(json.dumps({"tuned": {"examples": [{"prompt": SECRET, "prediction": "x"}]}}))
    evaluation = made["failed"] / "eval.json"
    evaluation.symlink_to(outside / "eval.json")
    assert SECRET not in site_client.get("/run/0/diverged").text
    (outside / "run").mkdir()
    (outside / "run" / "manifest.json").write_text(json.dumps({"status": "finished", "recipe": SECRET}))
    (root / "linked-manifest").mkdir()
    (root / "linked-manifest" / "manifest.json").symlink_to(outside / "run" / "manifest.json")
    assert SECRET not in json.dumps(site_client.get("/api/runs").json())
    assert site_client.get("/run/0/linked-manifest").status_code == 404


def test_a_linked_folder_in_a_run_is_not_walked(site, listed):
    root, made, outside = site
    (made["finished"] / "system").symlink_to("/usr")
    (made["finished"] / "elsewhere").symlink_to(outside)
    page = client(root).get("/run/0/sql-lora")
    assert page.status_code == 200 and "system" in page.text  # listed as an entry, its size not summed
    walked = [p for p in listed if p.startswith(("/usr", str(outside))) or "/system" in p or "/elsewhere" in p]
    assert walked == [] and len(listed) < 50


def test_linked_folders_are_never_entered_when_finding_runs(site, listed):
    root, made, outside = site
    (root / "usr").symlink_to("/usr")
    (root / "pipeline" / "usr").symlink_to("/usr")
    found = R.find_runs(R.Roots.of([root]))
    assert sorted(found) == sorted(made.values())
    assert not [p for p in listed if p.startswith("/usr") or p.endswith("/usr")]


def test_the_walk_is_bounded(site, monkeypatch):
    root, made, _ = site
    for n in range(30):
        (root / "many" / f"d{n:02}").mkdir(parents=True)
    monkeypatch.setattr(R, "MAX_ENTRIES", 20)
    assert len(R.folders(R.Roots.of([root]))) <= 21  # stops once 20 entries were looked at, whatever is left


def test_a_plot_folder_linked_outside_is_not_served(site):
    root, _, outside = site
    sweep = root / "compare-x"
    sweep.mkdir()
    (sweep / "sweep.yaml").write_text("candidates: [lora]\n")
    (sweep / "report.json").write_text(json.dumps({"candidates": []}))
    (outside / "leak.svg").write_text(f"<svg>{SECRET}</svg>")
    (sweep / "report-plots").symlink_to(outside)
    site_client = client(root)
    assert "leak" not in site_client.get("/report/0/compare-x").text
    assert site_client.get("/file/0/compare-x/report-plots/leak.svg").status_code == 404
