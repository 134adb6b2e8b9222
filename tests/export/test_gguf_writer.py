"""The GGUF writer on tiny models, read back with gguf.GGUFReader (names, shapes, types, metadata) and loaded
back with transformers' GGUF reader (the path tunelab's ``model: file.gguf`` takes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.export.gguf_model import permute_rotary_rows, write_gguf
from tunelab.export.gguf_vocab import pre_tokenizer_name

PER_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _load(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def written(tiny_llama, tmp_path_factory):
    model, tokenizer = _load(tiny_llama)
    folder = tmp_path_factory.mktemp("gguf")
    counts = {q: write_gguf(folder / f"m-{q}.gguf", model, tokenizer, q, "tiny") for q in ("f16", "q8_0", "q4_0")}
    return folder, model, tokenizer, counts


def test_tensors_have_llama_cpp_names_and_reversed_shapes(written):
    import gguf

    folder, model, _, _ = written
    reader = gguf.GGUFReader(folder / "m-f16.gguf")
    found = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}
    expected = {"token_embd.weight", "output.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(model.config.num_hidden_layers) for n in PER_BLOCK}
    assert set(found) == expected  # untied tiny llama: its own output matrix
    hf = dict(model.state_dict())
    assert found["blk.0.attn_k.weight"][0] == tuple(reversed(hf["model.layers.0.self_attn.k_proj.weight"].shape))
    assert found["token_embd.weight"][0] == tuple(reversed(hf["model.embed_tokens.weight"].shape))
    assert found["blk.1.ffn_norm.weight"][1] == "F32" and found["blk.1.ffn_down.weight"][1] == "F16"


def test_metadata_holds_hparams_tokenizer_and_chat_template(written):
    import gguf

    folder, model, tokenizer, _ = written
    reader = gguf.GGUFReader(folder / "m-f16.gguf")
    c = model.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == c.num_hidden_layers
    assert _field(reader, "llama.attention.head_count") == c.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == c.num_key_value_heads
    assert _field(reader, "llama.rope.dimension_count") == c.hidden_size // c.num_attention_heads
    assert _field(reader, "llama.context_length") == c.max_position_embeddings
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == c.vocab_size
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert types[vocab["<|im_end|>"]] == gguf.TokenType.CONTROL and types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template


@pytest.mark.parametrize("quant, big, embed", [("q8_0", "Q8_0", "Q8_0"), ("q4_0", "Q4_0", "Q8_0")])
def test_quantized_files_quantize_matrices_and_keep_norms_f32(written, quant, big, embed):
    import gguf

    folder, _, _, counts = written
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(folder / f"m-{quant}.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == big and types["token_embd.weight"] == embed == types["output.weight"]
    assert types["output_norm.weight"] == "F32"
    assert sum(counts[quant].values()) == len(types)


@pytest.mark.parametrize("quant, tolerance", [("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 2e-1)])
def test_gguf_loads_back_as_a_tunelab_model_with_the_same_logits(written, tmp_path, monkeypatch, quant, tolerance):
    """``model: out.gguf``: tunelab converts the file with transformers' GGUF reader, which undoes our q/k layout."""
    from tunelab.generation import render_prompt
    from tunelab.models.load import load_model, load_tokenizer, resolve_model_path

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    folder, model, tokenizer, _ = written
    path = resolve_model_path(str(folder / f"m-{quant}.gguf"))
    back, back_tokenizer = load_model(path), load_tokenizer(path)
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    ids = render_prompt(tokenizer, conversation)
    assert render_prompt(back_tokenizer, conversation) == ids
    with torch.no_grad():
        delta = (model(torch.tensor([ids])).logits - back(torch.tensor([ids])).logits).abs().max().item()
    assert delta < tolerance


def test_rotary_rows_are_interleaved_per_head():
    weight = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of 4 rows: halves (0 1 | 2 3), (4 5 | 6 7)
    assert permute_rotary_rows(weight, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unsupported_architecture_is_refused_naming_the_supported_ones(tiny_qwen2, tmp_path):
    model, tokenizer = _load(tiny_qwen2)
    with pytest.raises(TunelabError, match=r"architecture 'qwen2' is not supported.*llama, mistral"):
        write_gguf(tmp_path / "q.gguf", model, tokenizer, "f16", "q")
    assert not (tmp_path / "q.gguf").exists()


def test_unknown_pre_tokenizer_is_refused():
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name(digits) == "smollm"
    with pytest.raises(TunelabError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"type": "Metaspace", "replacement": "▁"})
