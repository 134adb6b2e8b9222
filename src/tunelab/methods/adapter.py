"""Houlsby bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751) as a tuning method.

Update rule: after the attention sublayer and after the MLP sublayer of every decoder block the hidden
state h (d wide) becomes h + up(act(down(h))), with down: d -> m and up: m -> d (m = ``bottleneck``,
both with biases). Only these small layers are trained; the base model is frozen. ``up`` starts at
zero, so at step 0 the adapted model computes exactly what the base model computes.

Placement: the adapter sits on the output of each sublayer's last linear layer (``o_proj`` and
``down_proj`` in llama/qwen2/mistral-like models), which is "after the sublayer, before the residual
add" as in the paper. It is attached as a child module ``adapter`` of that linear layer plus a forward
hook that adds the adapter's output, rather than by replacing the layer with a wrapper: the base
weights keep their names (``...o_proj.weight``), so anything that finds base weights by name (tied
weights, checkpoints of the base, ``resize_token_embeddings``) is unaffected, and the forward pass goes
through the same modules under ``generate``, the KV cache and (non-reentrant) gradient checkpointing.

The artifact is a directory with ``adapter_model.safetensors`` (only the adapter tensors, named after
the model's own modules, e.g. ``model.layers.0.mlp.down_proj.adapter.down.weight``) and
``tunelab_adapter.json`` (method, options, base model). Adapters cannot be merged into the base
weights because of the nonlinearity between ``down`` and ``up``.

Why hand-written: peft has no Houlsby (sequential bottleneck) adapter; the ``adapters`` library has
one but brings its own model classes and artifact format, for a few dozen lines of modelling code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import register_method
from tunelab.methods.common import MethodDefaults
from tunelab.methods.footprint import Footprint, ShapeLike, block_linears
from tunelab.methods.options import AdapterOptions

CONFIG_FILE = "tunelab_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_ATTR = "adapter"  # child-module name of the adapter inside the linear layer it follows

# Auto targets: the last linear layer of the attention and of the MLP sublayer, by architecture
# family. The group matching the most layers inside numbered decoder blocks wins (ties: first listed).
_AUTO_TARGET_GROUPS: tuple[tuple[str, ...], ...] = (
    ("o_proj", "down_proj"),  # llama, qwen2, mistral, gemma, phi3, olmo, ...
    ("dense", "dense_4h_to_h"),  # gpt-neox, pythia, falcon
    ("dense", "fc2"),  # phi
    ("out_proj", "fc2"),  # opt
    ("c_proj",),  # gpt2, starcoder (attn.c_proj and mlp.c_proj; Conv1D layers)
)

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """x -> up(act(down(x))) with down: d -> m, up: m -> d; the residual add is done by the hook.

    Its parameters are kept in ``dtype`` (that of the layer it follows); inputs are cast to it and the
    output back to the input's dtype, so a float32 adapter also works after a bf16/quantised layer.
    """

    def __init__(self, width: int, bottleneck: int, nonlinearity: str, init_scale: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.down = nn.Linear(width, bottleneck, bias=True, device=device, dtype=dtype)  # weight (m, d)
        self.act = _ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, width, bias=True, device=device, dtype=dtype)  # weight (d, m)
        self.enabled = True
        with torch.no_grad():
            nn.init.normal_(self.down.weight, mean=0.0, std=init_scale)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)  # zero: the adapted model starts as the base model
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d) -> (..., m) -> (..., d)
        dtype = self.down.weight.dtype
        return self.up(self.act(self.down(x.to(dtype)))).to(x.dtype)


def _after_layer_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on an adapted linear layer: y -> y + adapter(y) (None keeps y when bypassed)."""
    adapter = module._modules.get(ADAPTER_ATTR)
    if not isinstance(adapter, BottleneckAdapter) or not adapter.enabled:
        return None
    return output + adapter(output)  # (..., d)


