"""Fill-in-the-middle (``data.format: fim``, recipe pretrain): the PSM/SPM rearrangement, its tokens (the
tokenizer's own or added), determinism, the config checks, and a pretraining run on code files that saves
the added tokens and shows an example in ``tunelab data inspect``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.resolve import load_config
from tunelab.data.fim import RESERVED, FimTokens, fim_documents, fim_tokens, pieces, to_fim
from tunelab.data.text import TextDocument, read_texts
from tunelab.errors import ConfigError
from tunelab.models.tiny import build_tiny_tokenizer
from tunelab.recipes import get_recipe

TOKENS = FimTokens("<P>", "<S>", "<M>")
CODE = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


def _parts(text: str) -> tuple[str, str, str]:
    if text.startswith("<P><S>"):  # SPM: suffix, then prefix + middle
        suffix, rest = text[len("<P><S>"):].split("<M>")
        return "", rest, suffix
    prefix, rest = text[len("<P>"):].split("<S>")
    suffix, middle = rest.split("<M>")
    return prefix, middle, suffix


def test_psm_and_spm_keep_every_character_and_put_the_middle_last():
    orders = {}
    for seed in range(40):
        text, order = to_fim(CODE, TOKENS, np.random.default_rng(seed), rate=1.0, spm_rate=0.5)
        orders[order] = orders.get(order, 0) + 1
        prefix, middle, suffix = _parts(text)
        if order == "psm":
            assert prefix + middle + suffix == CODE
        else:
            assert middle + suffix == CODE  # prefix and middle run on, then the suffix completes the text
    assert set(orders) == {"psm", "spm"}
    assert to_fim(CODE, TOKENS, np.random.default_rng(0), rate=0.0, spm_rate=0.5) == (CODE, "plain")


def test_the_rate_is_kept_and_the_draws_depend_only_on_seed_and_index():
    docs = [TextDocument(f"{CODE}# {i}\n", f"f{i}.py") for i in range(400)]
    once = fim_documents(docs, TOKENS, rate=0.3, spm_rate=0.0, seed=5)
    assert once == fim_documents(docs, TOKENS, rate=0.3, spm_rate=0.0, seed=5)
    assert fim_documents(docs[:10], TOKENS, rate=0.3, spm_rate=0.0, seed=5) == once[:10]
    share = sum(d.text.startswith("<P>") for d in once) / len(docs)
    assert 0.24 < share < 0.36
    for doc, fim in zip(docs, once):  # spm_rate 0: PSM only, whose parts rebuild the document
        if fim.text.startswith("<P>"):
            prefix, rest = fim.text[3:].split("<S>")
            suffix, middle = rest.split("<M>")
            assert prefix + middle + suffix == doc.text


def test_fim_tokens_are_the_tokenizers_own_or_added():
    tokenizer = build_tiny_tokenizer()
    tokens, added = fim_tokens(tokenizer)
    assert added == ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"] and tokens.middle == "<fim_middle>"
    ids = tokenizer(f"{tokens.prefix}x = 1{tokens.suffix}{tokens.middle}", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<fim_prefix>")  # one token each, never split
    assert fim_tokens(tokenizer) == (tokens, [])  # now it has them
    qwen = build_tiny_tokenizer()
    qwen.add_tokens(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], special_tokens=True)
    assert fim_tokens(qwen) == (FimTokens("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), [])


def test_pieces_fit_a_block_and_rebuild_the_file():
    tokenizer = build_tiny_tokenizer()
    doc = TextDocument(CODE * 20, "m.py")
    cut = pieces([doc], tokenizer, max_tokens=64)
    assert len(cut) > 3 and "".join(p.text for p in cut) == doc.text
    assert all(len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 64 - RESERVED + 2 for p in cut)
    assert [p.source for p in cut[:2]] == ["m.py#piece0", "m.py#piece1"]


def test_fim_config_is_checked():
    with pytest.raises(ConfigError, match="data.format fim trains on code files with recipe pretrain"):
        load_config(None, ["data.train=src", "data.format=fim"])
    with pytest.raises(ConfigError, match="data.fim applies to data.format fim"):
        load_config(None, ["recipe=pretrain", "data.train=src", "data.fim={rate: 0.5}"])
    with pytest.raises(ConfigError, match="rate"):
        load_config(None, ["recipe=pretrain", "data.train=src", "data.format=fim", "data.fim={rate: 2}"])


def _code(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    for i in range(6):
        (folder / f"m{i}.py").write_text(CODE.replace("add", f"add{i}") * 3)
    (folder / "notes.md").write_text("# Notes\n" + CODE)
    (folder / "data.bin").write_bytes(b"\x00")
    return folder


def test_pretraining_on_code_with_fim(tmp_path, tiny_base_llama):
    code = _code(tmp_path)
    assert len(read_texts([str(code)], code=True)) == 7 and len(read_texts([str(code)])) == 1
    overrides = ["recipe=pretrain", f"model={tiny_base_llama}", f"data.train={code}", "data.format=fim",
                 "data.fim={rate: 1.0, spm_rate: 0.5}", "data.max_length=64", f"output_dir={tmp_path / 'run'}",
                 "train.batch_size=4", "train.lr=1e-2", "train.max_steps=3", "train.warmup_ratio=0", "method.name=lora",
                 "method.r=4", "eval.probe=false"]
    result = get_recipe("pretrain").main(load_config(None, overrides))
    saved = json.loads(next(result.run_dir.rglob("tokenizer.json")).read_text())
    assert {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"} <= {t["content"] for t in saved["added_tokens"]}
    shown = CliRunner().invoke(app, ["data", "inspect", *_as_file(tmp_path, overrides)])
    assert shown.exit_code == 0, shown.output
    assert "<fim_prefix>" in shown.output and "<fim_middle>" in shown.output


def _as_file(tmp_path, overrides: list[str]) -> list[str]:
    """A config file plus the overrides as ``tunelab data inspect CONFIG OVERRIDES...`` takes them."""
    path = tmp_path / "fim.yaml"
    path.write_text("recipe: pretrain\n")
    return [str(path), *[o for o in overrides if not o.startswith("recipe=")]]
