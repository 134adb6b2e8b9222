"""Tiny random models and a tiny tokenizer, built in-process, for tests and quick checks.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in milliseconds on a small
built-in corpus (so any UTF-8 text encodes), and the models are randomly initialised transformers
configs of a few layers. Llama- and Qwen2-style architectures are provided because they differ in the
details that break fine-tuning code (biases on q/k/v, tied embeddings, rope settings).
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "SELECT name, price FROM products WHERE price > 10 ORDER BY price;",
    "user assistant system: You are a helpful assistant. Answer briefly.",
    "Classify the sentiment of this review: positive negative neutral.",
    "1 2 3 4 5 6 7 8 9 10 plus minus times equals",
    "Translate to French: hello world -> bonjour le monde",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tiny_tokenizer(vocab_size: int = 320, chat_template: str | None = CHATML_TEMPLATE, chatml_tokens: bool = True):
    """A byte-level BPE fast tokenizer, by default with ChatML special tokens.

    Args:
        vocab_size: Target vocabulary size (at least 256 byte symbols plus the special tokens).
        chat_template: Jinja chat template to attach, or None for a tokenizer without one.
        chatml_tokens: False builds a "base model" tokenizer with only ``<|endoftext|>`` (eos) and
            ``<pad>``, to test the chat-template fallback that has to add tokens.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``; eos ``<|im_end|>`` (or ``<|endoftext|>``), pad ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if chatml_tokens else ["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>" if chatml_tokens else "<|endoftext|>",
        pad_token="<pad>",
        unk_token=None,
    )
    if chatml_tokens:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|endoftext|>"]})
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_tiny_model(arch: str = "llama", vocab_size: int = 320, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised causal LM of a few layers.

    Args:
        arch: ``"llama"`` or ``"qwen2"``.
        vocab_size: Must cover the tokenizer's vocabulary.
        seed: Seed for the random weights, so tests are deterministic.
        hidden: Hidden size.
        layers: Number of decoder blocks.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny_model(directory: str | Path, arch: str = "llama", chat_template: str | None = CHATML_TEMPLATE, chatml_tokens: bool = True,
                    layers: int = 2, hidden: int = 32) -> Path:
    """Build a tiny model and tokenizer and save them as a plain HF directory (safetensors).

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    directory = Path(directory)
    tok = build_tiny_tokenizer(chat_template=chat_template, chatml_tokens=chatml_tokens)
    model = build_tiny_model(arch, vocab_size=len(tok), layers=layers, hidden=hidden)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def save_tiny_of_type(directory: str | Path, model_type: str, hidden: int = 64, seed: int = 0, **settings) -> Path:
    """A tiny random model of any transformers ``model_type`` (2 blocks, ``hidden`` wide, 4 heads, 2 kv heads),
    built from that type's own config class with the tiny tokenizer, saved as a plain HF directory.

    Args:
        directory: Folder to write.
        model_type: A key of transformers' ``CONFIG_MAPPING`` (``qwen3_moe``, ``gemma3_text``, ...).
        hidden: Hidden size (intermediate = 2 x hidden).
        seed: Seed for the random weights.
        settings: Config fields beyond the common ones (head_dim, experts, layer types, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tok = build_tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    config = AutoConfig.for_model(model_type, **{**common, **settings})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory
