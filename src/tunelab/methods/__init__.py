"""Tuning methods behind one registry, each declared here and implemented in its own module.

A declaration names the method, the module that implements it, its options class and its default learning
rate: all that loading a config reads (``tunelab.resolve``), so loading one imports neither torch nor peft.
The implementation module is imported on the first ``get_method(name)``, when a run, the planner or a
command needs the method itself.

Adding a method:

1. its options class (pydantic, ``extra="forbid"``) in ``tunelab.methods.options``;
2. one ``declare_method`` line below;
3. its module here, a class with ``name`` and the verbs of :class:`tunelab.methods.base.TuningMethod`, decorated
   with ``@register_method`` (which gives it the declared options class and rate);
4. its tests (``tests/methods/test_contract.py`` runs every declared method through the contract).
"""

from tunelab.methods.base import (
    METHODS,
    TuningMethod,
    artifact_method,
    count_parameters,
    declare_method,
    get_method,
    method_names,
    register_method,
    trainable_parameters,
)
from tunelab.methods.options import (
    AdapterOptions,
    FreezeOptions,
    FullOptions,
    IA3Options,
    LoraOptions,
    PrefixOptions,
    PromptOptions,
    QLoraOptions,
)

declare_method("adapter", "tunelab.methods.adapter", AdapterOptions, default_lr=1e-3)
declare_method("freeze", "tunelab.methods.freeze", FreezeOptions, default_lr=1e-4)
declare_method("full", "tunelab.methods.full", FullOptions, default_lr=5e-5)
declare_method("ia3", "tunelab.methods.ia3", IA3Options, default_lr=1e-2)
declare_method("lora", "tunelab.methods.lora", LoraOptions, default_lr=2e-4)
declare_method("prefix", "tunelab.methods.prompt_tuning", PrefixOptions, default_lr=1e-2)
declare_method("prompt", "tunelab.methods.prompt_tuning", PromptOptions, default_lr=3e-2)
declare_method("qlora", "tunelab.methods.qlora", QLoraOptions, default_lr=2e-4)

__all__ = [
    "METHODS",
    "TuningMethod",
    "artifact_method",
    "count_parameters",
    "declare_method",
    "get_method",
    "method_names",
    "register_method",
    "trainable_parameters",
]
