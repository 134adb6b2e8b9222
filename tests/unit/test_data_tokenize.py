"""Loss masks, length policies and statistics of tokenized chat examples."""

from __future__ import annotations

import pytest

from tunelab.data import Example, TokenizedExample, render_example, tokenize_examples
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import DataError, TunelabError
from tunelab.models.tiny import build_tiny_tokenizer

SMOL_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
# Imitates SmolLM2's template: a default system prompt is injected when the conversation has none.
SMOL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '" + SMOL_DEFAULT_SYSTEM.replace("\n", "\\n") + "' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A plain-text template whose turns do not end with a special token.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

CONV = Example(
    (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "It equals 4."},
    ),
    "conv.jsonl:1",
)
SHORT = Example(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}), "short.jsonl:3")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    return build_tiny_tokenizer(chat_template=SMOL_TEMPLATE)


def trained_text(tok, ex: TokenizedExample) -> str:
    """Decode the trained tokens, with '|' between non-adjacent runs."""
    pieces, run = [], []
    for i, label in enumerate(ex.labels):
        if label != IGNORE_INDEX:
            assert label == ex.input_ids[i]
            run.append(label)
        elif run:
            pieces.append(tok.decode(run)), run.clear()
    if run:
        pieces.append(tok.decode(run))
    return "|".join(pieces)


def test_assistant_mask_trains_each_answer_and_its_end_token(tok):
    [ex], stats = tokenize_examples([CONV], tok, loss_on="assistant")
    assert trained_text(tok, ex) == "Paris.<|im_end|>|It equals 4.<|im_end|>"
    full = tok.apply_chat_template(list(CONV.messages), tokenize=False)
    assert ex.input_ids == tok(full, add_special_tokens=False).input_ids
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[-1] == IGNORE_INDEX  # header and final newline
    assert stats.trained_tokens == sum(label != IGNORE_INDEX for label in ex.labels)
    assert set(stats.trained_by_role) == {"assistant"}
    assert stats.tokens == len(ex.input_ids) == stats.max_len == stats.mean_len
    assert sum(stats.tokens_by_role.values()) == stats.tokens


def test_prompt_tokens_are_ignored(tok):
    [ex], _ = tokenize_examples([CONV], tok)
    prompt = tok.apply_chat_template(list(CONV.messages[:2]), tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt] == ex.input_ids[n_prompt]


def test_last_turn_trains_only_final_answer(tok):
    [ex], stats = tokenize_examples([CONV], tok, loss_on="last_turn")
    assert trained_text(tok, ex) == "It equals 4.<|im_end|>"
    assert stats.trained_by_role == {"assistant": stats.trained_tokens}


def test_all_trains_every_token(tok):
    [ex], stats = tokenize_examples([CONV], tok, loss_on="all")
    assert ex.labels == ex.input_ids
    assert stats.trained_tokens == stats.tokens
    assert stats.trained_by_role == stats.tokens_by_role


def test_default_system_prompt_is_template_role_and_not_trained(smol_tok):
    [ex], stats = tokenize_examples([SHORT], smol_tok)
    n_template = len(smol_tok(SMOL_DEFAULT_SYSTEM, add_special_tokens=False).input_ids)
    assert smol_tok.decode(ex.input_ids[:n_template]) == SMOL_DEFAULT_SYSTEM
    assert stats.tokens_by_role["template"] == n_template
    assert "template" not in stats.trained_by_role
    assert ex.labels[:n_template] == [IGNORE_INDEX] * n_template
    assert trained_text(smol_tok, ex) == "Hello<|im_end|>"
    # With an explicit system message nothing is injected and no token is the template's.
    with_system = Example(({"role": "system", "content": "S"}, *SHORT.messages), "s:1")
    [ex2], stats2 = tokenize_examples([with_system], smol_tok)
    assert "template" not in stats2.tokens_by_role
    assert trained_text(smol_tok, ex2) == "Hello<|im_end|>"


def test_plain_template_gets_eos_appended_to_each_answer():
    tok = build_tiny_tokenizer(chat_template=PLAIN_TEMPLATE)
    [ex], stats = tokenize_examples([CONV], tok)
    eos = tok.eos_token_id
    # The answers' first tokens carry the space after "assistant:" and are trained with it.
    assert trained_text(tok, ex) == " Paris.<|im_end|>| It equals 4.<|im_end|>"
    assert ex.input_ids.count(eos) == 2
    full = tok.apply_chat_template(list(CONV.messages), tokenize=False)
    assert stats.tokens == len(tok(full, add_special_tokens=False).input_ids) + 2


def test_template_rewriting_earlier_turns_is_refused():
    last_differs = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}"
    )
    tok = build_tiny_tokenizer(chat_template=last_differs)
    with pytest.raises(TunelabError, match="conv.jsonl:1.*data.chat_template=chatml"):
        tokenize_examples([CONV], tok)


def test_truncate_keeps_prefix_and_drops_examples_without_trained_tokens(tok):
    [full], _ = tokenize_examples([CONV], tok)
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    kept, stats = tokenize_examples([CONV], tok, max_length=first_trained + 2, too_long="truncate")
    assert kept[0].input_ids == full.input_ids[: first_trained + 2]
    assert kept[0].labels == full.labels[: first_trained + 2]
    assert stats.truncated == 1 and stats.dropped == [] and stats.trained_tokens == 2
    kept, stats = tokenize_examples([CONV, SHORT], tok, max_length=first_trained, too_long="truncate")
    assert [k.source for k in kept] == [SHORT.source]
    assert stats.dropped == [CONV.source] and stats.examples == 1 and stats.truncated == 0


def test_drop_policy(tok):
    kept, stats = tokenize_examples([CONV, SHORT], tok, max_length=20, too_long="drop")
    assert [k.source for k in kept] == [SHORT.source] and stats.dropped == [CONV.source]
    assert stats.examples == 1 and stats.max_len <= 20


def test_error_policy_lists_every_offender(tok):
    long2 = Example(CONV.messages, "conv.jsonl:7")
    with pytest.raises(DataError) as excinfo:
        tokenize_examples([CONV, SHORT, long2], tok, max_length=20, too_long="error")
    problems = excinfo.value.problems
    assert [p.split(": ")[0] for p in problems] == ["conv.jsonl:1", "conv.jsonl:7"]
    n = len(tokenize_examples([CONV], tok)[0][0].input_ids)
    assert problems[0] == (
        f"conv.jsonl:1: {n} tokens > data.max_length=20; "
        "raise data.max_length, or set data.too_long to truncate or drop"
    )


def test_render_example_flags_runs(tok):
    runs = render_example(CONV, tok)
    assert "".join(text for text, _ in runs) == tok.apply_chat_template(list(CONV.messages), tokenize=False)
    assert [text for text, trained in runs if trained] == ["Paris.<|im_end|>", "It equals 4.<|im_end|>"]
    assert all(a[1] != b[1] for a, b in zip(runs, runs[1:]))  # runs alternate


def test_bad_options_and_missing_template(tok):
    with pytest.raises(TunelabError, match="loss_on"):
        tokenize_examples([SHORT], tok, loss_on="prompt")
    with pytest.raises(TunelabError, match="too_long"):
        tokenize_examples([SHORT], tok, too_long="wrap")
    no_template = build_tiny_tokenizer(chat_template=None)
    with pytest.raises(TunelabError, match="prepare_tokenizer"):
        tokenize_examples([SHORT], no_template)


def test_empty_input_gives_empty_stats(tok):
    kept, stats = tokenize_examples([], tok)
    assert kept == [] and stats.examples == 0 and stats.mean_len == 0.0
