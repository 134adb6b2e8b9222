"""Keep the best, not the last: ``train.keep_best`` and ``train.early_stopping``.

At each validation (``train.eval_every``; by default at each checkpoint) the loop hands the metrics to
:class:`BestKeeper`. A lower ``eval_loss`` than every earlier one writes the trainable parameters to
``RUN_DIR/best/weights.safetensors`` (write, then rename), with ``keep_best``; with ``early_stopping: N`` the
loop ends after ``N`` validations in a row without a lower one. At the end the artifact is made from the best
parameters (the manifest says which step: ``best_step``, ``best_eval_loss``).

The history of validations is ``RUN_DIR/best/state.json``, so a resumed run knows its best and its count:
on resume the entries after the checkpoint's step are dropped (those steps run again, bit-identically, and
validate again). Saved weights record their step; weights from a dropped step are not restored.

Hand-written because transformers' ``EarlyStoppingCallback`` and ``load_best_model_at_end`` belong to its
``Trainer``, which tunelab does not use; this is the same rule over our loop's validations.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.atomic import write_text_atomic

WEIGHTS = "weights.safetensors"


@dataclass
class BestKeeper:
    folder: Path
    patience: int | None
    keep: bool
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped: bool = False

    @classmethod
    def open(cls, run_dir: Path, *, patience: int | None, keep: bool, start_step: int) -> BestKeeper:
        """The keeper of ``run_dir``; on resume from ``start_step`` its history up to that step."""
        folder = Path(run_dir) / "best"
        history: list[tuple[int, float]] = []
        if start_step and (folder / "state.json").is_file():
            saved = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            history = [(int(s), float(v)) for s, v in saved.get("history", []) if int(s) <= start_step]
        keeper = cls(folder, patience, keep, history)
        keeper.stopped = patience is not None and keeper.since_best() >= patience
        return keeper

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, eval_loss) of the lowest validation so far (the earliest of equal ones)."""
        return min(self.history, key=lambda entry: (entry[1], entry[0])) if self.history else None

    def since_best(self) -> int:
        best = self.best
        return sum(step > best[0] for step, _ in self.history) if best else 0

    def update(self, step: int, metrics: dict[str, float], params: dict[str, torch.nn.Parameter], *, main: bool = True) -> bool:
        """Record the validation of ``step``; True when early stopping says the loop should end now."""
        loss = metrics.get("eval_loss")
        if loss is None or loss != loss:  # no validation loss, or NaN: nothing to compare
            return False
        previous = self.best
        self.history.append((step, float(loss)))
        if main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.keep and (previous is None or loss < previous[1]):
                _save_weights(self.folder / WEIGHTS, params, step)
            write_text_atomic(self.folder / "state.json", json.dumps({"history": self.history}))
        self.stopped = self.patience is not None and self.since_best() >= self.patience
        return self.stopped

    def restore(self, params: dict[str, torch.nn.Parameter]) -> int | None:
        """Load the best step's parameters into ``params`` (with ``keep``); returns that step, None when there is
        nothing to restore (no validation, or the best step's weights are not on disk)."""
        best = self.best
        if not self.keep or best is None or not (self.folder / WEIGHTS).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.folder / WEIGHTS), "pt") as f:
            if int((f.metadata() or {}).get("step", -1)) != best[0]:
                return None
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(f.get_tensor(name).to(param.device, param.dtype))
        return best[0]

    def record(self) -> dict:
        """What the manifest says about validations, the best step and early stopping."""
        best = self.best
        return {"validations": len(self.history), **({"best_step": best[0], "best_eval_loss": round(best[1], 6)} if best else {}),
                **({"stopped_by": "early_stopping"} if self.stopped else {})}


def _save_weights(path: Path, params: dict[str, torch.nn.Parameter], step: int) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({name: p.detach().to("cpu").contiguous().clone() for name, p in params.items()}, str(tmp),
              metadata={"step": str(step)})
    os.replace(tmp, path)
