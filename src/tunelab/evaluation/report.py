"""What a fine-tune learned and what it forgot: before/after task scores, in-context baselines, probe.

A *probe* is a JSONL file of short general-skills questions with accepted answers
(``{"id", "skill", "question", "answers"}``); an item counts as right when any accepted answer appears
as a whole word in the reply. Retention is the share of items the untuned model got right that the
tuned model still gets right; the items it lost are listed by id. No library measures forgetting, hence
this module.
"""

from __future__ import annotations

import json
import random
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

from tunelab.data import Example
from tunelab.errors import TunelabError
from tunelab.evaluation.run import LoadedModel, evaluate

BUILTIN_PROBE = "general"


def load_probe(spec: bool | str) -> list[dict] | None:
    """The probe items: ``True`` = the built-in general probe, a path = a user probe, ``False`` = none."""
    if spec is False:
        return None
    path = files("tunelab.evaluation.probes") / "general.jsonl" if spec is True else Path(str(spec))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TunelabError(f"eval.probe: cannot read {spec}: {exc}") from None
    items, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            assert isinstance(item.get("question"), str) and item["answers"] and all(isinstance(a, str) for a in item["answers"])
            items.append({"id": str(item.get("id", number)), **item})
        except (json.JSONDecodeError, AssertionError, AttributeError, KeyError, TypeError):
            problems.append(f"{path}:{number}: expected {{\"id\", \"question\": str, \"answers\": [str, ...]}}")
    if problems:
        raise TunelabError("eval.probe: bad items:\n  " + "\n  ".join(problems))
    return items


def probe_answers(loaded: LoadedModel, items: list[dict], batch_size: int = 16) -> list[dict]:
    """Ask every probe question; returns per item ``{"id", "answer", "right"}``."""
    from tunelab.evaluation.generate import generate_answers

    conversations = [[{"role": "user", "content": item["question"]}] for item in items]
    answers = generate_answers(loaded.model, loaded.tokenizer, conversations, max_new_tokens=16, batch_size=batch_size)
    return [{"id": item["id"], "answer": answer, "right": _accepted(answer, item["answers"])} for item, answer in zip(items, answers)]


def _accepted(answer: str, accepted: list[str]) -> bool:
    text = answer.casefold()
    return any(re.search(rf"(?<!\w){re.escape(a.casefold())}(?!\w)", text) for a in accepted)


def retention(items: list[dict], before: list[dict], after: list[dict]) -> dict[str, Any]:
    """Compare probe results: right before/after, retention, and the items lost and gained."""
    lost = [i for i, b, a in zip(items, before, after) if b["right"] and not a["right"]]
    gained = [i for i, b, a in zip(items, before, after) if a["right"] and not b["right"]]
    right_before = sum(r["right"] for r in before)
    kept = sum(b["right"] and a["right"] for b, a in zip(before, after))
    return {
        "items": len(items), "right_before": right_before, "right_after": sum(r["right"] for r in after),
        "retention": kept / right_before if right_before else 1.0,
        "lost": [{"id": i["id"], "question": i["question"], "after": a["answer"]} for i, a in zip(items, after) if i in lost],
        "gained": [i["id"] for i in gained],
    }


def few_shot_examples(examples: list[Example], train: list[Example], k: int, seed: int = 0) -> list[Example]:
    """Each eval example with ``k`` train examples (fixed random draw) as earlier turns of the conversation."""
    shots = random.Random(seed).sample(train, min(k, len(train)))
    turns = [m for shot in shots for m in shot.messages if m["role"] != "system"]
    out = []
    for example in examples:
        messages = list(example.messages)
        system = [messages[0]] if messages[0]["role"] == "system" else []
        out.append(Example(tuple(system + turns + messages[len(system):]), example.source))
    return out


def evaluate_task(loaded: LoadedModel, examples: list[Example], eval_cfg, label: str) -> dict[str, Any]:
    """Generation metric of ``eval_cfg`` on ``examples``, labelled for the report."""
    report = evaluate(loaded, examples, eval_cfg.metric, max_new_tokens=eval_cfg.max_new_tokens,
                      batch_size=eval_cfg.batch_size, options=eval_cfg.metric_options())
    report["label"] = label
    return report
