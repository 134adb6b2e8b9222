"""The tokenizer part of a GGUF file: tokens, token types, BPE merges, special ids and pre-tokenizer name.

Hand-written because no library writes a Hugging Face tokenizer into GGUF metadata from Python (the
``gguf`` package has the keys and the writer, llama.cpp's converter is a script, not a library). Only
byte-level BPE tokenizers (GPT-2 style, what SmolLM2, Llama 3, Qwen use) are written: their vocabulary
and merges go over one to one. llama.cpp splits text with a regex chosen by the ``tokenizer.ggml.pre``
name, so the HF pre-tokenizer is matched to a name whose regex is the same; an unknown one is refused
rather than written with a guess that would tokenize differently from training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import TunelabError

# The Llama 3 split regex as it appears in tokenizer.json (llama.cpp's "llama3" pre-tokenizer).
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                 "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

# gguf token types (gguf.TokenType values), kept here so this module imports without numpy-heavy gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Vocab:
    """What the GGUF tokenizer metadata holds."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk -> id
    add_bos: bool = False


def _byte_level(node: dict | None) -> bool:
    return bool(node) and node.get("type") == "ByteLevel"


def pre_tokenizer_name(pre: dict | None) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name whose split regex equals this HF pre-tokenizer's.

    Raises:
        TunelabError: A pre-tokenizer llama.cpp has no matching regex for (named in the message).
    """
    if _byte_level(pre) and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's (llama.cpp calls it "gpt-2")
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return "smollm"  # one digit at a time, then GPT-2's regex (original SmolLM tokenizers)
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            if (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
                return "llama3"
    raise TunelabError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
                       "tunelab knows (supported: GPT-2 ByteLevel, SmolLM digits + ByteLevel, Llama 3 split); export "
                       "--format hf instead, or convert with llama.cpp's own tools")


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]  # older tokenizer.json: "a b" strings


def _special_ids(tokenizer: Any, n_vocab: int) -> dict[str, int]:
    ids = {}
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None and 0 <= token_id < n_vocab:
            ids[name] = int(token_id)
    return ids


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts bos in front of plain text (then llama.cpp must too)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def build_vocab(tokenizer: Any, n_vocab: int) -> Vocab:
    """Read a fast byte-level BPE tokenizer into GGUF form, padded to the model's ``n_vocab`` embedding rows.

    Args:
        tokenizer: A ``transformers`` fast tokenizer (the one saved with the run, with its chat template).
        n_vocab: Rows of the model's embedding matrix (llama.cpp needs one token per row).

    Raises:
        TunelabError: A slow or non-BPE tokenizer, a pre-tokenizer without a llama.cpp equivalent, or more
            tokens than embedding rows.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError("GGUF export needs a fast tokenizer (tokenizer.json); this model has only a slow one")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec.get("decoder")):
        raise TunelabError(f"GGUF export: tokenizer model {model.get('type')!r} with decoder "
                           f"{(spec.get('decoder') or {}).get('type')!r} is not byte-level BPE; only byte-level BPE "
                           "tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) are supported; export --format hf instead")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if len(tokenizer) > n_vocab:
        raise TunelabError(f"GGUF export: the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} "
                           "embedding rows; resize the model's embeddings (the run should have done this)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:  # embedding rows past the tokenizer (vocabulary padded to a multiple): never produced
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    return Vocab(tokens, types, _merges(model), pre, _special_ids(tokenizer, n_vocab), _adds_bos(tokenizer))


def write_vocab(writer: Any, vocab: Vocab, chat_template: str | None) -> None:
    """Add the tokenizer metadata (and the chat template) to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
              "unk": writer.add_unk_token_id}
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
