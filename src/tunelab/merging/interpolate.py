"""Undo forgetting by interpolation: blends ``base + t * (tuned - base)`` of a run, scored, and the picked one written.

A fine-tune moves the weights along its task vector; stopping part of the way (Wortsman et al. 2022,
WiSE-FT, arXiv:2109.01903) often keeps most of the task score and more of what the base model knew.
Each blend is the ``task_arithmetic`` rule with ``lambda = t`` on the run folded into full weights, and is
scored on the run's eval data with the run's own settings and on its forgetting probe against the base
model's answers (``tunelab.merging.scoring``). The base (t = 0) is always scored as the reference row.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.evaluation.run import LoadedModel
from tunelab.merging.card import blend_card, headline
from tunelab.merging.fold import fold_in_memory
from tunelab.merging.publish import check_out_dir, held_prompts, publish
from tunelab.merging.rules import MergeInput, merge_state_dicts
from tunelab.merging.scoring import Probe, Task, base_probe, eval_settings_of, run_probe, run_task, score
from tunelab.runs import Run

PICKS = ("best-task", "best-retention")


def parse_blends(text: str) -> list[float]:
    """``"0.25,0.5,1"`` -> ``[0.25, 0.5, 1.0]``; each t finite and at least 0 (above 1 extrapolates)."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise TunelabError(f"--interpolate: {part!r} is not a blend weight; give numbers t >= 0 separated by commas, "
                               "e.g. --interpolate 0.25,0.5,0.75,1.0 (0 is the base model, 1 the tuned one)")
        values.append(value)
    return sorted(set(values))


def _base_of(run: Run, tokenizer: Any) -> LoadedModel:
    """The untuned model as the run's evaluation loaded it: its base, resized where the template added tokens."""
    from tunelab.models.load import load_model

    model = load_model(run.base_model)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return LoadedModel(model, tokenizer, "base")


def _row(t: float, loaded: LoadedModel, task: Task | None, probe: Probe | None) -> dict[str, Any]:
    row: dict[str, Any] = {"t": t, "task_score": score(loaded, task, f"t={t:g}")["score"] if task else None}
    measured = probe.measure(loaded) if probe is not None else None
    row.update(probe_right=measured["right"] if measured else None, probe_right_before=measured["right_before"] if measured else None,
               probe_items=measured["items"] if measured else None,
               retention=measured["retention"] if measured else None, lost=measured["lost"] if measured else [])
    return row


