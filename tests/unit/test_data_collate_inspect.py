"""Batch padding and the data inspection report."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from tunelab.data import TokenizedExample, TokenizeStats, collate, inspect_report
from tunelab.data.tokenize import IGNORE_INDEX


def test_collate_right_pads_and_masks_padding():
    batch = [
        TokenizedExample([5, 6, 7], [-100, 6, 7], "a:1"),
        TokenizedExample([8], [8], "a:2"),
    ]
    out = collate(batch, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (2, 3) and t.dtype == torch.long for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_collate_keeps_trained_tokens_equal_to_pad_id():
    # eos is often the pad id; a real trained eos must not be masked as padding.
    out = collate([TokenizedExample([4, 2], [4, 2], "a:1"), TokenizedExample([4], [4], "a:2")], pad_id=2)
    assert out["labels"].tolist() == [[4, 2], [4, IGNORE_INDEX]]


def test_collate_empty_batch_is_a_bug():
    with pytest.raises(ValueError):
        collate([], pad_id=0)


STATS = TokenizeStats(
    examples=2,
    tokens=30,
    trained_tokens=9,
    truncated=1,
    dropped=["d.jsonl:4"],
    tokens_by_role={"template": 4, "user": 12, "assistant": 14},
    trained_by_role={"assistant": 9},
    max_len=18,
    mean_len=15.0,
)
RENDERED = [
    ("<|im_start|>user\nHi [b]x[/b]<|im_end|>\n<|im_start|>assistant\n", False),
    ("Hello<|im_end|>", True),
    ("\n", False),
]


def report(**console_options) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, **console_options)
    inspect_report(STATS, RENDERED, console, "train: d.jsonl")
    return buffer.getvalue()


def test_report_plain_console_marks_trained_text():
    text = report()  # a StringIO is not a terminal: no colour
    assert "train: d.jsonl" in text
    for expected in ("records", "tokens total", "30", "15.0 / 18", "9 (30.0%)", "truncated", "d.jsonl:4"):
        assert expected in text
    assert "assistant" in text and "64.3%" in text  # 9 of 14 assistant tokens trained
    assert "[[Hello<|im_end|>]]" in text
    assert "[b]x[/b]" in text  # data is not interpreted as rich markup
    assert "[[trained]]" in text


def test_report_colour_console_uses_styles_not_brackets():
    text = report(force_terminal=True, color_system="truecolor")
    assert "\x1b[" in text and "[[Hello" not in text and "Hello<|im_end|>" in text


def test_report_no_color_flag_uses_brackets():
    assert "[[Hello<|im_end|>]]" in report(force_terminal=True, no_color=True)
