"""What a fine-tune learned and what it forgot: before/after task scores, in-context baselines, probe.

A *probe* is a JSONL file of short general-skills questions with accepted answers
(``{"id", "skill", "question", "answers"}``, asked as a chat turn), or of text to continue
(``{"id", "skill", "prompt", "answers"}``, for a base model that was never taught to chat: the built-in
``completion`` probe, chosen for a model without a chat template of its own); an item counts as right when any
accepted answer appears as a whole word in the reply (a continuation: its first line). Retention is the share of items the untuned model got right that the
tuned model still gets right; the items it lost are listed by id. Before and after are paired by item id
(and question), never by position, so a probe file edited in between cannot pair different questions.
No library measures forgetting, hence this module.
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
PROBE_MAX_NEW_TOKENS = 16  # probe answers are a word or a number


BUILTIN_PROBES = {"general": "general.jsonl", "completion": "completion.jsonl"}


def load_probe(spec: bool | str) -> list[dict] | None:
    """The probe items: ``True`` or ``"general"`` = the built-in chat probe, ``"completion"`` = the built-in
    continuation probe, a path = a user probe, ``False`` = none."""
    if spec is False:
        return None
    builtin = BUILTIN_PROBES.get(BUILTIN_PROBE if spec is True else str(spec))
    path = files("tunelab.evaluation.probes") / builtin if builtin else Path(str(spec))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TunelabError(f"eval.probe: cannot read {spec}: {exc}") from None
    items, problems, seen = [], [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            assert (isinstance(item.get("question"), str)) != (isinstance(item.get("prompt"), str))
            assert item["answers"] and all(isinstance(a, str) for a in item["answers"])
        except (json.JSONDecodeError, AssertionError, AttributeError, KeyError, TypeError):
            problems.append(f"{path}:{number}: expected {{\"id\", \"question\" (a chat turn) or \"prompt\" (text to "
                            "continue): str, \"answers\": [str, ...]}")
            continue
        item = {**item, "id": str(item.get("id", number))}
        if item["id"] in seen:  # before and after are paired by id
            problems.append(f"{path}:{number}: id {item['id']!r} is already used on line {seen[item['id']]}; give every item its own id")
        seen.setdefault(item["id"], number)
        items.append(item)
    if problems:
        raise TunelabError("eval.probe: bad items:\n  " + "\n  ".join(problems))
    return items


def probe_answers(loaded: LoadedModel, items: list[dict], batch_size: int = 16) -> list[dict]:
    """Ask every probe question (a continuation item: continue its text, first line only); returns per item
    ``{"id", "question", "answer", "right"}``."""
    from tunelab.evaluation.generate import generate_answers

    texts = [item.get("prompt") for item in items]  # continuation items, None for chat questions
    prompts = [text if text is not None else [{"role": "user", "content": item["question"]}] for item, text in zip(items, texts)]
    answers = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=PROBE_MAX_NEW_TOKENS,
                               batch_size=batch_size)
    answers = [answer if text is None else answer.split("\n")[0] for text, answer in zip(texts, answers)]
    return [{"id": item["id"], "question": item.get("question", item.get("prompt")), "answer": answer,
             "right": _accepted(answer, item["answers"])} for item, answer in zip(items, answers)]


def _accepted(answer: str, accepted: list[str]) -> bool:
    text = answer.casefold()
    return any(re.search(rf"(?<!\w){re.escape(a.casefold())}(?!\w)", text) for a in accepted)


def retention(items: list[dict], before: list[dict], after: list[dict]) -> dict[str, Any]:
    """Compare probe results: right before/after, retention, and the items lost and gained.

    Retention is the share of the items the untuned model answered that the tuned one still answers; it is None
    (undefined, not 100 %) when the untuned model answered none: a probe the base fails measures no forgetting.

    Results are paired by item id; an id answered on one side only, or asked as a different question
    on the two sides (results that record their question), is not counted and is listed in ``unpaired``.
    """
    questions = {item["id"]: item.get("question", item.get("prompt")) for item in items}
    after_by_id = {record["id"]: record for record in after}
    pairs = [(b, after_by_id[b["id"]]) for b in before if b["id"] in after_by_id and _same_question(b, after_by_id[b["id"]])]
    paired = {b["id"] for b, _ in pairs}
    unpaired = list(dict.fromkeys(r["id"] for r in before + after if r["id"] not in paired))
    right_before = sum(b["right"] for b, _ in pairs)
    kept = sum(b["right"] and a["right"] for b, a in pairs)
    return {
        "items": len(pairs), "right_before": right_before, "right_after": sum(a["right"] for _, a in pairs),
        "retention": kept / right_before if right_before else None,
        "lost": [{"id": a["id"], "question": a.get("question", questions.get(a["id"], "")), "after": a["answer"]}
                 for b, a in pairs if b["right"] and not a["right"]],
        "gained": [a["id"] for b, a in pairs if a["right"] and not b["right"]],
        "unpaired": unpaired,
    }


def describe_retention(forgetting: dict[str, Any]) -> str:
    """``"83% (5 of the 6 probe items the untuned model answered)"``, or why there is no retention."""
    if forgetting.get("retention") is None:
        return f"n/a (the untuned model answered none of the {forgetting.get('items', 0)} probe items)"
    return (f"{forgetting['retention']:.0%} ({forgetting['right_before'] - len(forgetting.get('lost') or [])} of the "
            f"{forgetting['right_before']} probe items the untuned model answered)")


def _same_question(before: dict, after: dict) -> bool:
    """Results from older versions do not record their question: the id alone pairs them."""
    return "question" not in before or "question" not in after or before["question"] == after["question"]


def draw_shots(train: list[Example], k: int, seed: int = 0) -> list[Example]:
    """The ``k`` train examples (fixed random draw) every k-shot prompt shows."""
    return random.Random(seed).sample(train, min(k, len(train)))


def few_shot_examples(examples: list[Example], train: list[Example], k: int, seed: int = 0) -> list[Example]:
    """Each eval example with ``k`` train examples (fixed random draw) as earlier turns of the conversation."""
    shots = draw_shots(train, k, seed)
    turns = [m for shot in shots for m in shot.messages if m["role"] != "system"]
    out = []
    for example in examples:
        messages = list(example.messages)
        system = [messages[0]] if messages[0]["role"] == "system" else []
        out.append(Example(tuple(system + turns + messages[len(system):]), example.source, example.tools))
    return out


def evaluate_task(loaded: LoadedModel, examples: list[Example], eval_cfg, label: str) -> dict[str, Any]:
    """Generation metric of ``eval_cfg`` on ``examples``, labelled for the report."""
    report = evaluate(loaded, examples, eval_cfg.metric, max_new_tokens=eval_cfg.max_new_tokens,
                      batch_size=eval_cfg.batch_size, options=eval_cfg.metric_options())
    report["label"] = label
    return report
