"""The models a server answers for: a base model and the adapters loaded on it, by the name clients send.

Adapters that peft can hold side by side (LoRA-family and IA3 adapters of one base, loaded without
quantization) share one base in memory: the first becomes a ``PeftModel`` and the next ones are added to it
with ``load_adapter``; the request's adapter is made active before its batch is decoded. Everything else a
run can produce (a full fine-tune, freeze tuning, Houlsby adapters, prompt or prefix tuning, QLoRA's
quantized base) is loaded as evaluation loads it (:func:`tunelab.evaluation.run.load_for_eval`) and
served as its own model. Each adapter keeps the tokenizer saved with its run, so it answers with the chat
template it was trained with, as ``tunelab eval`` does.

Every change of the loaded set and every decode happens under :attr:`Registry.lock`, so a batch never
sees an adapter half loaded or its active adapter switched under it. A queued request holds its model
(:meth:`Registry.retain`): unloading takes the name away at once (new requests get 404) but removes the
weights only once the requests already admitted for it have been answered, so a batch that mixes
adapters never loses one under another adapter's rows.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import TunelabError

# peft types that peft keeps several of on one PeftModel (one tuner per type); prompt learning is excluded:
# generation decodes those one prompt at a time and their virtual tokens do not mix with other adapters.
_SHAREABLE_PEFT_TYPES = {"LORA", "IA3", "ADALORA", "LOHA", "LOKR"}


@dataclass
class Backbone:
    """One base model in memory and the peft adapters attached to it (``peft`` is None until the first)."""

    base_path: str
    base: Any
    peft: Any = None
    peft_type: str | None = None
    adapters: set[str] = field(default_factory=set)


@dataclass
class ServedModel:
    """A name clients can send as ``model``: the base, an adapter on a shared base, or a model of its own.

    Attributes:
        id: The name in requests and in ``/v1/models``.
        root: What it was loaded from (model path, run directory or adapter directory).
        parent: The base's id for an adapter, None for a base or a standalone model.
        tokenizer: The tokenizer (with the chat template) it answers with.
        context: Maximum tokens of prompt plus completion (the model's position limit).
        backbone: The shared base, for the base itself and adapters on it.
        adapter: The peft adapter name on ``backbone``, None for the base.
        model: A standalone model (its own weights), when ``backbone`` is None.
    """

    id: str
    root: str
    parent: str | None
    tokenizer: Any
    context: int
    backbone: Backbone | None = None
    adapter: str | None = None
    model: Any = None
    created: int = field(default_factory=lambda: int(time.time()))

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """The module to decode with, with this entry's adapter active (call under ``Registry.lock``)."""
        if self.backbone is None:
            yield self.model
        elif self.adapter is not None:
            if self.adapter not in self.backbone.adapters:
                raise TunelabError(f"adapter {self.id!r} was unloaded while this request waited; load it again")
            self.backbone.peft.set_adapter(self.adapter)
            yield self.backbone.peft
        elif self.backbone.peft is None:
            yield self.backbone.base
        else:
            with self.backbone.peft.disable_adapter():
                yield self.backbone.peft


def _normal(path: str) -> str:
    """A local model path as ``resolve_model_path`` writes it (absolute), so the same base compares equal."""
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def same_base(a: str, b: str) -> bool:
    """Whether two model paths (or hub ids) name the same base."""
    return _normal(a) == _normal(b)


def context_length(model) -> int:
    """The model's position limit (``max_position_embeddings``), 2048 when its config names none."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 2048)


class Registry:
    """The loaded models by id; loads and unloads adapters while serving.

    Args:
        base: What ``tunelab serve`` was given: a model (alias, HF dir, .gguf, hub id) or a run directory.
        base_id: The base's name in requests; default the model spec, or the run's base model name.
    """

    def __init__(self, base: str, base_id: str | None = None):
        from tunelab.runs import open_run

        self.lock = threading.RLock()
        self.models: dict[str, ServedModel] = {}
        self._uses: dict[str, int] = {}  # requests admitted and not answered, per model id
        self._draining: set[str] = set()  # names being unloaded (waiting for their requests)
        self._idle = threading.Condition()  # guards the two above; notified when a request is answered
        self.backbones: list[Backbone] = []
        run = open_run(base)
        spec = run.base_model if run is not None else base
        default_id = (run.record.model or {}).get("name") if run is not None else None
        self.base_id = base_id or default_id or str(base)
        self._add_base(spec)
        if run is not None:
            self.load(Path(base).name, base)

    def _add_base(self, spec: str) -> None:
        from tunelab.data import prepare_tokenizer
        from tunelab.models.load import load_model, load_tokenizer, resolve_model_path

        path = resolve_model_path(spec)
        tokenizer = load_tokenizer(path)
        prepare_tokenizer(tokenizer, "auto")  # as evaluation prepares a bare base model
        backbone = Backbone(path, load_model(path).eval())
        self.backbones.append(backbone)
        self.models[self.base_id] = ServedModel(self.base_id, spec, None, tokenizer, context_length(backbone.base), backbone)

    def get(self, model_id: str) -> ServedModel | None:
        return self.models.get(model_id)

    def load(self, name: str, path: str | Path) -> ServedModel:
        """Load the adapter (or run result) at ``path`` under ``name``.

        Args:
            name: The id clients will send; must not be taken.
            path: A run directory, or an adapter directory of the base (``adapter/`` of a run).

        Raises:
            TunelabError: the name is taken, the path is no run or adapter, or loading fails.
        """
        if not name or any(c.isspace() for c in name):
            raise TunelabError(f"adapter name {name!r}: use a non-empty name without spaces")
        with self.lock:
            if name in self.models:
                raise TunelabError(f"adapter name {name!r} is already loaded; unload it first or choose another name")
            if name in self._draining:
                raise TunelabError(f"adapter name {name!r} is being unloaded (its last requests are decoding); "
                                   "load it again once the unload has returned, or choose another name")
            try:
                served = self._load(name, Path(path))
            except TunelabError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken adapter must not take the server down
                raise TunelabError(f"adapter {name!r} from {path}: could not be loaded ({type(exc).__name__}: {exc})") from exc
            self.models[name] = served
            return served

    def _load(self, name: str, path: Path) -> ServedModel:
        from tunelab.evaluation.run import load_for_eval
        from tunelab.methods import artifact_method
        from tunelab.runs import open_run

        run = open_run(path)
        artifact = run.artifact_dir if run is not None else path
        base_path = _normal(run.base_model) if run is not None else self.models[self.base_id].backbone.base_path
        if run is not None and not artifact.is_dir():
            raise TunelabError(f"{path}: the run has no {artifact.name}/ yet (unfinished?); serve it once it has finished")
        method = artifact_method(artifact) if artifact.is_dir() else None
        if method is None and (run is None or artifact.name != "model"):
            raise TunelabError(f"{path}: neither a run directory nor a tuning artifact (no adapter_config.json); "
                               "give a run directory or its adapter/ folder")
        shared = self._shareable(artifact, base_path, run)
        if shared is not None:
            return self._attach(name, str(path), artifact, shared)
        loaded = load_for_eval(str(path)) if run is not None else load_for_eval(base_path, str(artifact))
        model = loaded.model.eval()
        served_base = self.models[self.base_id].backbone.base_path
        parent = None if artifact.name == "model" else self.base_id if same_base(base_path, served_base) else base_path
        return ServedModel(name, str(path), parent, loaded.tokenizer, context_length(model), model=model)

    def _shareable(self, artifact: Path, base_path: str, run) -> Backbone | None:
        """The loaded backbone this artifact can join, None when it must be loaded on its own."""
        import json

        config_file = artifact / "adapter_config.json"
        if not config_file.is_file():
            return None
        peft_type = str(json.loads(config_file.read_text()).get("peft_type", "LORA")).upper()
        if peft_type not in _SHAREABLE_PEFT_TYPES:
            return None
        if run is not None and (run.record.parent or {}).get("mode") == "merge":
            return None  # it trained on its parent merged into the base: not this base (loaded on its own)
        if run is not None:  # QLoRA's quantized base is a different base in memory
            from tunelab.methods import get_method

            method = get_method(run.method_name)
            if method.base_load_kwargs(method.options_class(**run.method_options())):
                return None
        tokenizer = self._tokenizer_for(artifact, base_path)
        for backbone in self.backbones:
            rows = backbone.base.get_input_embeddings().weight.shape[0]
            fits = len(tokenizer) <= rows and (rows == len(tokenizer) or not backbone.adapters)
            if backbone.base_path == base_path and backbone.peft_type in (None, peft_type) and fits:
                backbone.peft_type = peft_type
                return backbone
        return None

    def _tokenizer_for(self, artifact: Path, base_path: str):
        from tunelab.models.load import load_tokenizer

        has_tokenizer = (artifact / "tokenizer_config.json").is_file()
        return load_tokenizer(str(artifact) if has_tokenizer else base_path)

    def _attach(self, name: str, root: str, artifact: Path, backbone: Backbone) -> ServedModel:
        """Add a peft adapter to the shared base: the first wraps it in a PeftModel, the next join it."""
        from tunelab.methods.common import without_bitsandbytes

        tokenizer = self._tokenizer_for(artifact, backbone.base_path)
        if len(tokenizer) > backbone.base.get_input_embeddings().weight.shape[0]:
            backbone.base.resize_token_embeddings(len(tokenizer))  # as evaluation does for added template tokens
        with without_bitsandbytes(backbone.base):
            from peft import PeftModel

            if backbone.peft is None:
                backbone.peft = PeftModel.from_pretrained(backbone.base, artifact, adapter_name=name).eval()
            else:
                backbone.peft.load_adapter(artifact, adapter_name=name)
        backbone.adapters.add(name)
        return ServedModel(name, root, self.base_id, tokenizer, context_length(backbone.base), backbone, name)

    def retain(self, served: ServedModel) -> bool:
        """Count one more request for ``served`` (until :meth:`release`); False if it is no longer served (an
        entry of that name loaded since from elsewhere is not the same)."""
        with self._idle:
            now = self.models.get(served.id)
            if now is None or not (now is served or (now.backbone is served.backbone and now.adapter == served.adapter
                                                     and now.model is served.model)):
                return False
            self._uses[served.id] = self._uses.get(served.id, 0) + 1
            return True

    def release(self, served: ServedModel) -> None:
        """One request for ``served`` was answered (or failed, or was cancelled)."""
        with self._idle:
            left = self._uses.get(served.id, 0) - 1
            if left > 0:
                self._uses[served.id] = left
            else:
                self._uses.pop(served.id, None)
            self._idle.notify_all()

    def unload(self, name: str, wait: float | None = 600) -> None:
        """Remove the adapter ``name``; the base cannot be unloaded.

        The name stops being served at once; its weights go once the requests already admitted for it are
        answered (at most ``wait`` seconds: after that they are removed anyway, and the scheduler ends those
        requests with an error, never another adapter's).

        Raises:
            TunelabError: ``name`` is not loaded, or it is the base.
        """
        with self.lock:
            served = self.models.get(name)
            if served is None:
                raise TunelabError(f"adapter {name!r} is not loaded; GET /v1/models lists what is")
            if name == self.base_id:
                raise TunelabError(f"{name!r} is the base model; only adapters can be unloaded")
            with self._idle:
                del self.models[name]
                self._draining.add(name)
        try:
            with self._idle:
                self._idle.wait_for(lambda: not self._uses.get(name), timeout=wait)
            with self.lock:
                self._remove_weights(name, served)
        finally:
            with self._idle:
                self._draining.discard(name)

    def _remove_weights(self, name: str, served: ServedModel) -> None:
        backbone = served.backbone
        if backbone is not None and served.adapter is not None:
            backbone.adapters.discard(name)
            if backbone.adapters:
                backbone.peft.set_adapter(next(iter(backbone.adapters)))  # peft warns when the active one goes
                backbone.peft.delete_adapter(name)
            else:  # peft keeps no PeftModel without an adapter: take its layers out of the base again
                backbone.base = backbone.peft.unload()
                backbone.peft, backbone.peft_type = None, None

    def adapter_count(self) -> int:
        return sum(1 for m in self.models.values() if m.id != self.base_id)

    def entries(self) -> list[ServedModel]:
        with self.lock:
            return list(self.models.values())
