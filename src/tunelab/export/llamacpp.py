"""Run an exported GGUF in llama.cpp (through ``llama-cpp-python``) the way the checks need it.

Greedy decoding and scoring are done token by token on llama.cpp's logits (``Llama.eval`` with
``logits_all``) rather than through its sampler, so the comparison with transformers is about the
model, not about two samplers' defaults. Chat-template rendering is taken from llama.cpp's own C API
(``llama_chat_apply_template``, what ``llama-server`` uses without ``--jinja``) and from
llama-cpp-python's Jinja formatter (what ``create_chat_completion`` uses) on the template stored in the file.

Models are loaded without llama.cpp's extra CPU buffer types (AMX tiles, repacked weights): on the 2-core
dev machine (a virtualised Xeon that advertises AMX) a ``-march=native`` build dies with SIGILL in the AMX
kernels on the first q8_0/q4_0 matrix product. The plain CPU kernels compute the same operations; only
speed differs, which does not matter for a check on a few prompts. llama-cpp-python has no constructor
argument for it, so the default model parameters are wrapped while the model loads (``_plain_cpu_buffers``).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError

EXTRA = "pip install 'tunelab[export]'  (llama-cpp-python, built from its PyPI source)"


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


@contextlib.contextmanager
def _plain_cpu_buffers() -> Iterator[None]:
    """While a model loads, default model parameters without extra buffer types (see the module docstring)."""
    import llama_cpp.llama_cpp as binding

    original = binding.llama_model_default_params

    def params() -> Any:
        value = original()
        if hasattr(value, "use_extra_bufts"):
            value.use_extra_bufts = False
        return value

    binding.llama_model_default_params = params
    try:
        yield
    finally:
        binding.llama_model_default_params = original


class Runtime:
    """One GGUF file loaded in llama.cpp (CPU), with the operations the export checks use."""

    def __init__(self, path: Path, n_ctx: int, lora: Path | None = None, threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise TunelabError(f"verifying a GGUF export needs llama.cpp's Python binding: {EXTRA}; or pass --force "
                               "to write the file unverified (recorded in export_report.json)") from None
        import os

        with _plain_cpu_buffers():
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                             n_threads=threads or max(1, min(4, os.cpu_count() or 1)),
                             lora_path=str(lora) if lora else None, n_gpu_layers=0, seed=0)

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered prompt text, special tokens parsed, nothing added (as training tokenized it)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def greedy(self, prompt: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt``: the argmax token each step, ending with (and including) a stop token."""
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            if token in stop_ids:
                break
            llm.eval([token])
        return out

    def logprobs(self, prompt: list[int], continuation: list[int]) -> np.ndarray:
        """log p(token | everything before) for every token of ``continuation`` after ``prompt``."""
        llm = self.llm
        llm.reset()
        llm.eval(prompt + continuation)
        logits = np.asarray(llm.scores[len(prompt) - 1: len(prompt) + len(continuation) - 1], dtype=np.float64)  # (N, V)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return logits[np.arange(len(continuation)), continuation] - log_z

    def eos(self) -> int:
        """The end-of-sequence token id llama.cpp read from the file."""
        import llama_cpp

        return int(llama_cpp.llama_vocab_eos(self.llm._model.vocab))

    def is_end_of_generation(self, token: int) -> bool:
        """Whether llama.cpp ends generation at ``token`` (its eos, eot or another end-of-generation token)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF file, as llama.cpp reads it."""
        return self.llm.metadata.get("tokenizer.chat_template")

    def render_builtin(self, messages: list[dict], generation: bool = True) -> str | None:
        """llama.cpp's C rendering of the stored template; None when llama.cpp does not recognise the template."""
        import llama_cpp

        template = self.chat_template()
        if not template:
            return None
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]  # alive while C reads them
        chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
        size = 4096 + sum(len(r) + len(c) for r, c in keep) * 2
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(keep), generation, buf, size)
        if n < 0:
            return None
        if n > size:
            buf = ctypes.create_string_buffer(n + 1)
            n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(keep), generation, buf, n + 1)
        return buf.raw[:n].decode("utf-8")

    def render_jinja(self, messages: list[dict], bos: str, eos: str) -> str | None:
        """llama-cpp-python's Jinja rendering of the stored template (``create_chat_completion``'s prompt)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.chat_template()
        if not template:
            return None
        return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt


def describe(meta: dict[str, Any]) -> str:
    """A short line for messages: architecture and file type of a loaded GGUF."""
    return f"{meta.get('general.architecture', '?')} file type {meta.get('general.file_type', '?')}"
