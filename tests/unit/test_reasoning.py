"""Thinking traces: kept from the records, rendered by the model's own template (Qwen3's, from llama.cpp's source) or
the inline fallback, trained or not by data.train_on_reasoning, multi-turn conversations the template rewrites
trained on their final answer, and evaluation scoring the answer after the reasoning."""

from __future__ import annotations

import json
import tarfile

import pytest

from tunelab.data import load_examples
from tunelab.data.reasoning import renders_reasoning, split_reasoning
from tunelab.data.records import Example
from tunelab.data.tokenize import render_example, tokenize_examples
from tunelab.errors import DataError
from tunelab.evaluation.run import split_example
from tunelab.models.tiny import build_tiny_tokenizer

QWEN3 = "vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja"


@pytest.fixture(scope="module")
def qwen3():
    """A ChatML tokenizer with Qwen3's own chat template, read from llama.cpp's source (the export extra's sdist)."""
    from tunelab.export.converter import _sdist, llama_cpp_python_version

    version = llama_cpp_python_version()
    with tarfile.open(_sdist(version)) as sdist:
        template = sdist.extractfile(f"llama_cpp_python-{version}/{QWEN3}").read().decode()
    return build_tiny_tokenizer(chat_template=template)


@pytest.fixture(scope="module")
def chatml():
    return build_tiny_tokenizer()  # its template knows no reasoning_content: the fallback


def _example(*turns) -> Example:
    messages = []
    for user, reasoning, answer in turns:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning else {})}]
    return Example(messages=messages, source="t.jsonl:1")


def _trained(example, tokenizer, **options) -> str:
    return "".join(text for text, on in render_example(example, tokenizer, **options) if on)


def test_qwen3_renders_the_reasoning_and_trains_it(qwen3):
    assert renders_reasoning(qwen3)
    example = _example(("What is 2+3?", "2 plus 3 is 5.", "5."))
    assert _trained(example, qwen3) == "<think>\n2 plus 3 is 5.\n</think>\n\n5.<|im_end|>"
    assert _trained(example, qwen3, reasoning=False) == "5.<|im_end|>"


def test_qwen3_multi_turn_trains_the_final_answer_as_the_template_shows_it(qwen3):
    example = _example(("2+3?", "add them", "5."), ("times 4?", "5 times 4", "20."))
    runs = render_example(example, qwen3)
    text = "".join(t for t, _ in runs)
    assert "add them" not in text  # Qwen3 strips earlier turns' reasoning; the template decides
    assert "".join(t for t, on in runs if on) == "<think>\n5 times 4\n</think>\n\n20.<|im_end|>"
    tokenized, stats = tokenize_examples([example], qwen3)
    assert stats.trained_tokens == sum(label != -100 for label in tokenized[0].labels) > 0


def test_a_template_without_reasoning_gets_it_inline(chatml):
    assert not renders_reasoning(chatml)
    example = _example(("2+3?", "add them", "5."), ("times 4?", "5 times 4", "20."))
    trained = _trained(example, chatml)
    assert trained == "<think>\nadd them\n</think>\n\n5.<|im_end|><think>\n5 times 4\n</think>\n\n20.<|im_end|>"
    assert _trained(example, chatml, reasoning=False) == "5.<|im_end|>20.<|im_end|>"


def test_records_keep_reasoning_and_refuse_it_off_the_assistant(tmp_path):
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]}
    path.write_text(json.dumps(good) + "\n")
    assert load_examples([str(path)])[0].messages[-1]["reasoning_content"] == "r"
    bad = {"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2.*reasoning_content"):
        load_examples([str(path)])


@pytest.mark.parametrize("output, expected", [
    ("<think>\nadd\n</think>\n\n5.", ("add", "5.")),
    ("add them\n</think>\n\n5.", ("add them", "5.")),  # the template's generation prompt opened the block
    ("5.", (None, "5.")),
])
def test_split_reasoning(output, expected):
    assert split_reasoning(output) == expected


def test_evaluation_scores_the_answer_after_the_reasoning():
    example = Example(messages=[{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "<think>\nr\n</think>\n\n5."}], source="t:1")
    assert split_example(example)[1] == "5."


def test_the_served_prompt_is_the_trained_prompt(qwen3):
    """Train/serve token parity: the tokens before a trained answer are what `tunelab serve` and evaluation render."""
    from tunelab.generation.generate import render_prompt

    example = _example(("2+3?", "add them", "5."), ("times 4?", "5 times 4", "20."))
    (tokenized,), _ = tokenize_examples([example], qwen3)
    first = next(i for i, label in enumerate(tokenized.labels) if label != -100)
    assert tokenized.input_ids[:first] == render_prompt(qwen3, example.messages[:-1])
