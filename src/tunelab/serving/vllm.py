"""``tunelab serve --engine vllm``: the command line that starts vLLM's OpenAI server on the same base and adapters.

Clients keep their code when a user outgrows the built-in engine: vLLM answers the same routes, takes the
adapter's name in ``model``, and (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) the same load/unload bodies.
Only LoRA adapters are passed (vLLM serves no other peft method); a run is given as its ``adapter/`` folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tunelab.errors import TunelabError

# The ranks vLLM accepts for --max-lora-rank; the adapters' largest rank is rounded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter folder of a run directory (or the folder itself), checked to be a LoRA adapter."""
    from tunelab.runs import open_run

    run = open_run(path)
    if run is not None and (run.record.parent or {}).get("mode") == "merge":
        raise TunelabError(f"--adapter {path}: the run trained on its parent merged into the base (init_from_merge), so its "
                           "adapter does not apply to the base; `tunelab merge` it and serve the merged model, or use --engine tunelab")
    folder = run.artifact_dir if run is not None else Path(path)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise TunelabError(f"--adapter {path}: no adapter_config.json in {folder}; vLLM serves PEFT LoRA adapters only")
    peft_type = str(json.loads(config.read_text()).get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise TunelabError(f"--adapter {path}: a {peft_type} adapter; vLLM serves LoRA adapters only (use --engine tunelab)")
    return folder


def lora_rank(folder: Path) -> int:
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = [int(config.get("r") or 8), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def vllm_command(base: str, adapters: dict[str, str | Path], *, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, served_name: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start ``vllm serve`` on ``base`` with ``adapters`` loaded.

    Args:
        base: A resolved base model path (or hub id).
        adapters: Adapter name to run directory or adapter folder.
        host: Address to bind.
        port: Port to bind.
        api_key: Passed as ``--api-key`` when set.
        served_name: The base's name in requests (``--served-model-name``).

    Raises:
        TunelabError: an adapter is not a LoRA adapter, or its rank is above what vLLM accepts.
    """
    argv = ["vllm", "serve", str(base), "--host", host, "--port", str(port)]
    if served_name:
        argv += ["--served-model-name", served_name]
    folders = {name: _adapter_dir(path) for name, path in adapters.items()}
    # LoRA is enabled even without adapters now, so adapters can be loaded at runtime.
    rank = max((lora_rank(f) for f in folders.values()), default=16)
    allowed = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if allowed is None:
        raise TunelabError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}); "
                           "serve it with --engine tunelab, or merge it (`tunelab merge`) and serve the merged model")
    argv += ["--enable-lora", "--max-lora-rank", str(allowed), "--max-loras", str(max(len(folders), 1))]
    if folders:
        argv += ["--lora-modules", *(f"{name}={folder}" for name, folder in folders.items())]
    if api_key:
        argv += ["--api-key", api_key]
    return argv, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def exec_vllm(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process by vLLM's server (so Ctrl-C and exit codes are vLLM's own)."""
    if shutil.which(argv[0]) is None:
        raise TunelabError("--engine vllm: the `vllm` command is not installed; `pip install vllm` on a CUDA machine, "
                           "or serve with the built-in engine (--engine tunelab)")
    os.execvpe(argv[0], argv, {**os.environ, **env})
