"""Apply the data-chosen defaults (``tunelab.training.defaults``) to a run's config once its examples are read.

The rule is a pure function of plain facts; this stage gathers the facts (examples, trained tokens, the model's
width, the method's rate), returns the run description with the chosen values (a new one: the resolved one is
frozen), so that ``config.yaml``, the config hash and a resume all see them, and prints why. A resumed run reads
the same data and chooses the same values.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from tunelab.config.schema import Replay, RunConfig, updated
from tunelab.data.token_cache import cached_tokenize
from tunelab.stages.replay import resolve_self_replay
from tunelab.stages.setup import Examples, read_examples, split_validation
from tunelab.training.defaults import KEYS, Choice, DataFacts, choose, describe
from tunelab.training.loss import PLAIN_HEAD_MODEL_TYPES


def unset_keys(config: RunConfig) -> frozenset[str]:
    """The keys of the rule the config leaves to it (none under ``train.defaults: fixed``)."""
    if config.train.defaults == "fixed":
        return frozenset()
    given = ({f"train.{k}" for k in config.train.given()} | {f"data.{k}" for k in config.data.model_fields_set}
             | {f"method.{k}" for k in config.method.model_fields_set - {"name"}})
    return frozenset(key for key in KEYS if key not in given)


def choose_defaults(config: RunConfig, examples: Examples, tokenizer, model_path: str,
                    console: Console) -> tuple[RunConfig, Examples, list[Choice]]:
    """Fill the unset keys from the data (printed).

    Returns:
        The run description with the chosen values (a new one: ``config`` is frozen and left as it was), the
        examples (with the validation slice held out when one was chosen) and the choices, for the manifest.
    """
    from tunelab.methods import get_method

    unset = unset_keys(config)
    if not unset:
        return config, examples, []
    method = get_method(config.method.name)
    replay = config.data.replay.path if config.data.replay else None
    task = [e for e in examples.train if replay is None or not e.source.startswith(f"{replay}:")]
    data = config.data
    _, stats, _ = cached_tokenize(task, tokenizer, loss_on=data.loss_on, max_length=data.max_length, too_long=data.too_long)
    t, replay = config.train, config.data.replay
    width, model_type = model_shape(model_path)
    facts = DataFacts(examples=len(task), trained_tokens=stats.trained_tokens, hidden_size=width,
                      method_lr=method.default_lr, has_rank="r" in method.options_class.model_fields,
                      batch_size=t.batch_size, grad_accum=t.grad_accum, epochs=t.epochs, max_steps=t.max_steps,
                      replay_ratio=replay.ratio if replay else None, replay_kl=replay.kl if replay else 0.0,
                      kl_supported=model_type in PLAIN_HEAD_MODEL_TYPES and not method.changes_inputs)
    choices = choose(facts, unset)
    config = with_choices(config, choices)
    if choices:
        console.print(f"Defaults from the data ({facts.examples} examples, {facts.trained_tokens:,} trained tokens, "
                      f"width {facts.hidden_size}; set a key to keep your own value, train.defaults=fixed for none):\n  "
                      + escape("\n  ".join(describe(choices))), soft_wrap=True, highlight=False)
    if any(c.key == "data.replay" for c in choices):
        config = resolve_self_replay(config, console)
        examples = read_examples(config)  # the task's examples again, with the replay's
    return config, split_validation(config, examples), choices


def with_choices(config: RunConfig, choices: list[Choice]) -> RunConfig:
    """``config`` with the chosen values, each validated by its section's class (the method's by its options class)."""
    changes: dict[str, dict] = {}
    for choice in choices:
        section, key = choice.key.split(".")
        changes.setdefault(section, {})[key] = Replay(**choice.value) if choice.key == "data.replay" else choice.value
    if not changes:
        return config
    return updated(config, **{section: updated(getattr(config, section), **values) for section, values in changes.items()})


def model_shape(model_path: str) -> tuple[int | None, str | None]:
    """The model's hidden size and type, read from its config (no weights loaded); None where it has none."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None, None
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if getattr(model_config, "vision_config", None) is not None:  # a VLM's head is not its text model's (no replay KL)
        return getattr(text, "hidden_size", None), model_config.model_type
    return getattr(text, "hidden_size", None), getattr(text, "model_type", None)
