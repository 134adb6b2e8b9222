"""Evaluate a model (base, base + adapter, or a run directory) on a dataset with one metric.

The model answers each example's conversation (every message before the final assistant turn),
rendered with the same chat template as training (a conversation with tools or tool calls through
:func:`tunelab.data.tool_render.render_chat`, as training renders it); the final assistant message is the reference.
``loss`` is special: it scores the reference answers by per-token loss and perplexity instead of
generating.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.atomic import write_text_atomic
from tunelab.data import Example, prepare_tokenizer, tokenize_examples
from tunelab.data.images import has_images
from tunelab.data.reasoning import split_reasoning
from tunelab.data.tool_render import format_call, render_chat, uses_tools
from tunelab.errors import TunelabError
from tunelab.methods import artifact_method, get_method
from tunelab.models.load import load_model, load_tokenizer, resolve_model_path
from tunelab.runs import open_run


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    description: str


def load_for_eval(model: str, adapter: str | None = None) -> LoadedModel:
    """Load a base model, a base plus a tuning artifact, or the result of a run directory.

    Args:
        model: Embedded alias, HF dir, .gguf, hub id, or a tunelab run directory (holds manifest.json).
        adapter: An artifact to apply on top of ``model``: a PEFT adapter directory (LoRA, QLoRA, IA3,
            prefix, prompt) or a tunelab adapter / freeze-tuning directory.
    """
    run = open_run(model)
    if run is not None:
        artifact = run.artifact_dir
        if not artifact.is_dir():
            raise TunelabError(f"{model}: the run has no {artifact.name}/ yet (unfinished?); finish it with `tunelab train ... --resume`")
        if artifact.name == "model":
            return LoadedModel(load_model(str(artifact)), load_tokenizer(str(artifact)), f"run {model}")
        method = get_method(run.method_name)
        options = method.options_class(**run.method_options())
        return _with_artifact(run.base_model, artifact, method, options, f"run {model}", start=_merged_parent(run))
    path = resolve_model_path(model)
    if adapter is None:
        tokenizer = load_tokenizer(path)
        prepare_tokenizer(tokenizer, "auto")
        return LoadedModel(load_model(path), tokenizer, model)
    method = artifact_method(Path(adapter))
    if method is None:
        raise TunelabError(f"--adapter {adapter}: not a tuning artifact (no adapter_config.json, tunelab_adapter.json or "
                           "tunelab_freeze.json); point it at a run's adapter/ or weights/ folder")
    return _with_artifact(path, Path(adapter), method, None, f"{model} + {adapter}")


def _merged_parent(run) -> Any:
    """The model a run with ``init_from_merge`` trained on: its parent's result (itself loaded this way, so a
    chain of merges is followed) folded into the base; None for a run that started at the base or continued
    its parent's artifact (that artifact is then the run's own)."""
    parent = run.record.parent or {}
    if parent.get("mode") != "merge":
        return None
    return get_method(parent["method"]).merge(load_for_eval(parent["run_dir"]).model)


def _with_artifact(base_path: str, artifact: Path, method, options, description: str, start: Any = None) -> LoadedModel:
    """The base model loaded as the method needs (QLoRA: quantized), or the ``start`` a run trained on, with the
    artifact applied."""
    extra = method.base_load_kwargs(options) if options is not None else {}
    base = start if start is not None else load_model(base_path, **extra)
    has_tokenizer = (artifact / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(artifact) if has_tokenizer else base_path)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))  # the chat-template fallback added tokens in training
    return LoadedModel(method.load(base, artifact), tokenizer, description)


def split_example(example: Example, *, tool_reference: bool = False) -> tuple[list[dict], str]:
    """(conversation to answer, reference answer): the final assistant message is the reference.

    Args:
        example: The eval record.
        tool_reference: Give the reference of the ``tool_call`` metric (the expected calls and the record's
            tools, :func:`tunelab.evaluation.tool_metrics.tool_reference`) instead of the answer's text. The text
            of an answer with calls is its content, then its calls in the fallback format.
    """
    messages = list(example.messages)
    last = messages[-1]
    if tool_reference:
        from tunelab.evaluation.tool_metrics import tool_reference as reference_of

        return messages[:-1], reference_of(last, example.tools)
    if last.get("tool_calls"):
        content = (last.get("content") or "").strip()
        return messages[:-1], "\n".join([*([content] if content else []), *map(format_call, last["tool_calls"])])
    return messages[:-1], split_reasoning(last["content"])[1]  # the answer after any inline reasoning


def eval_prompt(tokenizer, example: Example, conversation: list[dict]) -> list[dict] | str:
    """What the model is asked: the conversation, or, when it has tools or tool calls, its text rendered as
    training renders it (:func:`tunelab.data.tool_render.render_chat`: the template's own tool format or the fallback)."""
    if not uses_tools(conversation, example.tools):
        return conversation
    return render_chat(tokenizer, conversation, example.tools, add_generation_prompt=True)


def evaluate(loaded: LoadedModel, examples: list[Example], metric: str, *, max_new_tokens: int = 128,
             batch_size: int = 16, options: dict | None = None) -> dict[str, Any]:
    """Score ``loaded`` on ``examples``; returns the report (score plus every example's prediction)."""
    started = time.time()
    if metric in ("loss", "perplexity"):
        report = _loss_report(loaded, examples, batch_size)
    else:
        report = _generation_report(loaded, examples, metric, max_new_tokens, batch_size, options or {})
    report.update(model=loaded.description, n=len(examples), seconds=round(time.time() - started, 2))
    return report


def _generation_report(loaded, examples, metric, max_new_tokens, batch_size, options) -> dict[str, Any]:
    from tunelab.evaluation.generate import generate_answers
    from tunelab.evaluation.metrics import score, uses_tool_reference

    score(metric, [], [], **options)  # unknown metric or missing options fail now, before generating
    structured = uses_tool_reference(metric)
    pairs = [split_example(e, tool_reference=structured) for e in examples]
    conversations, references = zip(*pairs) if pairs else ((), ())
    prompts = [eval_prompt(loaded.tokenizer, e, c) for e, c in zip(examples, conversations)]
    if any(has_images(c) for c in conversations):  # a VLM's prompts need their pixel values: the processor renders them
        from tunelab.evaluation.vision import vision_answers

        outputs = vision_answers(loaded.model, conversations, max_new_tokens=max_new_tokens)
    else:
        outputs = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    thoughts, predictions = zip(*map(split_reasoning, outputs)) if outputs else ((), ())  # scored: the answer
    result = score(metric, list(predictions), list(references), **options)
    rows = [
        {"source": e.source, "prompt": c[-1]["content"] if c else "", "reference": r, "prediction": p, "score": s,
         **({"reasoning": t} if t is not None else {}), **({"details": d} if d else {})}
        for e, c, r, p, t, s, d in zip(examples, conversations, references, predictions, thoughts, result.per_example,
                                       result.details or [{}] * len(examples))
    ]
    return {"metric": metric, "score": result.score, "options": {k: str(v) for k, v in options.items()}, "examples": rows}


def _loss_report(loaded, examples, batch_size) -> dict[str, Any]:
    import torch

    from tunelab.training.loss import validation_loss

    tokenized, _ = tokenize_examples(examples, loaded.tokenizer, loss_on="last_turn", max_length=4096, too_long="truncate")
    device = next(loaded.model.parameters()).device
    metrics = validation_loss(loaded.model, tokenized, batch_size=batch_size, pad_id=loaded.tokenizer.pad_token_id,
                              device=device, autocast=lambda: torch.autocast(device.type, enabled=False))
    return {"metric": "loss", "score": metrics["eval_loss"], "perplexity": metrics["eval_ppl"], "examples": []}


def write_report(report: dict[str, Any], out: str | Path) -> None:
    write_text_atomic(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
