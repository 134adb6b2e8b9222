"""One candidate's results in a comparison (:class:`CandidateResult`) and the one place its numbers become text.

Every number a report shows is formatted from the record by one function per unit (:func:`display`), used by the
markdown, the HTML and the JSON alike, so they agree to the character. Scores and retention are percentages with
one decimal (``format_score``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from tunelab.errors import TunelabError

KINDS = ("baseline", "trained")
STATUSES = ("finished", "failed", "skipped")
UNTOUCHED = "— (untouched)"
NONE = "—"


@dataclass
class CandidateResult:
    """What one candidate of a sweep scored, forgot and cost. See the sweep for how each field is measured.

    Attributes:
        name: ``zero_shot``, ``few_shot``, ``rag``, ``prompt``, ``prefix``, ``lora``, ``full``, ...
        kind: ``baseline`` (the untouched model, prompted) or ``trained``.
        status: ``finished``, ``failed`` or ``skipped``; ``error`` says why for the last two.
        score: The task metric (0..1) on the eval set.
        retention: Share of the probe items the untuned model got right that this one still gets right;
            None for baselines (they do not change the model) or when no probe ran.
        probe_lost: Ids of the probe items lost.
        peak_memory_kind: ``cuda_max_allocated`` or ``cpu_peak_rss``.
        loss_curve: ``(step, train loss)`` pairs.
        extra: Any further fields of the record, kept so a record survives a round trip unchanged.
    """

    name: str
    kind: Literal["baseline", "trained"]
    status: Literal["finished", "failed", "skipped"]
    error: str | None = None
    run_dir: str | None = None
    metric: str = ""
    score: float | None = None
    retention: float | None = None
    probe_right_before: int | None = None
    probe_right_after: int | None = None
    probe_items: int | None = None
    probe_lost: list[str] = field(default_factory=list)
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    artifact_mb: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> CandidateResult:
        """Build from a record (e.g. read from ``report.json`` or written by the sweep).

        ``probe_lost`` may hold ids or eval.json's ``{"id", ...}`` dicts; ``loss_curve`` pairs may be
        lists. Unknown keys go to ``extra``.

        Raises:
            TunelabError: On a missing name or an unknown kind or status.
        """
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise TunelabError(f"candidate record needs a 'name' string, got {record!r:.200}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in record.items() if k in known}
        extra = {**record.get("extra", {}), **{k: v for k, v in record.items() if k not in known and k != "extra"}}
        name = values["name"]
        if values.get("kind") not in KINDS:
            raise TunelabError(f"candidate {name!r}: kind must be one of {', '.join(KINDS)}, got {values.get('kind')!r}")
        if values.get("status") not in STATUSES:
            raise TunelabError(f"candidate {name!r}: status must be one of {', '.join(STATUSES)}, got {values.get('status')!r}")
        values["probe_lost"] = [str(x["id"]) if isinstance(x, dict) else str(x) for x in values.get("probe_lost") or []]
        values["loss_curve"] = [(int(step), float(loss)) for step, loss in values.get("loss_curve") or []]
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record; ``from_dict(to_dict())`` gives the same candidate back."""
        record = asdict(self)
        record["loss_curve"] = [[step, loss] for step, loss in self.loss_curve]
        extra = record.pop("extra")
        return {**record, **extra}

    @property
    def usable(self) -> bool:
        """Finished with a score: takes part in the plots and the recommendation."""
        return self.status == "finished" and self.score is not None


# ---------------------------------------------------------------------------------------------------
# Formatting: the only place numbers become text.


def format_score(value: float | None) -> str:
    """A 0..1 score or retention as a percentage with one decimal (``0.7812`` -> ``"78.1%"``)."""
    return NONE if value is None else f"{100 * value:.1f}%"


def format_count(n: int | None) -> str:
    """A parameter count in K/M/B (``134515008`` -> ``"134.5M"``)."""
    if n is None:
        return NONE
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_param_share(trainable: int | None, total: int | None) -> str:
    """Trainable share of all parameters, three significant digits (``"0.449%"``, ``"100%"``)."""
    if trainable is None or not total:
        return NONE
    return f"{100 * trainable / total:.3g}%"


def format_mb(value: float | None) -> str:
    if value is None:
        return NONE
    if value >= 1024:
        return f"{value / 1024:.2f} GB"
    return f"{value:.1f} MB" if value >= 1 else f"{value * 1024:.1f} KB"


def format_seconds(value: float | None) -> str:
    if value is None:
        return NONE
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60):02d} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


def format_memory(value: float | None, kind: str | None) -> str:
    if value is None:
        return NONE
    where = {"cuda_max_allocated": "GPU", "cpu_peak_rss": "CPU RSS"}.get(kind or "", kind)
    return f"{format_mb(value)} ({where})" if where else format_mb(value)


def _probe_text(c: CandidateResult) -> str:
    if c.probe_right_before is None or c.probe_right_after is None:
        return NONE
    of = f" of {c.probe_items}" if c.probe_items is not None else ""
    return f"{c.probe_right_before} → {c.probe_right_after}{of}"


def _loss_text(curve: list[tuple[int, float]]) -> str:
    if not curve:
        return NONE
    (first_step, first), (last_step, last) = curve[0], curve[-1]
    return f"{first:.3f} → {last:.3f} (steps {first_step}–{last_step})"


COLUMNS = (
    ("name", "candidate"), ("kind", "kind"), ("status", "status"), ("score", "score"), ("retention", "probe retention"),
    ("probe", "probe right before → after"), ("probe_lost", "probe items lost"), ("trainable", "trainable params"),
    ("total_parameters", "total params"), ("artifact_mb", "artifact"), ("peak_memory", "peak memory"),
    ("train_seconds", "train time"), ("tokens_per_s", "train throughput"), ("loss", "train loss first → last"),
    ("eval_seconds", "eval time"), ("run_dir", "run dir"), ("error", "error"),
)


def display(c: CandidateResult) -> dict[str, str]:
    """The text shown for each column of the table (keys of ``COLUMNS``)."""
    baseline = c.kind == "baseline"
    if baseline and c.retention is None:
        retention = UNTOUCHED
    else:
        retention = format_score(c.retention)
    trainable = NONE
    if c.trainable_parameters is not None:
        share = format_param_share(c.trainable_parameters, c.total_parameters)
        trainable = format_count(c.trainable_parameters) + (f" ({share})" if share != NONE else "")
    return {
        "name": c.name, "kind": c.kind, "status": c.status,
        "score": format_score(c.score) + (f" {c.metric}" if c.metric and c.score is not None else ""),
        "retention": retention,
        "probe": _probe_text(c),
        "probe_lost": (", ".join(c.probe_lost) if c.probe_lost else ("none" if c.retention is not None else NONE)),
        "trainable": trainable,
        "total_parameters": format_count(c.total_parameters),
        "artifact_mb": format_mb(c.artifact_mb),
        "peak_memory": format_memory(c.peak_memory_mb, c.peak_memory_kind),
        "train_seconds": format_seconds(c.train_seconds),
        "tokens_per_s": NONE if c.tokens_per_s is None else f"{c.tokens_per_s:,.0f} tok/s",
        "loss": _loss_text(c.loss_curve),
        "eval_seconds": format_seconds(c.eval_seconds),
        "run_dir": c.run_dir or NONE,
        "error": c.error or NONE,
    }
