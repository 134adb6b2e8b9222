"""``tunelab serve --watch RUN_DIR``: serve each new checkpoint of a run that is still training as ``NAME@step-N``.

A checkpoint holds the trainable parameters under the training model's names (``...lora_A.default.weight``),
not a PEFT adapter. The watcher turns a new one into an adapter folder in a temporary directory (the peft
config the run's method builds from the run's recorded options, the tensors renamed as peft saves them, the
served base's tokenizer) and loads it like any other adapter. Only the newest ``keep`` checkpoints stay loaded.
Methods whose artifact is not a peft adapter (full, freeze, Houlsby adapters) are not watched.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.serving.models import Registry

log = logging.getLogger("tunelab.serve")


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


class CheckpointWatcher:
    """Polls ``run_dir/checkpoints`` and loads each new checkpoint into ``registry``.

    Args:
        registry: Where the checkpoints are served (on its base).
        run_dir: A run directory (it has ``manifest.json`` from its first step on).
        interval: Seconds between polls.
        keep: Checkpoints kept loaded; older ones are unloaded as new ones arrive.
    """

    def __init__(self, registry: Registry, run_dir: str | Path, interval: float = 2.0, keep: int = 3):
        from tunelab.runs import open_run

        self.run = open_run(run_dir)
        if self.run is None:
            raise TunelabError(f"--watch {run_dir}: not a run directory (no manifest.json yet?); start the training first")
        from tunelab.serving.models import same_base

        served = registry.get(registry.base_id).backbone.base_path
        if not same_base(self.run.base_model, served):
            raise TunelabError(f"--watch {run_dir}: the run trains {self.run.base_model}, but the server's base is {served}; "
                               "serve the run's base model (give the run directory as the model)")
        self.registry, self.interval, self.keep = registry, interval, keep
        self.name = Path(run_dir).name
        self.loaded: list[str] = []
        self.seen: set[int] = set()
        self.folders = tempfile.TemporaryDirectory(prefix="tunelab-watch-")
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tunelab-serve-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(30)
        self.folders.cleanup()

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - a checkpoint pruned mid-read; the next poll tries again
                log.warning("watching %s: %s", self.run.path, exc)
            self.stop_event.wait(self.interval)

    def poll(self) -> list[str]:
        """Load the checkpoints that appeared since the last poll (newest ``keep`` only); returns the names loaded."""
        from tunelab.training.checkpoint import checkpoint_dirs

        new = [c for c in checkpoint_dirs(self.run.path / "checkpoints") if _step_of(c) not in self.seen][-self.keep:]
        names = []
        for checkpoint in new:
            step = _step_of(checkpoint)
            self.seen.add(step)
            name = f"{self.name}@step-{step}"
            self.registry.load(name, self._adapter_folder(checkpoint, name))
            self.loaded.append(name)
            names.append(name)
            log.info("serving %s", name)
        while len(self.loaded) > self.keep:
            self.registry.unload(self.loaded.pop(0))
        return names

    def _adapter_folder(self, checkpoint: Path, name: str) -> Path:
        """A PEFT adapter folder holding the checkpoint's trainable tensors."""
        from safetensors.torch import load_file, save_file

        from tunelab.methods import get_method
        from tunelab.methods.common import PeftMethod

        method = get_method(self.run.method_name)
        if not isinstance(method, PeftMethod):
            raise TunelabError(f"--watch {self.run.path}: method {method.name} saves no peft adapter; only peft methods are watched")
        base = self.registry.get(self.registry.base_id)
        config = method.peft_config(base.backbone.base, method.options_class(**self.run.method_options()))
        config.base_model_name_or_path = self.run.base_model
        folder = Path(self.folders.name) / name.replace("@", "_")
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
        tensors = load_file(str(checkpoint / "trainable.safetensors"))
        # peft saves adapter weights without the adapter's name (".default"); it adds the new name on load.
        save_file({k.replace(".default.", "."): v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
        base.tokenizer.save_pretrained(str(folder))
        return folder
