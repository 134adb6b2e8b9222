"""Side-by-side training throughput: plain transformers+peft, TRL, and tunelab, on one job, one machine.

The job is the SQL demo task (``tunelab.examples.sql``) with LoRA r=16 alpha=32 on all linear layers,
the same tokenized data, batch size, step count, learning rate and precision for every runner:

  a  plain loop: ``model(**batch, labels=...).loss.backward()``, AdamW, padded batches (what people write)
  b  TRL ``SFTTrainer`` with a prompt/completion dataset (only if ``trl`` is importable)
  c  ``tunelab.recipes.sft.main`` on a RunConfig (eval and probe off), padded batches
  d  the same with ``train.packing=true`` (``--packing``): rows no longer than the micro-batch's longest
     example on sdpa/eager (``tunelab.data.packing.row_budget``), one row on flash-attention
  e  ``--packing-rows R``: d with each micro-batch packed into rows of at most R tokens instead, by
     swapping sft's packed collate function in this process (to measure other row budgets)

``--shape llama-3.2-1b`` (or ``llama-3.1-8b``, ``tiny-llama``) runs the anchors' throughput job instead: a
model of that shape with random weights (written once to the work directory, SmolLM2's tokenizer), rows of
exactly ``--max-length`` random-word tokens, loss on every position (``data.loss_on: all``), as
``shared/anchors/lora_throughput.py`` measures HF + peft; ``--plain-checkpointing`` gives runner a the
anchors' usual gradient checkpointing, ``--tunelab-checkpointing`` sets tunelab's (default auto: the plan decides).

``--compare-packing`` measures only what the batch layout costs: forward+backward of the same
micro-batches padded, packed into rows of at most R tokens, and packed into one row, interleaved in
one process (``--packing-rows`` sets R, default ``--max-length``).

Each runner runs in a child process of its own by default, so peak memory is per runner (CPU peak RSS
only ever grows within a process); the children rebuild the same data deterministically and the
parent checks that they tokenized it identically. ``--same-process`` runs them one after the other in
this process instead (then CPU peak RSS is cumulative and says so).

tunelab's runners log every step (``train.log_every=1``) to time each one; on a GPU that makes the host wait
for every step, which tunelab's default (every 10 steps there) does not, so their GPU tokens/s are a lower
bound for a small model (the JSON also has ``train_seconds`` of the whole loop).

Reported: non-padding input tokens/s over steps 2..N (step 1 pays one-off warm-up), also over all
steps, and per CPU second of the process (with ``--threads 1``, comparable between runners on a
machine other jobs share, where wall time is not); peak memory (CUDA ``max_memory_allocated`` on a
GPU, process peak RSS on CPU); MFU on a GPU with ``--peak-tflops`` (model FLOPs: 4N per token for LoRA, forward 2N plus activation gradients 2N, with N
the weights that take part in matmuls, lm_head included, attention score FLOPs left out); ratios vs a.

    python bench/side_by_side.py --examples 64 --steps 8 --batch-size 8 --threads 1 --packing --out /tmp/sbs.json
    python bench/side_by_side.py --compare-packing --schema-in-prompt --steps 3 --threads 1 --packing-rows 1024
    python bench/side_by_side.py --schema-in-prompt --packing --device cuda --peak-tflops 790 --out sbs.json
    python bench/side_by_side.py --shape llama-3.2-1b --examples 48 --steps 6 --batch-size 8 --max-length 2048 \
        --model-dtype bfloat16 --lora-alpha 16 --lora-dropout 0 --plain-checkpointing --runners a,c --peak-tflops 790
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNNERS = {
    "a": "plain transformers+peft loop (padded)",
    "b": "TRL SFTTrainer",
    "c": "tunelab sft (padded)",
    "d": "tunelab sft, train.packing=true",
    "e": "tunelab sft, packed rows <= R tokens",
}
LORA = dict(r=16, alpha=32, dropout=0.05)  # the SQL anchors' adapter; --lora-alpha/--lora-dropout change it
# Decoder shapes of the throughput anchors (shared/anchors/lora_throughput.py), plus a tiny one for CPU checks.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}


# ------------------------------------------------------------------------------------------ data


def long_schema_prompt(sample_rows: int = 7) -> str:
    """A system prompt with the full DDL and sample rows (~455 tokens per example with SmolLM2's tokenizer).

    The anchor job (shared/anchors, 1,500 examples of ~455 tokens) puts the schema in the prompt; the
    demo's compact prompt gives ~95-token examples instead, where padding and per-step overheads weigh more.
    """
    from tunelab.examples.sql.task import _rows

    products, customers, orders = _rows()
    ddl = ("CREATE TABLE products(\n  id INTEGER PRIMARY KEY,\n  name TEXT,      -- product name\n"
           "  category TEXT,  -- product category, lower case\n  price REAL,     -- unit price in euros\n"
           "  stock INTEGER   -- units in stock\n);\n"
           "CREATE TABLE customers(\n  id INTEGER PRIMARY KEY,\n  name TEXT,  -- full name\n  city TEXT\n);\n"
           "CREATE TABLE orders(\n  id INTEGER PRIMARY KEY,\n  customer_id INTEGER REFERENCES customers(id),\n"
           "  product_id INTEGER REFERENCES products(id),\n  quantity INTEGER,\n  day TEXT  -- weekday name, e.g. Monday\n);\n")
    k, half = sample_rows, max(1, sample_rows // 2)
    rows = ("Sample rows of products (id | name | category | price | stock):\n"
            + "\n".join(" | ".join(map(str, r)) for r in products[:k])
            + "\nSample rows of customers (id | name | city):\n" + "\n".join(" | ".join(map(str, r)) for r in customers[:half])
            + "\nSample rows of orders (id | customer_id | product_id | quantity | day):\n"
            + "\n".join(" | ".join(map(str, r)) for r in orders[:half]))
    return "Write one SQLite query that answers the question. Use only these tables and columns.\n\n" + ddl + "\n" + rows


def write_task_data(directory: Path, n_examples: int, schema_in_prompt: bool, mixed_lengths: bool = False) -> Path:
    """The SQL demo's training records as JSONL (deterministic); ``mixed_lengths``: the long schema
    prompt in every other example only (lengths ~95 and ~455 tokens, the case packing is for)."""
    from tunelab.examples.sql.task import make_splits

    train, _ = make_splits(n_train=n_examples, n_test=40, seed=0)
    if schema_in_prompt or mixed_lengths:
        system = long_schema_prompt()
        for i, record in enumerate(train):
            if schema_in_prompt or i % 2 == 0:
                record["messages"][0]["content"] = system
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), encoding="utf-8")
    return path


def write_shape_data(directory: Path, n_examples: int, seed: int) -> Path:
    """Records of random words, far longer than any --max-length (truncated to exactly it): the anchors'
    random-token rows, through tunelab's own data path."""
    import random

    rng = random.Random(seed)
    words = [w for w in long_schema_prompt().replace("\n", " ").split() if w.isalpha()] or ["token"]
    records = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(6000))},
                             {"role": "assistant", "content": "ok"}]} for _ in range(n_examples)]
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_shape_model(args) -> str:
    """A model of ``args.shape`` with random weights in ``args.model_dtype``, saved once under the work
    directory with the embedded model's tokenizer; returns its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tunelab.models.embedded import DEFAULT_MODEL, ensure_embedded
    from tunelab.models.load import torch_dtype

    directory = Path(args.workdir) / f"model-{args.shape}-{args.model_dtype}"
    if (directory / "config.json").is_file():
        return str(directory)
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded(DEFAULT_MODEL))
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(4096, args.max_length),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialise where there is room and speed (an 8B model on the GPU)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(args.model_dtype))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    return str(directory)


def tunelab_config(args, data_file: Path, output_dir: Path, packing: bool = False):
    from tunelab.resolve import load_config

    overrides = [
        f"model={args.model}", f"model.dtype={args.model_dtype}", "method.name=lora", f"method.r={LORA['r']}",
        f"method.alpha={LORA['alpha']}", f"method.dropout={LORA['dropout']}", "method.target_modules=all-linear",
        f"data.train={data_file}", f"data.max_length={args.max_length}", "data.too_long=truncate",
        f"data.loss_on={'all' if args.shape else 'assistant'}",
        f"train.gradient_checkpointing={args.tunelab_checkpointing}", f"train.kernels={args.tunelab_kernels}",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.grad_accum=1",
        f"train.lr={args.lr}", "train.warmup_ratio=0", "train.log_every=1", "train.max_grad_norm=1.0",
        f"train.precision={args.precision}", f"train.seed={args.seed}",
        "eval.before=false", "eval.probe=false", f"output_dir={output_dir}",
    ]
    if packing:
        overrides.append("train.packing=true")
    return load_config(None, overrides)


def step_batches(n_examples: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """Example indices of every step, in tunelab's data order (one micro-batch per step)."""
    from tunelab.training.schedule import epoch_batches

    per_epoch = math.ceil(n_examples / batch_size)
    order: list[list[int]] = []
    epoch = 0
    while len(order) < steps:
        order += epoch_batches(n_examples, batch_size, seed, epoch)
        epoch += 1
    assert len(epoch_batches(n_examples, batch_size, seed, 0)) == per_epoch
    return order[:steps]


