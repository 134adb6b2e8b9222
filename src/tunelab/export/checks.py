"""Check an exported GGUF against the transformers model it was made from, in llama.cpp.

On held prompts (the run's eval conversations, else the general probe): the token ids llama.cpp makes of
each rendered prompt equal the HF tokenizer's; llama.cpp's rendering of the chat template stored in the
file gives the same ids as the training template, and the stored template is the training template itself;
generation stops where training taught it to (the file's eos is the tokenizer's, and every end-of-turn token
of the template is an end-of-generation token for llama.cpp: a GGUF that misses this never stops); greedy
completions agree token for token; and the perplexity of the reference answers (else of the HF model's own
answers) changes by a measured amount.
Which of these must hold for the export to be published depends on the quantization (``THRESHOLDS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# What a GGUF must reach to be published without --force. f16 rounds each weight to 11 bits of mantissa:
# greedy answers must match (a rare near-tie may flip, hence the small slack in agreement on many prompts)
# and perplexity move by well under 1 %; bf16 keeps 8 bits, so a little more moves. The other types are
# lossy by design: the limits catch a broken file (wrong layout, wrong tokenizer: agreement near 0,
# perplexity many times higher), not the expected loss, which the report measures.
THRESHOLDS: dict[str, dict[str, float]] = {
    "f16": {"min_agreement": 0.95, "max_ppl_increase": 0.01},
    "bf16": {"min_agreement": 0.8, "max_ppl_increase": 0.03},
    "q8_0": {"min_agreement": 0.6, "max_ppl_increase": 0.05},
    "q6_K": {"min_agreement": 0.5, "max_ppl_increase": 0.1},
    "q5_K_M": {"min_agreement": 0.4, "max_ppl_increase": 0.2},
    "q4_K_M": {"min_agreement": 0.2, "max_ppl_increase": 0.5},
    "q4_0": {"min_agreement": 0.2, "max_ppl_increase": 0.5},
}


@dataclass
class Held:
    """The prompts an export is checked on."""

    source: str
    conversations: list[list[dict]]
    references: list[str] = field(default_factory=list)  # reference answers, empty for the probe


def _nll_hf(model: Any, prompt: list[int], continuation: list[int]) -> list[float]:
    ids = torch.tensor([prompt + continuation])  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()  # (N, V)
    return (-torch.log_softmax(logits, dim=-1)[torch.arange(len(continuation)), torch.tensor(continuation)]).tolist()


def _ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / max(1, len(nll)))


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _template_parity(runtime: Any, tokenizer: Any, held: Held, hf_ids: list[list[int]]) -> dict[str, Any]:
    builtin, jinja = [], []
    for conversation, ids in zip(held.conversations, hf_ids):
        text = runtime.render_builtin(conversation)
        builtin.append(None if text is None else runtime.tokenize(text) == ids)
        text = runtime.render_jinja(conversation, tokenizer.bos_token or "", tokenizer.eos_token or "")
        jinja.append(None if text is None else runtime.tokenize(text) == ids)
    recognised = all(b is not None for b in builtin)
    return {"llama_cpp_builtin": sum(bool(b) for b in builtin) if recognised else None,
            "llama_cpp_builtin_recognised": recognised,
            "jinja": sum(bool(j) for j in jinja), "n": len(hf_ids),
            "passed": (recognised and all(builtin)) or (all(j is not None for j in jinja) and all(jinja))}


def stop_checks(runtime: Any, tokenizer: Any) -> dict[str, Any]:
    """Whether llama.cpp stops where the training template ends a turn, and holds the training template."""
    from tunelab.generation import end_of_turn_ids

    ends = end_of_turn_ids(tokenizer)
    return {"eos_gguf": runtime.eos(), "eos_tokenizer": tokenizer.eos_token_id, "end_of_turn": ends,
            "not_end_of_generation": [t for t in ends if not runtime.is_end_of_generation(t)],
            "chat_template_equal": (runtime.chat_template() or None) == (tokenizer.chat_template or None)}


def compare_runtime(model: Any, tokenizer: Any, runtime: Any, held: Held, new_tokens: int) -> dict[str, Any]:
    """Every check of the module docstring; returns the figures (not yet judged against a threshold).

    Args:
        model: The transformers model the GGUF was written from (float32), in eval mode.
        tokenizer: Its tokenizer with the training chat template.
        runtime: A :class:`tunelab.export.llamacpp.Runtime` holding the GGUF.
        held: The prompts (and reference answers) to check on.
        new_tokens: Greedy tokens per prompt.
    """
    from tunelab.generation import SamplingSettings, end_of_turn_ids, generate, render_prompt

    model.eval()
    stops = end_of_turn_ids(tokenizer)
    hf_ids = [render_prompt(tokenizer, c) for c in held.conversations]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in held.conversations]
    token_equal = [runtime.tokenize(t) == ids for t, ids in zip(texts, hf_ids)]
    hf = generate(model, tokenizer, held.conversations, SamplingSettings(max_new_tokens=new_tokens), batch_size=8)
    ll = [runtime.greedy(ids, set(stops), new_tokens) for ids in hf_ids]
    agree = [c.token_ids == g for c, g in zip(hf, ll)]
    prefix = [_prefix(c.token_ids, g) / max(1, len(c.token_ids)) for c, g in zip(hf, ll)]
    targets = ([tokenizer(r, add_special_tokens=False)["input_ids"] + stops[:1] for r in held.references]
               if held.references else [c.token_ids for c in hf])
    nll_hf, nll_ll = [], []
    for ids, target in zip(hf_ids, targets):
        if target:
            nll_hf += _nll_hf(model, ids, target)
            nll_ll += [-x for x in runtime.logprobs(ids, target).tolist()]
    ppl_hf, ppl_ll = _ppl(nll_hf), _ppl(nll_ll)

    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)

    return {
        "prompts": held.source, "n_prompts": len(hf_ids), "new_tokens": new_tokens,
        "prompt_tokens_equal": sum(token_equal), "template": _template_parity(runtime, tokenizer, held, hf_ids),
        "stops": stop_checks(runtime, tokenizer),
        "greedy_agreement": sum(agree) / max(1, len(agree)), "greedy_token_agreement": sum(prefix) / max(1, len(prefix)),
        "perplexity_on": "reference answers" if held.references else "the HF model's greedy answers",
        "perplexity_hf": ppl_hf, "perplexity_gguf": ppl_ll, "perplexity_increase": ppl_ll / ppl_hf - 1,
        "hf_answers": [c.text for c in hf], "gguf_answers": [text(g) for g in ll],
        "differing": [{"prompt": c[-1]["content"], "hf": h.text, "gguf": text(g)}
                      for c, h, g, a in zip(held.conversations, hf, ll, agree) if not a],
    }


def judge(figures: dict[str, Any], quant: str) -> list[str]:
    """The checks that failed for ``quant`` (empty when the export may be published)."""
    limits = THRESHOLDS[quant]
    failed = []
    if figures["prompt_tokens_equal"] != figures["n_prompts"]:
        failed.append(f"llama.cpp tokenized {figures['n_prompts'] - figures['prompt_tokens_equal']} of "
                      f"{figures['n_prompts']} prompts differently from the HF tokenizer")
    if not figures["template"]["passed"]:
        failed.append("llama.cpp's rendering of the stored chat template differs from the training template")
    stops = figures["stops"]
    if stops["eos_tokenizer"] is not None and stops["eos_gguf"] != stops["eos_tokenizer"]:
        failed.append(f"the file's eos token is id {stops['eos_gguf']}, the tokenizer's id {stops['eos_tokenizer']}")
    if stops["not_end_of_generation"]:
        failed.append(f"llama.cpp would not stop at the end-of-turn token(s) {stops['not_end_of_generation']}")
    if not stops["chat_template_equal"]:
        failed.append("the chat template stored in the file is not the training template")
    if figures["greedy_agreement"] < limits["min_agreement"]:
        failed.append(f"greedy agreement {figures['greedy_agreement']:.0%} < {limits['min_agreement']:.0%}")
    if figures["perplexity_increase"] > limits["max_ppl_increase"]:
        failed.append(f"perplexity +{figures['perplexity_increase']:.1%} > +{limits['max_ppl_increase']:.0%}")
    return failed
