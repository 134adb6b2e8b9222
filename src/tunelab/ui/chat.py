"""The dashboard's chat: the base model or any finished run under the roots answers a prompt, greedily.

What can be chosen comes from the run directories only (each finished run, and each base model a run names),
never from a path typed into the page. A run answers as ``tunelab eval`` loads it (its artifact on its base,
its chat template; ``evaluation.run.load_for_eval``), through the shared decoder (``generation``). Models are
loaded on first use in this process (this is the one page that imports torch) and the two most recent kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from tunelab.errors import TunelabError
from tunelab.ui import runs as R

KEEP = 2


class Chat:
    def __init__(self, roots: R.Roots):
        self.roots = roots
        self.loaded: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def choices(self) -> list[dict]:
        """``[{"id": "run:0/sql-lora" | "model:SPEC", "label": ...}]``: finished runs, then the base models they name."""
        runs, bases = [], {}
        for path in R.find_runs(self.roots):
            run = R.open_in(self.roots, path)
            if run is None or run.status != "finished":
                continue
            runs.append({"id": f"run:{self.roots.run_id(path)}", "label": f"run {self.roots.run_id(path)[2:]} ({run.method_name})"})
            spec = (run.record.model or {}).get("spec")
            if spec:
                bases.setdefault(spec, {"id": f"model:{spec}", "label": f"base {spec}"})
        return runs + list(bases.values())

    def tokenizer_models(self) -> list[str]:
        """The models whose tokenizer the data page may load: the embedded default, then the bases of the runs."""
        from tunelab.models.embedded import DEFAULT_MODEL

        bases = [c["id"].partition(":")[2] for c in self.choices() if c["id"].startswith("model:")]
        return [DEFAULT_MODEL, *[b for b in bases if b != DEFAULT_MODEL]]

    def _target(self, choice: str) -> str:
        if choice not in {c["id"] for c in self.choices()}:
            raise TunelabError(f"{choice!r} is not a finished run or a base model of one under the dashboard's folders")
        kind, _, name = choice.partition(":")
        return str(self.roots.resolve(name)) if kind == "run" else name

    def _model(self, choice: str):
        from tunelab.evaluation.run import load_for_eval

        if choice not in self.loaded:
            self.loaded[choice] = load_for_eval(self._target(choice))
            while len(self.loaded) > KEEP:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(choice)
        return self.loaded[choice]

    def answer(self, choice: str, prompt: str, max_new_tokens: int = 128, system: str = "") -> str:
        """The chosen model's greedy answer to ``prompt`` (one user turn, after ``system`` when one is given)."""
        from tunelab.generation import SamplingSettings, generate

        if not prompt.strip():
            raise TunelabError("the prompt is empty")
        with self.lock:
            loaded = self._model(choice)
            settings = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens)
            turns = ([{"role": "system", "content": system}] if system.strip() else []) + [{"role": "user", "content": prompt}]
            completion = generate(loaded.model, loaded.tokenizer, [turns], settings, batch_size=1)[0]
            return completion.text.strip()  # as tunelab eval records a prediction