def load_data(args, data_file: Path):
    """Tokenize exactly as ``tunelab train`` does; returns (tokenizer, train examples, step batches, digest)."""
    from tunelab.stages.setup import load_prepared_tokenizer, read_examples, tokenize

    config = tunelab_config(args, data_file, Path(args.workdir) / "unused")
    _, tokenizer, added = load_prepared_tokenizer(config)
    data = tokenize(config, tokenizer, read_examples(config), added)
    digest = hashlib.sha256(json.dumps([[ex.input_ids, ex.labels] for ex in data.train]).encode()).hexdigest()[:16]
    return tokenizer, data.train, step_batches(len(data.train), args.batch_size, args.seed, args.steps), digest


# ------------------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str, same_process: bool) -> tuple[float, str]:
    """(MiB, what it is)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return rss, "CPU peak RSS of the process" + (" (cumulative over runners)" if same_process else "")


def flop_params(model) -> int:
    """Weights that take part in a matmul per token: all but the input embedding table, plus lm_head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    total = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name and p is not embed)
    return total + (head.numel() if head is embed else 0)  # a tied lm_head is still a matmul


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.split(":")[0], dtype=torch.float16)
    return torch.autocast(device.split(":")[0], enabled=False)


def resolved_precision(args) -> str:
    if args.precision != "auto":
        return args.precision
    cuda = args.device.startswith("cuda")
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


