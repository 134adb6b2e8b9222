"""llama.cpp's own GGUF tools, run from tunelab: ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` and the
quantizer (``llama_model_quantize``).

The converter scripts are not installed by any package: they ship in the source distribution of
``llama-cpp-python`` (under ``vendor/llama.cpp``, with the ``conversion`` package and the ``gguf-py`` they
import), the same sdist the ``export`` extra builds llama.cpp from. So the sdist of the installed version is
fetched once with ``pip download`` (sha256 checked against :data:`PINNED_SDISTS`), and only the converter's
files are extracted into ``<tunelab cache>/llama-cpp/<version>/`` (write then rename). Converter and binding
then come from one llama.cpp commit: a file the converter writes is one the installed llama.cpp reads.
Offline, the sdist can be put in ``<tunelab cache>/sdist/`` by hand (the error says so).

The scripts run in a subprocess (``python -m tunelab.export.convert_main``), with their vendored ``gguf-py``
first on ``sys.path``; their log goes to a file and only its telling lines come back in an error. The
quantizer runs in a subprocess too: a crash in C then fails the export instead of killing tunelab.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tunelab.errors import TunelabError

EXTRA = "pip install 'tunelab[export]'  (llama-cpp-python, built from its PyPI source, and sentencepiece)"
DEFAULT_VERSION = "0.3.36"  # the version fetched when llama-cpp-python is not installed (unchecked exports)
PINNED_SDISTS = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
PIP_TIMEOUT_S = 1800
CONVERT_TIMEOUT_S = 6 * 3600
# Output types: those the converter writes directly, and those llama.cpp's quantizer makes from its output.
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
QUANTIZER_TYPES = {"q6_K": "Q6_K", "q5_K_M": "Q5_K_M", "q4_K_M": "Q4_K_M", "q4_0": "Q4_0"}
QUANTS = (*CONVERTER_TYPES, *QUANTIZER_TYPES)
_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")


def canonical_quant(quant: str) -> str | None:
    """``quant`` spelled as in :data:`QUANTS` (``Q4_K_M`` and ``q4_k_m`` are ``q4_K_M``), None if unknown."""
    return next((q for q in QUANTS if q.lower() == quant.lower()), None)


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python distribution's version, else :data:`DEFAULT_VERSION`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return DEFAULT_VERSION


def _cache_root() -> Path:
    from tunelab.models.embedded import cache_root

    return cache_root()


def tools_dir(version: str | None = None) -> Path:
    """The folder holding llama.cpp's converter scripts for ``version`` (default: the installed one), fetched once.

    Raises:
        TunelabError: The sdist could not be downloaded (offline?), or its sha256 is not the pinned one.
    """
    version = version or llama_cpp_python_version()
    target = _cache_root() / "llama-cpp" / version
    if (target / "convert_hf_to_gguf.py").is_file() and (target / "gguf-py" / "gguf").is_dir():
        return target
    sdist = _sdist(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}.tmp-"))
    try:
        _extract(sdist, tmp, version)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sdist(version: str) -> Path:
    """The verified ``llama_cpp_python-<version>.tar.gz`` in the cache, downloaded with pip if missing."""
    from tunelab.models.embedded import file_sha256

    folder = _cache_root() / "sdist"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"llama_cpp_python-{version}.tar.gz"
    if not path.is_file():
        print(f"Fetching llama.cpp's GGUF converter: the llama-cpp-python {version} source from PyPI (once, ~77 MB) ...",
              file=sys.stderr, flush=True)
        _download(version, folder, path)
    pinned = PINNED_SDISTS.get(version)
    got = file_sha256(path)
    if pinned is not None and got != pinned:
        path.unlink()
        raise TunelabError(f"the llama-cpp-python {version} source has sha256 {got}, not the pinned {pinned}: the download "
                           "is damaged or the index serves another file. It was removed; try again")
    return path


def _download(version: str, folder: Path, path: Path) -> None:
    spec = f"llama-cpp-python=={version}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", str(tmp), spec]
    try:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            result = None
        found = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
        if result is None or result.returncode != 0 or not found:
            said = "no answer" if result is None else (result.stderr.strip().splitlines() or ["(nothing)"])[-1]
            raise TunelabError(
                f"GGUF export uses llama.cpp's own converter, which ships in the llama-cpp-python {version} source "
                f"distribution, and it could not be downloaded (pip said: {said}). On a machine with PyPI access run "
                f"`pip download --no-deps --no-binary :all: {spec}` and copy the .tar.gz into {folder}; or export "
                "--format hf")
        os.replace(found[0], path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(sdist: Path, into: Path, version: str) -> None:
    """Extract only the converter's files (``_KEEP`` under ``vendor/llama.cpp/``) of the sdist into ``into``."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if rel and member.isfile() and rel.startswith(_KEEP) and ".." not in Path(rel).parts:
                member.name = rel
                members.append(member)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise TunelabError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py; remove it and export again")
        tar.extractall(into, members=members, filter="data")


