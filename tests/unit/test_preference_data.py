"""Preference pairs: record formats, validation with file:line, loss masks, length policies, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.collate import collate
from tunelab.data.preferences import (
    PreferenceExample,
    collate_pairs,
    load_preferences,
    render_pair,
    tokenize_preferences,
)
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import DataError, TunelabError
from tunelab.models.tiny import build_tiny_tokenizer

PROMPT_RECORD = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think.", "system": "Be brief."}
MESSAGES_RECORD = {
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    "chosen": {"role": "assistant", "content": "Paris."},
    "rejected": {"role": "assistant", "content": "Lyon, I think."},
}
MULTI_TURN = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "chosen": "It equals 4.",
    "rejected": "5",
    "margin": 2,
}


def write_lines(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def trained_text(tok, ids: list[int], labels: list[int]) -> str:
    """The trained tokens decoded, with '|' between non-adjacent runs."""
    pieces, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(label)
        elif run:
            pieces.append(tok.decode(run)), run.clear()
    if run:
        pieces.append(tok.decode(run))
    return "|".join(pieces)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# --- records -------------------------------------------------------------------------------------


def test_both_formats_give_the_same_pair_and_the_same_tokens(tmp_path, tok):
    a_path = write_lines(tmp_path / "a.jsonl", [PROMPT_RECORD])
    b_path = write_lines(tmp_path / "b.jsonl", [MESSAGES_RECORD])
    [a], [b] = load_preferences([a_path]), load_preferences([b_path])
    assert a.context == tuple(MESSAGES_RECORD["messages"])
    assert (a.context, a.chosen, a.rejected, a.margin) == (b.context, b.chosen, b.rejected, b.margin)
    assert (a.source, b.source) == (f"{a_path}:1", f"{b_path}:1")
    (pa, pb), _ = tokenize_preferences([a, b], tok, max_length=512)
    assert pa.chosen.input_ids == pb.chosen.input_ids and pa.chosen.labels == pb.chosen.labels
    assert pa.rejected.input_ids == pb.rejected.input_ids and pa.rejected.labels == pb.rejected.labels


def test_every_bad_record_is_reported_with_its_line_at_once(tmp_path):
    good = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    rows = [
        good,                                                                    # 1
        {"prompt": "Q", "chosen": "A"},                                          # 2 missing side
        {"prompt": "Q", "chosen": "  ", "rejected": "B"},                        # 3 empty side
        {"prompt": "Q", "chosen": "Same", "rejected": "Same "},                  # 4 identical
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "chosen": "A", "rejected": "B"},                                        # 5 context ends with assistant
        {"messages": [{"role": "bot", "content": "Q"}], "chosen": "A", "rejected": "B"},  # 6 unknown role
        {**good, "margin": "high"},                                              # 7 bad margin type
        '{"prompt": "Q", "chosen": ',                                            # 8 bad JSON
        {**good, "rejected": {"role": "user", "content": "B"}},                  # 9 answer not from assistant
        {**good, "margin": True},                                                # 10 a boolean is no margin
        good,                                                                    # 11
    ]
    path = write_lines(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        load_preferences([path])
    problems = excinfo.value.problems
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in range(2, 11)]
    expected = [
        "field 'rejected' is missing",
        "field 'chosen' is empty",
        "'chosen' and 'rejected' are the same answer",
        "ends with a 'assistant' message, not the user's",
        "message 1 has unknown role 'bot'",
        "field 'margin' must be a number, got a string",
        "invalid JSON",
        "field 'rejected' is a message with role 'user'; an answer's role must be 'assistant'",
        "field 'margin' must be a number, got a boolean",
    ]
    for problem, fragment in zip(problems, expected):
        assert fragment in problem
    assert "nothing was trained" in str(excinfo.value)


def test_problems_of_several_files_are_collected_together(tmp_path):
    first = write_lines(tmp_path / "one.jsonl", [{"prompt": "Q", "rejected": "B"}])
    second = write_lines(
        tmp_path / "two.jsonl",
        [{"question": "Q", "chosen": "A", "rejected": "B"}, {**MESSAGES_RECORD, "prompt": "Q"}, {**MESSAGES_RECORD, "system": "S"},
         {"prompt": [{"role": "user", "content": "Q"}], "chosen": "A", "rejected": "B"}],
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as excinfo:
        load_preferences([first, second, str(empty)])
    problems = excinfo.value.problems
    assert problems[0].startswith(f"{first}:1: field 'chosen' is missing")
    assert problems[1].startswith(f"{second}:1: record has no 'prompt' or 'messages'")
    assert problems[2].startswith(f"{second}:2: record has both 'prompt' and 'messages'")
    assert problems[3].startswith(f"{second}:3: field 'system' is for the prompt format")
    assert problems[4] == f"{second}:4: field 'prompt' must be a string, got a list; a conversation goes in 'messages' (ending with the user turn)"
    assert problems[5].startswith(f"{empty}: no records")
    with pytest.raises(DataError, match="no preference data files"):
        load_preferences([])


def test_margin_system_prompt_and_multi_turn_context(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [MULTI_TURN, PROMPT_RECORD])
    multi, with_system = load_preferences([path], system_prompt="Default.")
    assert multi.context[0] == {"role": "system", "content": "Default."}
    assert multi.context[1:] == tuple(MULTI_TURN["messages"]) and multi.margin == 2.0
    assert with_system.context[0] == {"role": "system", "content": "Be brief."}  # its own is kept
    assert with_system.margin is None


def test_csv_cells_hold_messages_as_json_and_margin_as_text(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps(MULTI_TURN["messages"]).replace('"', '""')
    path.write_text(
        "messages,chosen,rejected,margin\n"
        f'"{messages}",It equals 4.,5,1.5\n'
        f'"{messages}",It equals 4.,5,\n'
        f'"{messages}",It equals 4.,5,lots\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as excinfo:
        load_preferences([str(path)])
    assert excinfo.value.problems == [f"{path}:4: field 'margin' must be a number, got the text 'lots'"]
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n", encoding="utf-8")
    first, second = load_preferences([str(path)])
    assert first.context == tuple(MULTI_TURN["messages"]) and first.margin == 1.5 and second.margin is None


# --- tokenization --------------------------------------------------------------------------------


def test_masks_train_exactly_the_answer_and_its_end_token(tmp_path, tok):
    [example] = load_preferences([write_lines(tmp_path / "d.jsonl", [MULTI_TURN])])
    [pair], stats = tokenize_preferences([example], tok, max_length=512)
    assert trained_text(tok, pair.chosen.input_ids, pair.chosen.labels) == "It equals 4.<|im_end|>"
    assert trained_text(tok, pair.rejected.input_ids, pair.rejected.labels) == "5<|im_end|>"
    prompt = tok.apply_chat_template(list(example.context), tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    for side in (pair.chosen, pair.rejected):
        assert side.input_ids[:n_prompt] == pair.chosen.input_ids[:n_prompt]  # same context tokens
        assert side.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the earlier "Hello" turn too
        assert side.labels[n_prompt] != IGNORE_INDEX
    assert pair.margin == 2.0 and pair.source == example.source
    assert stats.pairs == 1 and stats.truncated == 0 and stats.dropped == []
    assert stats.trained_tokens == {"chosen": len(tok("It equals 4.").input_ids) + 1, "rejected": len(tok("5").input_ids) + 1}
    assert stats.tokens == len(pair.chosen.input_ids) + len(pair.rejected.input_ids)
    assert stats.max_len == len(pair.chosen.input_ids) and stats.mean_len == stats.tokens / 2


def pair_of(context_words: int, source: str) -> PreferenceExample:
    context = ({"role": "user", "content": " ".join(["fox"] * context_words)},)
    return PreferenceExample(context, "The quick brown fox jumps over the lazy dog.", "No.", None, source)


def test_truncate_cuts_the_answer_and_keeps_the_context(tok):
    example = pair_of(3, "p.jsonl:1")
    [full], _ = tokenize_preferences([example], tok, max_length=512)
    first_trained = next(i for i, label in enumerate(full.chosen.labels) if label != IGNORE_INDEX)
    limit = len(full.rejected.input_ids)
    assert first_trained < limit < len(full.chosen.input_ids)
    [cut], stats = tokenize_preferences([example], tok, max_length=limit, too_long="truncate")
    assert cut.chosen.input_ids == full.chosen.input_ids[:limit] and cut.chosen.labels == full.chosen.labels[:limit]
    assert cut.rejected.input_ids == full.rejected.input_ids  # the short side is untouched
    assert stats.truncated == 1 and stats.trained_tokens["chosen"] == limit - first_trained and stats.max_len == limit


def test_truncation_leaving_no_answer_token_is_reported_with_the_fix(tok):
    fits, long_a, long_b = pair_of(1, "p.jsonl:1"), pair_of(40, "p.jsonl:2"), pair_of(40, "p.jsonl:5")
    with pytest.raises(DataError) as excinfo:
        tokenize_preferences([fits, long_a, long_b], tok, max_length=60, too_long="truncate")
    problems = excinfo.value.problems
    assert [p.split(": ")[0] for p in problems] == ["p.jsonl:2", "p.jsonl:5"]
    assert "no token of the chosen answer fits in data.max_length=60" in problems[0]
    assert "raise data.max_length, shorten the prompt, or set data.too_long=drop" in problems[0]


def test_drop_and_error_policies(tok):
    fits, long_a, long_b = pair_of(1, "p.jsonl:1"), pair_of(40, "p.jsonl:2"), pair_of(40, "p.jsonl:5")
    kept, stats = tokenize_preferences([fits, long_a, long_b], tok, max_length=60, too_long="drop")
    assert [p.source for p in kept] == ["p.jsonl:1"] and stats.dropped == ["p.jsonl:2", "p.jsonl:5"]
    assert stats.pairs == 1 and stats.max_len <= 60
    with pytest.raises(DataError) as excinfo:
        tokenize_preferences([fits, long_a, long_b], tok, max_length=60, too_long="error")
    problems = excinfo.value.problems
    assert [p.split(": ")[0] for p in problems] == ["p.jsonl:2", "p.jsonl:5"]
    assert "> data.max_length=60; raise data.max_length, or set data.too_long to truncate or drop" in problems[0]


def test_bad_options_are_refused(tok):
    with pytest.raises(TunelabError, match="too_long"):
        tokenize_preferences([pair_of(1, "p:1")], tok, too_long="wrap")
    with pytest.raises(TunelabError, match="max_length"):
        tokenize_preferences([pair_of(1, "p:1")], tok, max_length=0)
    with pytest.raises(TunelabError, match="prepare_tokenizer"):
        tokenize_preferences([pair_of(1, "p:1")], build_tiny_tokenizer(chat_template=None))
    assert tokenize_preferences([], tok)[0] == []


# --- batching and display ------------------------------------------------------------------------


def test_collate_pairs_puts_chosen_rows_first_in_one_padded_batch(tok):
    examples = [pair_of(1, "p:1"), pair_of(6, "p:2"), pair_of(2, "p:3")]
    pairs, _ = tokenize_preferences(examples, tok, max_length=512)
    batch = collate_pairs(pairs, tok.pad_token_id)
    width = max(len(side.input_ids) for p in pairs for side in (p.chosen, p.rejected))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (6, width) for t in batch.values())
    expected = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], tok.pad_token_id)
    assert all(batch[k].equal(expected[k]) for k in batch)
    for row, side in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        n = len(side.input_ids)
        assert batch["input_ids"][row, :n].tolist() == side.input_ids
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError):
        collate_pairs([], tok.pad_token_id)


def test_render_pair_marks_each_sides_trained_tokens(tmp_path, tok):
    [example] = load_preferences([write_lines(tmp_path / "d.jsonl", [MULTI_TURN])])
    rendered = render_pair(example, tok)
    assert set(rendered) == {"chosen", "rejected"}
    for side, answer in (("chosen", "It equals 4."), ("rejected", "5")):
        runs = rendered[side]
        conversation = [*example.context, {"role": "assistant", "content": answer}]
        assert "".join(text for text, _ in runs) == tok.apply_chat_template(conversation, tokenize=False)
        assert [text for text, trained in runs if trained] == [f"{answer}<|im_end|>"]