# --------------------------------------------------------------------------------------- runners


def run_plain(args, examples, steps, tokenizer) -> dict:
    """(a) The loop people write: padded batch, the model's own mean loss, AdamW, grad clipping."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device, precision = args.device, resolved_precision(args)
    torch.manual_seed(args.seed)
    from tunelab.models.load import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch_dtype(args.model_dtype)).to(device)
    model.config.use_cache = False
    if args.plain_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_flop = flop_params(model)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    model.train()
    reset_peak(device)
    times, cpu, tokens, losses = [], [], [], []
    for ids in steps:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = [examples[i] for i in ids]
        width = max(len(ex.input_ids) for ex in batch)
        input_ids = torch.tensor([ex.input_ids + [pad] * (width - len(ex.input_ids)) for ex in batch], device=device)
        labels = torch.tensor([ex.labels + [-100] * (width - len(ex.labels)) for ex in batch], device=device)
        mask = torch.tensor([[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in batch], device=device)
        with autocast(device, precision):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        tokens.append(int(mask.sum()))
    return {"step_seconds": times, "step_cpu_seconds": cpu, "step_tokens": tokens, "losses": losses, "flop_params": n_flop}


def run_trl(args, examples, steps, tokenizer, data_file: Path) -> dict:
    """(b) TRL SFTTrainer as its docs show it: conversational prompt/completion data, completion-only loss.

    TRL tokenizes and shuffles on its own, so its token counts per step are taken from its logs
    (``num_tokens``) when it reports them, else estimated from the mean example length.
    """
    try:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        return {"skipped": f"trl not importable ({exc.name}); pip install trl datasets to include it"}

    device, precision = args.device, resolved_precision(args)
    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    n_flop = flop_params(model)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.start)

    config = SFTConfig(output_dir=str(Path(args.workdir) / "trl"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no",
                       report_to=[], bf16=precision == "bf16", fp16=precision == "fp16", max_length=args.max_length,
                       seed=args.seed, use_cpu=not device.startswith("cuda"), max_grad_norm=1.0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    reset_peak(device)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    cumulative = [r.get("num_tokens") for r in logs]
    if len(cumulative) == len(times) and all(c is not None for c in cumulative):
        tokens = [int(c - p) for c, p in zip(cumulative, [0, *cumulative[:-1]])]
        note = "tokens from TRL's num_tokens log"
    else:
        mean = sum(len(ex.input_ids) for ex in examples) / len(examples)
        tokens = [round(mean * args.batch_size)] * len(times)
        note = "tokens estimated from the mean example length (TRL logged no num_tokens)"
    return {"step_seconds": times, "step_tokens": tokens, "losses": [r["loss"] for r in logs], "flop_params": n_flop,
            "note": f"TRL's own tokenization and data order; {note}"}


def run_tunelab(args, examples, steps, data_file: Path, packing: bool, row_budget: int | None = None) -> dict:
    """(c)/(d)/(e) ``tunelab.recipes.sft.main``; per-step time from metrics.jsonl (tokens_per_s of each step)."""
    from pydantic import ValidationError
    from rich.console import Console

    from tunelab.data.packing import packed_micro_batch
    from tunelab.errors import TunelabError
    from tunelab.recipes import sft

    if row_budget is not None:  # e: swap the recipe's packed collate for one with a fixed row budget
        sft.collator = lambda model, packing: (
            lambda batch, pad_id: packed_micro_batch(batch, pad_id, max_tokens=row_budget))

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    try:
        config = tunelab_config(args, data_file, run_dir, packing=packing)
    except (TunelabError, ValidationError) as exc:
        return {"skipped": f"this tunelab does not accept train.packing yet ({str(exc).splitlines()[0]})"}
    cpu_marks = _mark_step_cpu_time(sft)
    reset_peak(args.device)
    started = time.perf_counter()
    result = sft.main(config, force=True, console=Console(stderr=True, quiet=not args.verbose))
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    tokens = [sum(len(examples[i].input_ids) for i in ids) for ids in steps]
    times = [t / r["tokens_per_s"] for t, r in zip(tokens, records)]
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    base = _loaded_flop_params(args.model)
    cpu = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    return {"step_seconds": times, "step_cpu_seconds": cpu if len(cpu) == len(times) else None, "step_tokens": tokens,
            "losses": [r["loss"] for r in records], "flop_params": base,
            "train_seconds": result.train_seconds, "main_wall_seconds": wall, "run_dir": str(run_dir),
            "manifest_tokens_per_s": manifest.get("tokens_per_s")}


def _mark_step_cpu_time(sft) -> list[float]:
    """Process CPU time at the start of sft's loop (``run_token_loss``) and at each step's log line (log_every=1).

    CPU seconds of this process (all its threads) per step change much less than wall time when other
    jobs share the machine, so they compare runners on a busy machine where wall time cannot.
    """
    from tunelab.training import reporter

    marks: list[float] = []
    loop, log_class = sft.run_token_loss, reporter.MetricsLog

    def timed_loop(*a, **k):
        marks.append(time.process_time())
        return loop(*a, **k)

    class TimedLog(log_class):
        def log(self, record):
            if "tokens_per_s" in record:
                marks.append(time.process_time())
            super().log(record)

    sft.run_token_loss, reporter.MetricsLog = timed_loop, TimedLog
    return marks


def _loaded_flop_params(model_path: str) -> int:
    """N of the model from its config alone (no second copy of the weights in memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return flop_params(model)


def run_one(args, name: str, data_file: Path) -> dict:
    tokenizer, examples, steps, digest = load_data(args, data_file)
    if name == "a":
        out = run_plain(args, examples, steps, tokenizer)
    elif name == "b":
        out = run_trl(args, examples, steps, tokenizer, data_file)
    else:
        out = run_tunelab(args, examples, steps, data_file, packing=name in "de",
                          row_budget=args.packing_rows if name == "e" else None)
    if "skipped" not in out:
        out["peak_memory_mib"], out["peak_memory_kind"] = peak_memory(args.device, args.same_process)
    out["data_digest"] = digest
    return out


# ---------------------------------------------------------------------------------------- report


def summarise(name: str, raw: dict, args) -> dict:
    if "skipped" in raw:
        return {"runner": name, "label": RUNNERS[name], **raw}
    secs, toks = raw["step_seconds"], raw["step_tokens"]
    steady = slice(1, None) if len(secs) > 1 else slice(None)
    tok_s = sum(toks[steady]) / sum(secs[steady])
    out = {"runner": name, "label": RUNNERS[name], "tokens_per_s": tok_s, "tokens_per_s_all_steps": sum(toks) / sum(secs),
           "seconds_per_step": sum(secs[steady]) / len(secs[steady]), **raw}
    if raw.get("step_cpu_seconds"):
        out["tokens_per_cpu_s"] = sum(toks[steady]) / sum(raw["step_cpu_seconds"][steady])
    if args.peak_tflops:
        out["mfu"] = tok_s * 4 * raw["flop_params"] / (args.peak_tflops * 1e12)
    return out


def compare_packing(args, data_file: Path, fixed_budget: int | None) -> list[dict]:
    """Forward+backward of the same micro-batches padded, packed into rows, and packed into one row.

    One process, one model, the layouts interleaved batch by batch, process CPU time per micro-batch
    (median): isolates what the batch layout costs from everything else a training run does.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.data import collate
    from tunelab.data.packing import collate_packed, packed_micro_batch, row_budget
    from tunelab.training.loss import summed_loss_of_batch

    _, examples, steps, _ = load_data(args, data_file)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    model.config.use_cache = False
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    budget = fixed_budget or args.max_length
    layouts = {"padded": lambda b: collate(b, 0),
               "packed rows <= longest": lambda b: packed_micro_batch(b, 0, row_budget(b, model.config._attn_implementation)),
               f"packed rows <= {budget}": lambda b: packed_micro_batch(b, 0, budget),
               "packed, one row": lambda b: collate_packed(b, 0)}
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    shapes: dict[str, list[tuple]] = {name: [] for name in layouts}
    losses: dict[str, list[float]] = {name: [] for name in layouts}
    for ids in steps:
        batch = [examples[i] for i in ids]
        for name, make in layouts.items():
            tensors = {k: v.to(args.device) for k, v in make(batch).items()}
            sync(args.device)
            start = time.process_time() if args.device == "cpu" else time.perf_counter()
            with autocast(args.device, resolved_precision(args)):
                loss = summed_loss_of_batch(model, tensors)
            loss.backward()
            sync(args.device)
            seconds[name].append((time.process_time() if args.device == "cpu" else time.perf_counter()) - start)
            model.zero_grad(set_to_none=True)
            shapes[name].append(tuple(tensors["input_ids"].shape))
            losses[name].append(float(loss.detach()))
    real = [sum(len(examples[i].input_ids) for i in ids) for ids in steps]
    out = []
    for name in layouts:
        median = sorted(seconds[name][1:] or seconds[name])[len(seconds[name][1:] or seconds[name]) // 2]
        out.append({"layout": name, "median_seconds": median, "tokens_per_s": sum(real) / sum(seconds[name]),
                    "slots": sum(a * b for a, b in shapes[name]), "real_tokens": sum(real), "shapes": shapes[name],
                    "summed_losses": losses[name]})
    kind = "CPU seconds of the process" if args.device == "cpu" else "wall seconds"
    print(f"\nforward+backward per micro-batch ({kind}, median over {len(steps)} micro-batches of {args.batch_size}, "
          f"{sum(real) / sum(len(ids) for ids in steps):.0f} tokens per example)")
    for r in out:
        print(f"  {r['layout']:<22} {r['median_seconds']:7.2f} s  {r['tokens_per_s']:8.1f} tok/s  "
              f"{r['slots']} slots for {r['real_tokens']} tokens  ({r['median_seconds'] / out[0]['median_seconds']:.2f}x padded)")
    return out


def best_of(runs: list[dict]) -> dict:
    """The run with the highest steady-state throughput (least disturbed), with every run's figure."""
    done = [r for r in runs if "tokens_per_s" in r]
    if not done:
        return runs[-1]
    best = max(done, key=lambda r: r["tokens_per_s"])
    return {**best, "tokens_per_s_of_each_run": [round(r["tokens_per_s"], 2) for r in done],
            "tokens_per_cpu_s_of_each_run": [round(r.get("tokens_per_cpu_s", 0.0), 2) for r in done]}


def run_child(args, argv: list[str] | None, name: str, repeat: int) -> dict:
    """Run one runner in a fresh process; returns its raw result, or a "skipped" entry if it failed."""
    result_file = Path(args.workdir) / f"result-{name}-{repeat}.json"
    cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--model", args.model,
           "--workdir", args.workdir, "--child", name, "--child-result", str(result_file)]
    log_file = Path(args.workdir) / f"log-{name}-{repeat}.txt"
    with open(log_file, "w") as log:
        code = subprocess.run(cmd, stdout=None if args.verbose else log, stderr=None if args.verbose else log).returncode
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        print(f"[{name}] failed (exit {code}); last lines of {log_file}:\n{tail}", file=sys.stderr)
        return {"skipped": f"failed (exit {code}), see {log_file}"}
    return json.loads(result_file.read_text())


