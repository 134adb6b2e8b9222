"""Throughput of `tunelab serve` for concurrent mixed-adapter requests, against one-at-a-time generation.

Two (or more) LoRA adapters with random, non-zero weights are made on the base (no training needed: the
figure is about decoding, not answers) and saved in PEFT format with the base's tokenizer. Then:

- sequential: plain transformers + peft, one ``model.generate`` per request (greedy, the adapter switched
  with ``set_adapter``), the way a script without a server would answer them;
- served: the same requests sent by N client threads (the official ``openai`` client; at once, or one every
  ``--stagger`` seconds) to a live ``tunelab serve`` on 127.0.0.1, with each ``--batching`` mode: continuous
  (requests join the running batch between decode steps, both adapters in one forward pass), continuous-unmixed
  (one adapter per batch, ``--no-mix-adapters``) and dynamic (waiting requests batched per adapter, one
  ``generate`` call per batch).

Both decode the same prompts greedily with the same ``max_tokens`` and stop at the end of the turn; the
figure is generated tokens per second of wall time. Memory per extra adapter is its parameter bytes and
the resident-memory growth of the server process when it is loaded.

    python bench/bench_serving.py                                   # SmolLM2-135M, 16 requests, 2 adapters
    python bench/bench_serving.py --model tiny --requests 8         # a seconds-long smoke run
    python bench/bench_serving.py --stagger 0.5                     # requests arriving over time: latency
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

REVIEWS = ["The battery died after two days.", "Great sound, comfortable fit.", "It works, but the app is clumsy.",
           "Arrived broken and support never answered.", "Fast, quiet and cheap. Love it.", "Okay for the price.",
           "The lid cracked in a week.", "Exactly as described, would buy again."]


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def base_path(model: str, folder: Path) -> str:
    if model == "tiny":
        from tunelab.models.tiny import save_tiny_model

        return str(save_tiny_model(folder / "tiny", "llama"))
    from tunelab.models.load import resolve_model_path

    return resolve_model_path(model)


def make_adapters(base: str, folder: Path, count: int, rank: int) -> list[Path]:
    """``count`` LoRA adapters with random B (peft's init leaves B at zero, which would change nothing)."""
    import torch

    from tunelab.methods.common import without_bitsandbytes
    from tunelab.models.load import load_model, load_tokenizer

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        with without_bitsandbytes():  # an unquantized base: keep bitsandbytes' import chatter out
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(load_model(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                                init_lora_weights=False))
        path = folder / f"adapter{i}"
        model.save_pretrained(path, safe_serialization=True)
        load_tokenizer(base).save_pretrained(path)
        paths.append(path)
    return paths


def requests(n: int, names: list[str]) -> list[tuple[str, list[dict]]]:
    return [(names[i % len(names)], [{"role": "user", "content": f"Sentiment of this review, one word: {REVIEWS[i % len(REVIEWS)]}"}])
            for i in range(n)]


def sequential(base: str, adapters: list[Path], work, max_tokens: int) -> dict:
    """One request at a time with plain transformers + peft."""
    import torch

    from tunelab.generation import end_of_turn_ids
    from tunelab.methods.common import without_bitsandbytes
    from tunelab.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(adapters[0]))
    with without_bitsandbytes():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base), adapters[0], adapter_name="a0").eval()
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    stops = end_of_turn_ids(tokenizer)
    tokens, started = 0, 0.0
    with torch.no_grad():
        for index, (name, messages) in enumerate([work[0], *work]):  # the first, untimed, warms up
            if index == 1:
                tokens, started = 0, time.perf_counter()
            model.set_adapter(name)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id or stops[0])
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "tokens": int(tokens), "tokens_per_s": round(tokens / seconds, 1)}


def served(base: str, adapters: list[Path], work, max_tokens: int, batching: str = "continuous", stagger: float = 0.0) -> dict:
    """The requests from one client thread each (the i-th starting ``i * stagger`` s in), against a live server."""
    from openai import OpenAI

    from tunelab.serving.app import create_app
    from tunelab.serving.models import Registry
    from tunelab.serving.server import BackgroundServer

    registry = Registry(base, base_id="base")
    before = rss_mb()
    registry.load("a0", adapters[0])
    after_first = rss_mb()
    for i, path in enumerate(adapters[1:], 1):
        registry.load(f"a{i}", path)
    per_adapter_rss = (rss_mb() - after_first) / max(len(adapters) - 1, 1) if len(adapters) > 1 else after_first - before
    counts, latencies = [], []
    app = create_app(registry, max_pending=len(work) + 8, max_batch_rows=len(work), batching=batching.split("-")[0],
                     mix_adapters=batching != "continuous-unmixed")
    with BackgroundServer(app) as url:
        def one(name, messages, delay=0.0):
            client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
            time.sleep(delay)
            t = time.perf_counter()
            reply = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=max_tokens)
            latencies.append(time.perf_counter() - t)
            counts.append(reply.usage.completion_tokens)

        one(*work[0])  # warm-up, untimed
        counts.clear()
        latencies.clear()
        threads = [threading.Thread(target=one, args=(*w, i * stagger)) for i, w in enumerate(work)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
    latencies.sort()
    return {"seconds": round(seconds, 2), "tokens": sum(counts), "tokens_per_s": round(sum(counts) / seconds, 1),
            "p50_s": round(latencies[len(latencies) // 2], 2), "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
            "rss_mb_per_extra_adapter": round(per_adapter_rss, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias, HF dir, or 'tiny'")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batching", default="continuous,continuous-unmixed,dynamic",
                        help="the server's batching modes to measure (continuous-unmixed: --no-mix-adapters)")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between the clients' requests (0: all at once)")
    args = parser.parse_args()
    import torch

    from tunelab.clikit import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        base = base_path(args.model, Path(tmp))
        adapters = make_adapters(base, Path(tmp), args.adapters, args.rank)
        adapter_bytes = sum(p.stat().st_size for p in adapters[0].glob("*.safetensors"))
        work = requests(args.requests, [f"a{i}" for i in range(args.adapters)])
        seq = sequential(base, adapters, work, args.max_tokens)
        srv = {mode: served(base, adapters, work, args.max_tokens, mode, args.stagger) for mode in args.batching.split(",")}
    print(json.dumps({"model": args.model, "requests": args.requests, "adapters": args.adapters, "max_tokens": args.max_tokens,
                      "stagger_s": args.stagger, "threads": torch.get_num_threads(), "sequential": seq, "served": srv,
                      "speedup": {mode: round(s["tokens_per_s"] / seq["tokens_per_s"], 2) for mode, s in srv.items()},
                      "adapter_file_mb": round(adapter_bytes / 2**20, 2)}, indent=1))


if __name__ == "__main__":
    main()
