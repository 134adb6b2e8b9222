"""``data.replay: {path: self}``: general prompts answered by the model about to be tuned, as its replay data.

Mixing the untuned model's own answers to general instructions into every epoch (sequence-level
self-distillation) pulls the tuned model back to its behaviour outside the task: without it a task whose
answers are one word or one JSON object teaches the model to answer everything that way (bench/NOTES.md).
The embedded SmolLM2's answers ship as ``general``; ``self`` makes them for whatever model the config names,
once: greedy answers to ``examples/general/prompts.jsonl`` (none of them a probe item), answers cut off at the
token limit left out, cached under the tunelab cache by the model's files and the prompts. Generation is
``tunelab data generate``'s (``tunelab.datagen``); this stage only decides when and where.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tunelab.config.schema import GENERAL_PROMPTS, SELF_REPLAY, RunConfig, updated
from tunelab.errors import TunelabError

MAX_NEW_TOKENS = 96  # as the shipped SmolLM2 set was made


def resolve_self_replay(config: RunConfig, console: Console) -> RunConfig:
    """``config`` with ``data.replay.path: self`` pointed at the model's own answers (generated the first time);
    ``config`` itself when it replays no ``self``."""
    replay = config.data.replay
    if replay is None or replay.path != SELF_REPLAY:
        return config
    from tunelab.models.embedded import cache_root
    from tunelab.models.load import resolve_model_path

    model_path = resolve_model_path(config.model.path)
    path = cache_root() / "replay" / f"{_model_key(model_path)}.jsonl"
    if not path.exists():
        _generate(config.model.path, path, console)
    return updated(config, data=updated(config.data, replay=updated(replay, path=str(path))))


def _model_key(model_path: str) -> str:
    """The model's files (names, sizes, modification times) and the prompts: a changed model answers again."""
    digest = hashlib.sha256(Path(GENERAL_PROMPTS).read_bytes())
    directory = Path(model_path)
    for file in sorted(directory.iterdir()) if directory.is_dir() else [directory]:
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{directory.name}-{digest.hexdigest()[:16]}"


def _generate(model: str, path: Path, console: Console) -> None:
    from tunelab.datagen.generate import generate_sft, load_teacher, write_jsonl
    from tunelab.datagen.prompts import read_prompts
    from tunelab.generation import SamplingSettings

    prompts = read_prompts(str(GENERAL_PROMPTS))
    console.print(f"data.replay self: {escape(str(model))} answers {len(prompts)} general prompts (once; cached in {escape(str(path))}) ...")
    teacher = load_teacher(model)
    records, summary = generate_sft(teacher, prompts, SamplingSettings(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    if not records:
        raise TunelabError(f"data.replay self: {model} gave no complete answer to the {len(prompts)} general prompts; "
                           "give data.replay a file of general examples instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, records)
    console.print(f"data.replay self: {summary.n_written} answers kept ({len(summary.truncated)} cut off at "
                  f"{MAX_NEW_TOKENS} tokens left out) in {summary.seconds:.0f} s")


def replay_kl_loss(config: RunConfig, base, unwrap: Callable, console: Console) -> dict | None:
    """``data.replay.kl`` above 0: the replayed examples' loss as ``{"replay": token_loss}`` for
    ``run_token_loss``, ``kl`` × forward KL from the untuned model plus ``1 − kl`` × cross-entropy, at the
    replayed answers' positions. The untuned model is the tuned one with its method switched off where that
    computes the start model (LoRA, IA3, adapters: no second copy), else a frozen copy of ``base``; call before
    the method wraps ``base``. ``unwrap`` takes the training wrapper (DDP, FSDP) off the model."""
    replay = config.data.replay
    if replay is None or not replay.kl:
        return None
    from tunelab.methods import get_method
    from tunelab.stages.model import start_is_method_off
    from tunelab.training.distill import distill_loss_sum
    from tunelab.training.loss import PLAIN_HEAD_MODEL_TYPES, plain_causal_lm

    if plain_causal_lm(base) is None:  # refused before the first step, not at the first replayed batch
        raise TunelabError(f"data.replay.kl needs logits that are lm_head(final hidden state); model type "
                           f"{getattr(base.config, 'model_type', '?')} is not one of {', '.join(sorted(PLAIN_HEAD_MODEL_TYPES))}. "
                           "Set data.replay.kl=0 (the replay then trains on the answers alone)")

    share = f"data.replay.kl = {replay.kl:g}: the replayed answers also follow the untuned model's distributions"
    if start_is_method_off(config):
        method = get_method(config.method.name)
        console.print(f"{share} (the tuned model with {method.name} switched off: no copy)")

        def live(model, batch):
            inner = unwrap(model)
            return distill_loss_sum(model, inner, batch, kind="forward_kl", alpha=1.0 - replay.kl,
                                    teacher_context=lambda: _switched_off(method, inner))
        return {"replay": live}
    import copy

    untuned = copy.deepcopy(base).eval().requires_grad_(False)
    size = sum(p.numel() * p.element_size() for p in untuned.parameters()) / 2**20
    console.print(f"{share} (a frozen copy, {size:,.0f} MiB)")

    def copied(model, batch):
        return distill_loss_sum(model, untuned, batch, kind="forward_kl", alpha=1.0 - replay.kl)
    return {"replay": copied}


@contextmanager
def _switched_off(method, model) -> Iterator[None]:
    """``model`` computing what the untuned model did: the method disabled, dropout off (as the copy's eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with method.disabled(model):
            yield
    finally:
        model.train(was_training)