def print_table(results: list[dict], args, data_info: dict) -> None:
    base = next((r for r in results if r["runner"] == "a" and "tokens_per_s" in r), None)
    kind = next((r["peak_memory_kind"] for r in results if "peak_memory_kind" in r), "")
    print(f"\n{data_info['examples']} examples (mean {data_info['mean_tokens']:.0f}, max {data_info['max_tokens']} tokens; "
          f"padding would be {100 * data_info['padding_fraction']:.0f}% of padded batch slots), {args.steps} steps of "
          f"{args.batch_size}, {args.shape or Path(args.model).name} {args.model_dtype}, LoRA r{LORA['r']} alpha {LORA['alpha']:g} "
          f"dropout {LORA['dropout']:g} all-linear, {resolved_precision(args)} on {args.device}"
          + (", runner a with gradient checkpointing" if args.plain_checkpointing else "")
          + f", tunelab gradient_checkpointing={args.tunelab_checkpointing} kernels={args.tunelab_kernels}")
    head = (f"{'runner':<40} {'tok/s':>9} {'vs a':>6} {'s/step':>7} {'tok/CPU-s':>9} {'vs a':>6} {'peak MiB':>9} {'vs a':>6} "
            f"{'MFU':>6} {'loss 1→N':>14}")
    print(head)
    print("-" * len(head))
    for r in results:
        if "skipped" in r:
            print(f"{r['runner'] + ' ' + r['label']:<40} skipped: {r['skipped']}")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_memory_mib'] / base['peak_memory_mib']:.2f}x" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        per_cpu = f"{r['tokens_per_cpu_s']:.1f}" if "tokens_per_cpu_s" in r else "-"
        cpu_ratio = (f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x"
                     if base and "tokens_per_cpu_s" in r and "tokens_per_cpu_s" in base else "-")
        loss = f"{r['losses'][0]:.3f}→{r['losses'][-1]:.3f}" if r.get("losses") else "-"
        print(f"{r['runner'] + ' ' + r['label']:<40} {r['tokens_per_s']:>9.1f} {speed:>6} {r['seconds_per_step']:>7.2f} "
              f"{per_cpu:>9} {cpu_ratio:>6} {r['peak_memory_mib']:>9.0f} {mem:>6} {mfu:>6} {loss:>14}")
    print(f"tok/s: non-padding input tokens per wall second over steps 2..{args.steps} (tok/CPU-s: per CPU second of "
          "the process, all threads; steadier than wall time when other jobs share the machine)"
          + (f", best of {args.repeats} interleaved runs" if args.repeats > 1 else "") + f"; peak memory: {kind}"
          + ("" if args.peak_tflops else "; MFU needs --peak-tflops (GPU)"))