def _run(args: list[str], log: Path, what: str) -> None:
    """Run the converter driver with ``args``; a failure is a TunelabError with the log's telling lines."""
    cmd = [sys.executable, "-m", "tunelab.export.convert_main", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w", encoding="utf-8") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=CONVERT_TIMEOUT_S,
                                  cwd=log.parent).returncode
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        raise TunelabError(explain_failure(log.read_text(encoding="utf-8", errors="replace"), what))


def explain_failure(text: str, what: str) -> str:
    """A message for people from the log of a failed converter or quantizer run."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tail = next((line for line in reversed(lines) if "Error" in line or "error" in line.lower()), lines[-1] if lines else "")
    unsupported = next((line for line in lines if "is not supported" in line and "Model " in line), None)
    if unsupported is not None:
        arch = unsupported.split("Model ", 1)[1].split(" is not supported")[0]
        return (f"{what}: llama.cpp's converter (llama-cpp-python {llama_cpp_python_version()}) does not support the "
                f"architecture {arch}; export --format hf instead, or upgrade llama-cpp-python when llama.cpp adds it")
    if "No module named" in tail:
        module = tail.split("No module named", 1)[1].strip(" '\"")
        return f"{what}: llama.cpp's converter needs the Python package {module!r}: {EXTRA}"
    if "pre-tokenizer was not recognized" in text:
        return (f"{what}: llama.cpp does not know this tokenizer's pre-tokenizer (its converter identifies each by "
                "a hash of its output); a tokenizer of a known model family converts. Export --format hf instead")
    return f"{what} failed: {tail[:400]} (full log: run llama.cpp's converter by hand, or see above)"


def convert_hf(model_dir: Path, out: Path, outtype: str, name: str) -> None:
    """Write the HF model in ``model_dir`` (weights, config, tokenizer, chat template) as the GGUF file ``out``.

    Args:
        outtype: One of :data:`CONVERTER_TYPES`, or ``auto`` (llama.cpp picks the 16-bit type of the weights).
    """
    tmp = out.with_name(f".{out.name}.tmp")
    log = out.with_name(f".{out.name}.log")
    try:
        _run([str(tools_dir()), "hf", str(model_dir), "--outfile", str(tmp), "--outtype", outtype,
              "--model-name", name], log, "GGUF conversion")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path) -> None:
    """Write the PEFT LoRA adapter in ``adapter_dir`` as a GGUF adapter (f16) for the base model in ``base_dir``."""
    tmp = out.with_name(f".{out.name}.tmp")
    log = out.with_name(f".{out.name}.log")
    try:
        _run([str(tools_dir()), "lora", str(adapter_dir), "--base", str(base_dir), "--outfile", str(tmp),
              "--outtype", "f16"], log, "GGUF LoRA conversion")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def quantize(source: Path, out: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer: ``source`` (a 16-bit GGUF) to ``out`` in ``quant`` (a key of :data:`QUANTIZER_TYPES`)."""
    tmp = out.with_name(f".{out.name}.tmp")
    log = out.with_name(f".{out.name}.log")
    threads = threads or max(1, os.cpu_count() or 1)
    try:
        _run(["-", "quantize", str(source), str(tmp), QUANTIZER_TYPES[quant], str(threads)], log, f"quantizing to {quant}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def write_gguf(model_dir: Path, out: Path, quant: str, name: str) -> None:
    """The GGUF file ``out`` of the HF model in ``model_dir``, in ``quant`` (one of :data:`QUANTS`).

    16-bit types and q8_0 are written by the converter from the weights; the others are quantized by llama.cpp
    from the converter's 16-bit output (its usual ``convert_hf_to_gguf.py`` then ``llama-quantize`` path).
    """
    if quant in CONVERTER_TYPES:
        convert_hf(model_dir, out, quant, name)
        return
    if quant not in QUANTIZER_TYPES:
        raise TunelabError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    half = out.with_name(f".{out.stem}.16bit.gguf")
    try:
        convert_hf(model_dir, half, "auto", name)
        quantize(half, out, quant)
    finally:
        half.unlink(missing_ok=True)