def pick_blend(rows: list[dict[str, Any]], ts: list[float], pick: str | None, min_retention: float | None) -> dict[str, Any]:
    """The row to write: by ``pick`` (best-task, best-retention or a t), or the best task score at ``min_retention``.

    Ties go to the other figure, then to the smaller t for the task score (closer to the base) and the larger
    t for retention (more of the task).

    Raises:
        TunelabError: A pick that cannot be made (a t not evaluated, no task or probe to rank by, no blend
            retaining ``min_retention``), naming the figures.
    """
    candidates = [r for r in rows if any(abs(r["t"] - t) < 1e-9 for t in ts)]
    table = "; ".join(f"t={r['t']:g}: task {_fmt(r['task_score'])}, retention {_fmt(r['retention'])}" for r in candidates)
    if min_retention is not None:
        if pick not in (None, "best-task"):
            raise TunelabError("--min-retention picks the best task score among the blends that keep that much; "
                               f"leave out --pick {pick} (or use --pick without --min-retention)")
        if all(r["retention"] is None for r in candidates):
            raise TunelabError("--min-retention: no retention to rank by (the run has no forgetting probe, eval.probe was "
                               "false, or the base answered none of it); use --pick T")
        candidates = [r for r in candidates if r["retention"] is not None and r["retention"] >= min_retention]
        if not candidates:
            raise TunelabError(f"no blend keeps probe retention >= {min_retention:g} ({table}); lower --min-retention or "
                               "add smaller t to --interpolate. Nothing was written")
    if pick in (None, "best-task"):
        if candidates[0]["task_score"] is None:
            raise TunelabError("--pick best-task: the run has no eval data (data.eval) to score blends on; use --pick best-retention or a t")
        return max(candidates, key=lambda r: (r["task_score"], r["retention"] or 0.0, -r["t"]))
    if pick == "best-retention":
        if candidates[0]["retention"] is None:
            raise TunelabError("--pick best-retention: no retention to rank by (the run has no forgetting probe, or the base "
                               "answered none of it); use --pick best-task or a t")
        return max(candidates, key=lambda r: (r["retention"], r["task_score"] or 0.0, r["t"]))
    try:
        wanted = float(pick)
    except ValueError:
        raise TunelabError(f"--pick {pick!r}: give best-task, best-retention or one of the t of --interpolate") from None
    for row in candidates:
        if abs(row["t"] - wanted) < 1e-9:
            return row
    raise TunelabError(f"--pick {pick}: t={wanted:g} is not among the blends evaluated ({', '.join(f'{t:g}' for t in ts)}); "
                       "add it to --interpolate")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def interpolate_run(run_dir: str | Path, ts: list[float], out_dir: str | Path, *, pick: str | None = None,
                    min_retention: float | None = None, force: bool = False, prompts: int = 8, new_tokens: int = 16,
                    limit: int | None = None, say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Score each blend ``base + t * (tuned - base)`` of the run, then write the picked one, verified.

    Args:
        run_dir: A finished run of a mergeable method.
        ts: Blend weights to score (0 = base, 1 = the tuned model); the base is always scored too.
        out_dir: Folder for the picked blend (an HF dir with ``merge_report.json`` holding the whole table).
        pick: ``best-task``, ``best-retention`` or a t of ``ts``; default best-task.
        min_retention: With best-task: only blends whose probe retention is at least this.
        force, prompts, new_tokens: As for ``merge_run``'s verification.
        limit: Score on the first N eval examples and N probe items only (quicker, rougher).
        say: Progress messages.

    Raises:
        TunelabError: A run that cannot be folded, with neither eval data nor a probe, an impossible pick,
            an unsafe output folder, or a failed verification without ``force``.
    """
    started = time.time()
    out = Path(out_dir)
    if not ts:
        raise TunelabError("--interpolate: give at least one t, e.g. 0.25,0.5,0.75,1.0")
    run, tuned = fold_in_memory(run_dir)
    check_out_dir(out, [run.path])
    task, items = run_task(run, run.path.name, limit), run_probe(run, limit)
    if task is None and not items:
        raise TunelabError(f"{run.path}: the run has neither eval data (data.eval) nor a forgetting probe, so there is "
                           "nothing to score the blends on; merge it with `tunelab merge RUN --out DIR` instead")
    # A pick that cannot be made (no probe to rank by, a t not in the list) fails now, before minutes of scoring.
    dry = [{"t": t, "task_score": 0.0 if task else None, "retention": 1.0 if items else None} for t in ts]
    pick_blend(dry, ts, pick, None if min_retention is None else 0.0)
    say(f"loading the base {run.base_model} ...")
    base = _base_of(run, tuned.tokenizer)
    base_state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}  # base.model becomes each blend
    tuned_state = tuned.model.state_dict()
    rows = _score_blends(base, base_state, tuned_state, ts, task, base_probe(base, items, eval_settings_of(run).batch_size), say)
    chosen = pick_blend(rows, ts, pick, min_retention)
    base.model.load_state_dict(_blend(base_state, tuned_state, chosen["t"]))
    del tuned, tuned_state, base_state
    blend = LoadedModel(base.model, base.tokenizer, f"blend t={chosen['t']:g}")

    def report_of(check: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "interpolation", "run": str(run.path), "base_model": run.base_model, "method": run.method_name,
                "output": str(out), "dtype": str(next(blend.model.parameters()).dtype).removeprefix("torch."),
                "metric": task.metric if task else None, "examples": len(task.examples) if task else 0,
                "probe_items": len(items or []), "limit": limit, "blends": ts, "table": rows,
                "pick": pick or "best-task", "min_retention": min_retention, "picked_t": chosen["t"],
                "run_eval": headline(run), "seconds": round(time.time() - started, 2)}

    return publish(out, blend, held_prompts([run], prompts), report_of, blend_card, force=force, new_tokens=new_tokens)


def _score_blends(holder: LoadedModel, base_state: dict, tuned_state: dict, ts: list[float], task: Task | None,
                  probe: Probe | None, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per t (the base, t = 0, first and marked as the reference unless asked for); ``holder`` ends as the last blend."""
    rows = [dict(_row(0.0, holder, task, probe), reference=0.0 not in ts)]
    say(f"t=0 (base): task {_fmt(rows[0]['task_score'])}")
    for t in (t for t in ts if t != 0.0):
        say(f"scoring the blend t={t:g} ...")
        holder.model.load_state_dict(_blend(base_state, tuned_state, t))
        rows.append(_row(t, holder, task, probe))
        say(f"t={t:g}: task {_fmt(rows[-1]['task_score'])}, probe retention {_fmt(rows[-1]['retention'])}")
    return rows


def _blend(base_state: dict, tuned_state: dict, t: float) -> dict:
    if t == 0.0:
        return base_state
    return merge_state_dicts("task_arithmetic", base_state, [MergeInput(tuned_state, name="tuned")], lambda_=t)