def data_summary(args, data_file: Path) -> dict:
    _, examples, steps, digest = load_data(args, data_file)
    lengths = [len(ex.input_ids) for ex in examples]
    slots = sum(len(ids) * max(lengths[i] for i in ids) for ids in steps)
    real = sum(lengths[i] for ids in steps for i in ids)
    return {"examples": len(examples), "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "trained_fraction": sum(sum(label != -100 for label in ex.labels) for ex in examples) / sum(lengths),
            "padding_fraction": 1 - real / slots, "digest": digest}


def machine(args) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
            f"load average {os.getloadavg()[0]:.1f} at the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schema-in-prompt", action="store_true", help="full DDL + sample rows in the prompt (~455 tokens/example)")
    parser.add_argument("--mixed-lengths", action="store_true", help="the long schema prompt in every other example only")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="the anchors' throughput job: this model shape with random weights, rows of --max-length tokens, loss everywhere")
    parser.add_argument("--model-dtype", default="float32", help="weights as loaded by every runner (bfloat16 as in the anchors' LoRA runs)")
    parser.add_argument("--lora-alpha", type=float, default=LORA["alpha"])
    parser.add_argument("--lora-dropout", type=float, default=LORA["dropout"])
    parser.add_argument("--plain-checkpointing", action="store_true", help="runner a with gradient checkpointing (the anchors' HF + peft default)")
    parser.add_argument("--tunelab-checkpointing", default="auto", choices=["auto", "true", "false"], help="tunelab's train.gradient_checkpointing")
    parser.add_argument("--tunelab-kernels", default="none", choices=["none", "liger"], help="tunelab's train.kernels (liger: CUDA)")
    parser.add_argument("--packing", action="store_true", help="also run tunelab with train.packing=true (d)")
    parser.add_argument("--packing-rows", type=int, default=None, help="also run e: packed rows of at most this many tokens")
    parser.add_argument("--compare-packing", action="store_true",
                        help="instead of the runners: forward+backward of the same micro-batches padded vs packed, interleaved")
    parser.add_argument("--runners", default=None, help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's peak dense TFLOP/s at this precision, for MFU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 makes tok/CPU-s a clean work measure on a busy machine: "
                             "no OpenMP threads spinning while their partner is descheduled)")
    parser.add_argument("--repeats", type=int, default=1, help="run every runner this many times (interleaved) and keep each one's best")
    parser.add_argument("--same-process", action="store_true", help="run every runner in this process (CPU peak RSS becomes cumulative)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--verbose", action="store_true", help="show tunelab's own console output")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    LORA.update(alpha=args.lora_alpha, dropout=args.lora_dropout)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="tunelab-sbs-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.shape and args.model is None:
        args.model = make_shape_model(args)
    elif args.model is None:
        from tunelab.models.embedded import DEFAULT_MODEL, ensure_embedded

        args.model = str(ensure_embedded(DEFAULT_MODEL))
    data_file = Path(args.workdir) / "train.jsonl"

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = run_one(args, args.child, data_file)
        Path(args.child_result).write_text(json.dumps(result))
        return 0

    if args.shape:
        write_shape_data(Path(args.workdir), args.examples, args.seed)
    else:
        write_task_data(Path(args.workdir), args.examples, args.schema_in_prompt, args.mixed_lengths)
    if args.compare_packing:
        layouts = compare_packing(args, data_file, args.packing_rows)
        if args.out:
            Path(args.out).write_text(json.dumps({"machine": machine(args), "torch": torch.__version__,
                                                  "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "layouts": layouts}, indent=2))
        return 0
    names = args.runners.split(",") if args.runners else (
        ["a"] + ([] if args.shape else ["b"]) + ["c"] + (["d"] if args.packing else []) + (["e"] if args.packing_rows else []))
    info = data_summary(args, data_file)
    results = []
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):  # interleaved, so slow phases of a shared machine hit every runner
        for name in names:
            print(f"[{name}] {RUNNERS[name]} (run {repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            raw = run_one(args, name, data_file) if args.same_process else run_child(args, argv, name, repeat)
            if "skipped" not in raw and raw.get("data_digest") != info["digest"]:
                raise SystemExit(f"runner {name} tokenized different data ({raw.get('data_digest')} != {info['digest']})")
            runs[name].append(summarise(name, raw, args))
    results = [best_of(runs[name]) for name in names]
    print_table(results, args, info)
    if args.out:
        report = {"machine": machine(args), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "args": {k: v for k, v in vars(args).items() if not k.startswith("child")}, "data": info, "results": results}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
