"""The headline numbers of a run's ``eval.json``, for its manifest (and the run registry that reads it)."""

from __future__ import annotations

from typing import Any


def eval_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Baseline scores, the tuned score, probe retention and the ids of the probe items lost."""
    summary = {f"{k}_score": v["score"] for k, v in report.get("baselines", {}).items()}
    if "tuned" in report:
        summary["tuned_score"] = report["tuned"]["score"]
    if "forgetting" in report:
        summary["probe_retention"] = report["forgetting"]["retention"]
        summary["probe_lost"] = [item["id"] for item in report["forgetting"]["lost"]]
    return summary
