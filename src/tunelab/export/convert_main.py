"""The subprocess that runs llama.cpp's GGUF tools for ``tunelab.export.converter``.

``python -m tunelab.export.convert_main <tools dir> hf|lora <script arguments>`` runs ``convert_hf_to_gguf.py``
or ``convert_lora_to_gguf.py`` from ``<tools dir>`` as its own ``__main__``, with the vendored ``gguf-py`` and
``conversion`` package first on ``sys.path`` (so the installed ``gguf`` of another version is not used).
``python -m tunelab.export.convert_main - quantize <in> <out> <TYPE> <threads>`` runs llama.cpp's quantizer.

One addition to the converter, written here because llama.cpp has no option for it: the converter names a
byte-level BPE tokenizer's pre-tokenizer by a hash of its output on a fixed text, so a tokenizer trained with
the ``tokenizers`` library's plain ``ByteLevel`` pre-tokenizer (tunelab's tiny test models, a user's own
tokenizer) matches no known hash and is refused. Its split is GPT-2's regex, which llama.cpp implements as
the ``gpt-2`` pre-tokenizer, so exactly that case (an unknown hash and a ``ByteLevel`` pre-tokenizer with its
regex, nothing else) is named ``gpt-2``; every other unknown hash is still refused.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def plain_byte_level(tokenizer_json: Path) -> bool:
    """Whether the tokenizer's pre-tokenizer is exactly ``ByteLevel`` with GPT-2's regex."""
    if not tokenizer_json.is_file():
        return False
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _patch_pre_tokenizer_names() -> None:
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:  # noqa: ANN001 - llama.cpp's signature
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if plain_byte_level(Path(self.dir_model) / "tokenizer.json"):
                base.logger.warning("tunelab: unknown pre-tokenizer hash of a plain ByteLevel tokenizer: using 'gpt-2'")
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def _quantize(source: str, out: str, kind: str, threads: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = int(threads)
    code = llama_cpp.llama_model_quantize(source.encode(), out.encode(), params)
    if code != 0:
        raise SystemExit(f"error: llama_model_quantize returned {code}")


def main(argv: list[str]) -> None:
    tools, command, rest = argv[0], argv[1], argv[2:]
    if command == "quantize":
        _quantize(*rest)
        return
    script = {"hf": "convert_hf_to_gguf.py", "lora": "convert_lora_to_gguf.py"}[command]
    sys.path[:0] = [str(Path(tools) / "gguf-py"), tools]
    _patch_pre_tokenizer_names()
    sys.argv = [str(Path(tools) / script), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
