"""What an exported GGUF file says about itself, read with the ``gguf`` package's reader: its architecture, the
tensor types the quantization gave, and the tokenizer facts generation depends on (eos, bos, chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_info(path: Path) -> dict[str, Any]:
    """Architecture, tensor type counts, eos/bos ids, add_bos and chat template of the GGUF file ``path``."""
    import gguf

    from tunelab.export.converter import llama_cpp_python_version

    reader = gguf.GGUFReader(path)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return {"architecture": _field(reader, "general.architecture"), "tensor_types": counts,
            "eos_id": _field(reader, "tokenizer.ggml.eos_token_id"), "bos_id": _field(reader, "tokenizer.ggml.bos_token_id"),
            "add_bos": _field(reader, "tokenizer.ggml.add_bos_token"),
            "chat_template": _field(reader, "tokenizer.chat_template"),
            "converter": f"llama.cpp's convert_hf_to_gguf.py and quantizer (llama-cpp-python {llama_cpp_python_version()})"}
