"""The model card (``README.md``) of a GGUF export: what it was made from, how to run it, what was measured."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in pairs if v is not None)


def model_card(source: Any, report: dict[str, Any]) -> str:
    """Markdown for an exported GGUF: source, quantization, the llama.cpp check's figures, how to run it."""
    check = report["verification"]
    origin = f"the tunelab run `{source.path}` merged into its base" if source.run is not None else f"`{source.path}`"
    lines = [f"# {report['file']}\n",
             f"GGUF ({report['quant']}) of {origin}, written by `tunelab export`, with the tokenizer and chat template "
             "used in training.\n",
             "```bash\n"
             f"llama-cli -m {report['file']} -cnv        # llama.cpp\n"
             "ollama create my-model -f Modelfile      # Ollama (TEMPLATE and stop tokens from the training template)\n"
             "```\n"]
    if not check.get("checked"):
        lines.append("**Not checked in llama.cpp** (llama-cpp-python was not installed; published with --force).\n")
        return "\n".join(lines)
    task = check.get("task") or {}
    rows = [("runtime", check["runtime"]), ("held prompts", f"{check['n_prompts']} from {check['prompts']}"),
            ("prompt token ids equal to the HF tokenizer's", f"{check['prompt_tokens_equal']} of {check['n_prompts']}"),
            ("chat template parity (llama.cpp / Jinja)",
             f"{check['template']['llama_cpp_builtin']} / {check['template']['jinja']} of {check['template']['n']}"),
            ("greedy answers equal to the HF model's", f"{_pct(check['greedy_agreement'])} ({check['new_tokens']} new tokens)"),
            ("perplexity HF → GGUF", f"{check['perplexity_hf']:.3f} → {check['perplexity_gguf']:.3f} "
             f"({check['perplexity_increase']:+.2%}, on {check['perplexity_on']})"),
            (f"task {task.get('metric')} HF / GGUF" if "hf" in task else None,
             f"{_pct(task.get('hf'))} / {_pct(task.get('gguf'))}" if "hf" in task else None),
            ("passed", "yes" if not check["failed"] else f"**no ({'; '.join(check['failed'])}): published with --force**")]
    lines.append("## Check in llama.cpp against the HF model\n\n| | |\n|---|---|\n" + _rows(rows) + "\n")
    return "\n".join(lines)
