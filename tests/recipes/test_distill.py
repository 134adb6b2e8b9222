"""``recipe: distill`` on tiny models: the student moves toward a fine-tuned teacher, the report puts the teacher's
score next to the student's, and a missing or unknown teacher is refused before anything is written."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.recipes import distill, sft

QUICK = ("eval.before=false", "eval.max_new_tokens=4")


def test_student_learns_from_a_fine_tuned_teacher(make_config):
    teacher = sft.main(make_config(*QUICK, "train.max_steps=12", "train.lr=5e-2", output="teacher", method="full")).run_dir
    result = distill.main(make_config(*QUICK, "recipe.name=distill", f"recipe.teacher={teacher}", "recipe.loss=jsd",
                                      "recipe.temperature=2", "train.max_steps=8", output="student"))
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 8 and losses[-1] < losses[0]
    report = json.loads((result.run_dir / "eval.json").read_text())
    assert report["teacher"]["label"].startswith("teacher") and "score" in report["tuned"]
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["recipe"] == "distill" and "teacher_score" in manifest["eval_summary"]


def test_teacher_is_required_and_checked(make_config, tmp_path):
    with pytest.raises(TunelabError, match="recipe.teacher is not set"):
        distill.main(make_config(*QUICK, "recipe.name=distill", output="s1"))
    with pytest.raises(TunelabError):
        distill.main(make_config(*QUICK, "recipe.name=distill", f"recipe.teacher={tmp_path / 'nothing'}", output="s2"))
    assert not (tmp_path / "s1").exists()
