"""recipe: pretrain on tiny models: text files in, perplexity and probe before/after out, resumable, clear errors."""

from __future__ import annotations

import json

import pytest

from tunelab.resolve import load_config
from tunelab.data.text import read_texts, split_holdout, text_blocks
from tunelab.errors import ConfigError, DataError
from tunelab.models.tiny import build_tiny_tokenizer
from tunelab.recipes import get_recipe

TEXT = "The red fox jumps over the blue fence. " * 12


def _corpus(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(TEXT + f" Page {i}.", encoding="utf-8")
    (folder / "sub" / "notes.md").write_text("# Notes\n" + TEXT, encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    return folder


def _config(tmp_path, tiny_llama, *extra):
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Colour {i}?", "answers": ["red"]}) + "\n" for i in range(2)))
    return load_config(None, [
        "recipe=pretrain", f"model={tiny_llama}", f"data.train={_corpus(tmp_path)}", "data.max_length=32",
        f"output_dir={tmp_path / 'run'}", "train.batch_size=4", "train.lr=1e-2", "train.max_steps=4", "train.warmup_ratio=0",
        "method.name=lora", "method.r=4", f"eval.probe={probe}", "eval.max_new_tokens=4", *extra])


def test_pretrain_trains_on_a_folder_and_reports_perplexity_and_probe(tmp_path, tiny_llama):
    config = _config(tmp_path, tiny_llama)
    result = get_recipe("pretrain").main(config)
    report = json.loads((result.run_dir / "eval.json").read_text())
    perplexity = report["perplexity"]
    assert perplexity["blocks"] > 0
    assert perplexity["after"]["eval_ppl"] < perplexity["before"]["eval_ppl"]  # it learned the domain's text
    assert report["forgetting"]["items"] == 2
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["recipe"] == "pretrain" and manifest["status"] == "finished" and manifest["steps_done"] == 4
    assert manifest["precision"] == "fp32" and manifest["device_kind"] == "cpu"
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    again = get_recipe("pretrain").main(config, resume=True)  # finished: nothing to do, same numbers
    assert again.steps == 4 and again.train_loss == result.train_loss


def test_text_blocks_train_every_token_and_end_documents_with_eos(tmp_path):
    tokenizer = build_tiny_tokenizer()
    docs = read_texts([str(_corpus(tmp_path))])
    assert [d.source.rsplit("/", 1)[-1] for d in docs] == ["doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt", "notes.md"]
    blocks = text_blocks(docs, tokenizer, block_size=32)
    assert all(len(b.input_ids) <= 32 and b.labels == b.input_ids for b in blocks)
    ends = [b for b in blocks if b.input_ids[-1] == tokenizer.eos_token_id]
    assert len(ends) == len(docs)  # one eos per document, at its end
    train, held = split_holdout(blocks, 0.25)
    assert len(held) == len(blocks) // 4 and not {b.source for b in held} & {b.source for b in train}


def test_bad_text_records_are_reported_with_file_and_line(tmp_path):
    table = tmp_path / "corpus.jsonl"
    table.write_text('{"text": "fine"}\n{"body": "wrong field"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_texts([str(table), str(tmp_path / "missing.txt")])
    problems = "\n".join(err.value.problems)
    assert f"{table}:2: no text in field 'text'" in problems and f"{table}:3: invalid JSON" in problems
    assert "missing.txt: no such file" in problems


def test_pretrain_options_are_validated_with_the_config(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="recipe.holdout"):
        _config(tmp_path, tiny_llama, "recipe.holdout=2")
    with pytest.raises(ConfigError, match="recipe.name: unknown recipe 'pretrian'"):
        load_config(None, ["recipe=pretrian", "data.train=x.jsonl"])


def test_data_inspect_shows_the_blocks_of_a_pretrain_config(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from tunelab.cli import app

    config = tmp_path / "pretrain.yaml"
    config.write_text(f"recipe: pretrain\nmodel: {tiny_llama}\ndata: {{train: {_corpus(tmp_path)}, max_length: 32}}\n")
    result = CliRunner().invoke(app, ["data", "inspect", str(config)])
    assert result.exit_code == 0, result.output
    assert "5 documents" in result.output and "100.0%" in result.output and "red fox" in result.output