def _linear_out_features(module: nn.Module) -> int | None:
    """Output width of a linear-like layer (nn.Linear or HF's Conv1D), None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.nf
    return None


def _in_numbered_block(name: str) -> bool:
    """True for modules inside a ModuleList of blocks (``model.layers.3.mlp.down_proj``)."""
    return any(part.isdigit() for part in name.split("."))


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and _linear_out_features(m) is not None}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _linear_names_hint(model: nn.Module) -> str:
    names = sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(model) if _in_numbered_block(name)})
    return ", ".join(names) if names else "(none found)"


def resolve_targets(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """Names of the linear layers that get an adapter, in model order.

    Raises:
        TunelabError: a listed name matches nothing or a non-linear module, or auto finds nothing.
    """
    linears = _linear_layers(model)
    if target_modules is None:
        best: list[str] = []
        for group in _AUTO_TARGET_GROUPS:
            found = [n for n in linears if _in_numbered_block(n) and n.rsplit(".", 1)[-1] in group]
            if len(found) > len(best):
                best = found
        if not best:
            raise TunelabError(
                f"method.target_modules: could not find the attention/MLP output layers of this "
                f"{type(model).__name__} automatically (looked for {', '.join(sorted({n for g in _AUTO_TARGET_GROUPS for n in g}))}). "
                f"Set method.target_modules to the last linear layer of each sublayer; linear layers in its blocks: "
                f"{_linear_names_hint(model)}"
            )
        return best
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for target in target_modules:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            raise TunelabError(
                f"method.target_modules: {target!r} matches no module of this {type(model).__name__}; "
                f"linear layers in its blocks: {_linear_names_hint(model)}"
            )
        not_linear = [n for n in hits if n not in linears]
        if not_linear:
            raise TunelabError(
                f"method.target_modules: {target!r} matches {not_linear[0]!r}, a {type(modules[not_linear[0]]).__name__}, "
                f"not a linear layer; adapters follow linear layers such as: {_linear_names_hint(model)}"
            )
        chosen.extend(n for n in hits if n not in chosen)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def adapter_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """Every Houlsby adapter in ``model``, by module name (``...o_proj.adapter``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, named as in ``model.state_dict()``."""
    return {f"{name}.{pname}": p for name, module in adapter_modules(model).items() for pname, p in module.named_parameters()}


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` is a Houlsby adapter artifact (holds ``tunelab_adapter.json``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def adapter_parameter_count(width: int, bottleneck: int) -> int:
    """Parameters of one adapter: down (m*d + m) plus up (d*m + d)."""
    return 2 * width * bottleneck + bottleneck + width


@register_method
class HoulsbyAdapter(MethodDefaults):
    """Sequential bottleneck adapters after every attention and MLP sublayer; the base stays frozen.

    ``base_load_kwargs`` comes from :class:`MethodDefaults` (no special base loading).
    """

    name = "adapter"
    artifact = "adapter"
    mergeable = False
    detachable = True
    incompatible: frozenset[str] = frozenset()

    def apply(self, model: nn.Module, options: AdapterOptions | dict) -> nn.Module:
        """Freeze ``model``, put an adapter after each target layer (in place) and return ``model``."""
        if not isinstance(options, AdapterOptions):
            options = AdapterOptions.model_validate(options)
        if adapter_modules(model):
            raise TunelabError("method adapter: this model already has Houlsby adapters; load a fresh base model to apply them again")
        targets = resolve_targets(model, options.target_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in targets:
            layer = model.get_submodule(name)
            weight = layer.weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            adapter = BottleneckAdapter(_linear_out_features(layer), options.bottleneck, options.nonlinearity,
                                        options.init_scale, device=weight.device, dtype=dtype)
            layer.add_module(ADAPTER_ATTR, adapter)
            layer.register_forward_hook(_after_layer_hook)
        model.tunelab_adapter_options = options  # what save() writes
        return model

    def footprint(self, options: AdapterOptions, shape: ShapeLike) -> Footprint:
        """One adapter (2*d*m + m + d, in the weight dtype) per block after each target linear."""
        lin, bottleneck = shape.linears(), options.bottleneck
        adapters = {t: bottleneck for t in block_linears(options.target_modules or ["o_proj", "down_proj"], shape)}
        extra = shape.layers * sum(adapter_parameter_count(lin[t][1], bottleneck) for t in adapters)
        return Footprint(frozen_base=True, adapters=adapters, extra=extra, extra_in_weight_dtype=True)

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write ``adapter_model.safetensors`` and ``tunelab_adapter.json`` to ``directory``."""
        from safetensors.torch import save_file

        options = getattr(model, "tunelab_adapter_options", None)
        tensors = adapter_state_dict(model)
        if options is None or not tensors:
            raise TunelabError("method adapter: this model has no Houlsby adapters to save; apply the method first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        config = getattr(model, "config", None)
        saved_config = {
            "method": self.name,
            "options": options.model_dump(mode="json"),
            "base_model": getattr(config, "_name_or_path", None) or None,
            "adapted_modules": sorted({name.rsplit(".", 1)[0] for name in adapter_modules(model)}),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(saved_config, indent=2) + "\n", encoding="utf-8")

    def load(self, base_model: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        """Apply the saved options to ``base_model`` and load the saved adapter weights (strictly)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file():
            raise TunelabError(f"{directory}: no {CONFIG_FILE} there; point at the adapter/ folder of a run trained with method.name=adapter")
        try:
            saved_config = json.loads(config_path.read_text(encoding="utf-8"))
            if saved_config.get("method") != self.name:
                raise TunelabError(f"{config_path}: method is {saved_config.get('method')!r}, expected {self.name!r}")
            options = AdapterOptions.model_validate(saved_config.get("options", {}))
        except (json.JSONDecodeError, AttributeError) as exc:
            raise TunelabError(f"{config_path}: not a valid adapter config ({exc}); re-save the adapter") from None
        except ValidationError as exc:
            raise TunelabError(f"{config_path}: invalid adapter options: {exc}") from None
        if not weights_path.is_file():
            raise TunelabError(f"{directory}: {WEIGHTS_FILE} is missing; the adapter was not saved completely, save it again")
        try:
            saved = load_file(str(weights_path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise TunelabError(f"{weights_path}: cannot be read ({exc}); save the adapter again") from None

        model = self.apply(base_model, options)
        expected = adapter_state_dict(model)
        base_hint = f"; it was trained on {saved_config.get('base_model')!r}" if saved_config.get("base_model") else ""
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise TunelabError(
                f"{weights_path}: does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected tensors, "
                f"e.g. {(missing or unexpected)[0]!r}); load it on the base model it was trained on{base_hint}"
            )
        for key, param in expected.items():
            if tuple(saved[key].shape) != tuple(param.shape):
                raise TunelabError(
                    f"{weights_path}: {key} has shape {tuple(saved[key].shape)}, the model expects {tuple(param.shape)}; "
                    f"load it on the base model it was trained on{base_hint}"
                )
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(saved[key])
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise TunelabError(
            "method adapter: Houlsby adapters cannot be merged into the base weights (the nonlinearity between "
            "down- and up-projection is not a linear map); keep the adapter/ folder and load it on the base model, "
            "or train with method.name=lora if you need a merged model"
        )

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        """Bypass every adapter inside the block (the model computes the base model); restored on exit."""
        adapters = list(adapter_modules(model).values())
        previous = [a.enabled for a in adapters]
        for a in adapters:
            a.enabled = False
        try:
            yield model
        finally:
            for a, was in zip(adapters, previous):
                a.enabled = was
