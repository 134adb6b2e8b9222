"""``tunelab plan``: predict the peak memory and the time of a training config before running it.

Everything comes from the model's ``config.json`` (``AutoConfig``; weights are never loaded) and the run
config, for the loop of ``tunelab.recipes.sft``. Bytes: ``w`` = weight dtype (``model.dtype``; auto =
float32, as ``tunelab.models.load`` loads it), ``c`` = compute dtype (2 under bf16/fp16 autocast, else
``w``). ``B`` micro-batch, ``T`` tokens per row, ``d`` hidden, ``I`` intermediate, ``L`` blocks, ``H``/``KV``
heads, ``hd`` head dim, ``V`` vocabulary, ``N`` parameters, ``P`` virtual tokens.

Parameters (exact for llama, mistral, qwen2, qwen3; other decoders are approximated by the same block):
  block = d*H*hd + 2*d*KV*hd + H*hd*d (q,k,v,o; + q/k/v biases for qwen2) + 3*d*I (MLP) + 2*d (norms)
  model = L*block + V*d (embedding) + V*d unless tied (lm_head) + d (final norm)
Trained parameters: full = N; freeze = its last blocks (+ regex-named params); lora/qlora = r*(d_in + d_out)
per targeted linear (all-linear = q,k,v,o,gate,up,down); ia3 = one vector per scaled activation (peft's
targets: k, v outputs and the down_proj input for llama); prompt = P*d; prefix = P*L*2*KV*hd (or its
MLP); adapter (Houlsby) = per block and target 2*d*m + m + d. Added parameters are float32 (peft upcasts
them; Houlsby adapters take the weight dtype).

Peak memory = the largest of four phases of one optimizer step, plus a runtime overhead:
  static            weights (w per param; qlora: 0.5 B + 1/64 B absmax with double quantisation (else
                    + 4/64 B) per block-linear weight, 1 B for 8-bit, and float32 for everything else, as
                    peft's prepare_model_for_kbit_training leaves it) + added params + AdamW's two states
                    (dtype of the param) + gradients when grad_accum > 1 (they live across micro-batches).
                    No separate master copy: with model.dtype auto the trained params are the float32
                    master weights and autocast computes in bf16.
  forward (loss)    static + activations + autocast weight copies + 8 B (12 B without the trained-position
                    shortcut) per logit.
  backward (loss)   static + activations + 12 B per logit: the float32 log-softmax output, its incoming and
                    its outgoing gradient are alive together (+ c when the loop keeps the output logits
                    through backward, as ``out = model(..., labels=...); out.loss.backward()`` does).
  backward (blocks) the largest, over the blocks j in backward order, of static + the activations of blocks
                    <= j (with checkpointing: their inputs + block j recomputed) + the gradients of lm_head
                    and of the blocks after j + j's gradient working set per token: 3*c*I (2*c*I with
                    liger), + 4*I (+ 4*I with dropout) when LoRA casts a 16-bit down_proj input to float32.
  optimizer step    static + all gradients + AdamW temporaries (foreach on CUDA: one trained-size buffer;
                    CPU: two copies of the largest trained tensor).
Logit rows = B*(T-1)*completion_fraction: tunelab projects only trained positions onto the vocabulary
(prompt/prefix tuning and heads it does not know: every position). Activations come from a symbolic
forward of each decoder block that tracks the dtype and requires-grad of every tensor and records what
autograd keeps (bytes per token, shared tensors counted once): RMSNorm keeps its float32 input (and its
normalised output when its weight trains); a linear keeps its input only when its weight trains; under
autocast every consumer casts its own c-byte copy of an input and each frozen float32 weight leaves a
c-byte copy (d_in*d_out*c per linear); LoRA keeps per target its input cast to float32 then to c, its
dropout mask (1 B on CUDA, 4 B on CPU) and its r-wide middle; rotary outputs are promoted to the hidden
dtype; sdpa/flash attention keeps q, k, v, the output and H float32 log-sum-exps per token (no T^2
scores). With a padding (or packing) mask, k and v are expanded to all heads, the boolean mask costs
B*T^2 bytes and every block keeps an additive copy of B*T^2*c. SiLU keeps its input, the gate product
both factors, the loss the float32 input of the final norm. Gradient checkpointing keeps each block's
input (w*d per token) and recomputes one block at a time. Liger kernels (``kernels="liger"``): RMSNorm
and SwiGLU keep their inputs, RoPE is in place, the fused linear cross-entropy keeps a float32 gradient of
the hidden states and one chunk of logits. Overhead: 0.5 GiB on a GPU (CUDA context, allocator slack),
0.4 GiB on CPU (a Python process with torch, transformers and peft imported).

Time = tokens per epoch x epochs x FLOPs per token / (peak FLOP/s x MFU), with FLOPs per token =
  sum over blocks of 2*M (forward) + 2*M (input gradients, once the gradient path has started) + 2*M_t
  (weight gradients of trained matmuls) + 6*H*hd*T' (causal attention: 2*H*hd*T' forward, twice that
  backward, T' = mean row length) + with checkpointing one more forward (2*M + 2*H*hd*T') per block,
  + 2*V*d*f per pass over lm_head (forward, input gradient, weight gradient if trained; f = completion
  fraction) + 6 per added parameter, with M = a block's matmul parameters. For full fine-tuning this is
  6N + 6*L*H*hd*T'; for frozen-base methods ~4N + 6*L*H*hd*T' (the anchors' formula). Peak FLOP/s: the
  measured dense bf16 matmul peak where known (H100: 790 of the 989 TFLOP/s spec, from the anchors), else
  0.8 x the dense spec; float32 runs use the non-tensor-core float32 rate. MFU defaults to 0.35 on a GPU.
  On CPU both are assumptions measured on the 2-core dev machine (``CPU_MATMUL_GFLOPS`` = 75 GFLOP/s,
  ``CPU_MFU`` = 0.35).
  Tokens: ``tokens_per_epoch`` if given, else a tokenised :func:`profile_data`, else examples x
  max_length (an upper bound, and the plan says so).

Validation (live tensor bytes at the peak, estimate against measurement):
  * GPU, from the anchors (shared/anchors/README.md, H100, torch.cuda.max_memory_allocated; HF + peft
    LoRA r=16 all-linear and full fine-tuning, Llama-3.2-1B and 3.1-8B shapes, seq 2048, with and
    without checkpointing and liger): all 8 within 3 % (tests/unit/test_planning.py keeps them).
  * CPU, measured here with the torch profiler's allocation events (second step, Adam states present):
    SmolLM2-135M full and LoRA at batch 4/8, seq 256/512, with and without checkpointing, qlora (4-bit,
    bitsandbytes CPU), padded rows with 30 % trained positions: 10 cases within 0.05 %; tiny llama/qwen2,
    every method: within 5 %; SmolLM2 blocks with a 512 vocabulary under bf16 autocast (the dtype
    behaviour of a GPU run): within 5 %. On CPU the process RSS is higher than the live tensors (glibc
    keeps freed blocks: 1.1-2.4x here), which the CPU overhead does not model.

Why hand-written: accelerate's ``estimate-memory`` counts weights and a fixed optimizer multiple only; no
library models the activations, partial logits and dtype casts of a given training loop.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

GiB = 1024**3
GPU_OVERHEAD = int(0.5 * GiB)  # CUDA context + caching-allocator slack (stated assumption)
CPU_OVERHEAD = int(0.4 * GiB)  # RSS of a Python process with torch, transformers and peft imported
# CPU assumptions, measured on the 2-core dev machine (torch 2.13, shared with other jobs): a float32
# matmul of 2048-3072 square reaches 72-80 GFLOP/s (best of 5); SmolLM2-135M training steps reached
# 0.28-0.44 of that, so CPU_MFU is 0.35 like the GPU default. Another CPU differs: pass mfu or tokens.
CPU_MATMUL_GFLOPS = 75.0
CPU_MFU = 0.35
GPU_MFU = 0.35
_LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_FROZEN_BASE = ("lora", "qlora", "ia3", "adapter", "prompt", "prefix")


# --------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Device:
    """A training device: memory as torch reports it, dense peak TFLOP/s (bf16 tensor core and fp32)."""

    name: str
    kind: Literal["gpu", "cpu"]
    memory_bytes: int
    bf16_tflops: float | None = None  # dense spec (no sparsity)
    fp32_tflops: float | None = None
    measured_bf16_tflops: float | None = None  # achievable dense matmul peak, where measured
    note: str = ""

    def peak_flops(self, precision: str) -> float | None:
        """The FLOP/s the MFU applies to, for a resolved precision (fp32 / bf16 / fp16)."""
        if self.kind == "cpu":
            return CPU_MATMUL_GFLOPS * 1e9
        if precision == "fp32":
            return self.fp32_tflops * 1e12 if self.fp32_tflops else None
        if self.measured_bf16_tflops:
            return self.measured_bf16_tflops * 1e12
        return 0.8 * self.bf16_tflops * 1e12 if self.bf16_tflops else None


def _gpu(name: str, gib: float, bf16: float, fp32: float, measured: float | None = None, note: str = "") -> Device:
    return Device(name, "gpu", int(gib * GiB), bf16, fp32, measured, note)


# Memory: the total torch.cuda reports (a little under the marketing GB). TFLOP/s: dense spec sheets.
GPUS: dict[str, Device] = {
    "h100-80gb": _gpu("h100-80gb", 79.2, 989, 67, 790, "SXM; 790 TFLOP/s bf16 measured (anchors)"),
    "h200": _gpu("h200", 139.8, 989, 67, 790, "141 GB SXM; H100 compute"),
    "a100-80gb": _gpu("a100-80gb", 79.2, 312, 19.5),
    "a100-40gb": _gpu("a100-40gb", 39.4, 312, 19.5),
    "l4": _gpu("l4", 22.0, 121, 30.3),
    "a10g": _gpu("a10g", 22.0, 70, 35, note="AWS's A10 variant"),
    "rtx-4090": _gpu("rtx-4090", 23.6, 165, 82.6, note="bf16 with fp32 accumulate"),
    "rtx-3090": _gpu("rtx-3090", 23.6, 71, 35.6, note="bf16 with fp32 accumulate"),
    "t4": _gpu("t4", 14.6, 8.1, 8.1, note="no native bf16 (emulated at the fp32 rate); fp16 65 TFLOP/s"),
}
# torch.cuda device names -> catalog entries (an A100's variant is told by its memory)
_CUDA_NAMES = (("h200", "h200"), ("h100", "h100-80gb"), ("a100", "a100"), ("a10g", "a10g"), ("4090", "rtx-4090"),
               ("3090", "rtx-3090"), (r"\bl4\b", "l4"), (r"\bt4\b", "t4"))


def _meminfo_total() -> int:
    """Total RAM from /proc/meminfo (no psutil); 0 if unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resolve_device(gpu: str | None) -> Device:
    """A catalog GPU by name, ``cpu``, or ``current``/None: this machine's CUDA device, else its CPU.

    Raises:
        TunelabError: an unknown name; the message lists the known ones.
    """
    import torch

    name = (gpu or "current").lower()
    if name in GPUS:
        return GPUS[name]
    if name == "cpu" or (name == "current" and not torch.cuda.is_available()):
        return Device("cpu", "cpu", _meminfo_total(), note=f"{os.cpu_count()} cores; RAM from /proc/meminfo")
    if name == "current":
        props = torch.cuda.get_device_properties(0)
        for pattern, key in _CUDA_NAMES:
            if re.search(pattern, props.name.lower()):
                if key == "a100":
                    key = "a100-80gb" if props.total_memory > 50 * GiB else "a100-40gb"
                return replace(GPUS[key], name=f"current ({props.name})", memory_bytes=props.total_memory)
        return Device(f"current ({props.name})", "gpu", props.total_memory, note="not in the catalog: time unknown")
    raise TunelabError(f"unknown GPU {gpu!r}; known: {', '.join([*GPUS, 'cpu', 'current'])}")


# ----------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, read from its config."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: per-head RMSNorm of q and k

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads, bias = cfg.num_attention_heads, bool(getattr(cfg, "attention_bias", False))
        return cls(
            model_type=getattr(cfg, "model_type", "?"), hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
            layers=cfg.num_hidden_layers, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)), qkv_bias=bias or cfg.model_type == "qwen2",
            o_bias=bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)), qk_norm=cfg.model_type == "qwen3",
        )

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """The block's linear layers: name -> (d_in, d_out, has bias)."""
        d, dq, dkv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, dq, self.qkv_bias), "k_proj": (d, dkv, self.qkv_bias), "v_proj": (d, dkv, self.qkv_bias),
                "o_proj": (dq, d, self.o_bias), "gate_proj": (d, i, self.mlp_bias), "up_proj": (d, i, self.mlp_bias),
                "down_proj": (i, d, self.mlp_bias)}

    def parameter_table(self) -> dict[str, int]:
        """Parameter name, as transformers names it in llama-style models -> element count."""
        table = {"model.embed_tokens.weight": self.vocab * self.hidden}
        for b in range(self.layers):
            for name, (d_in, d_out, bias) in self.linears().items():
                table[_param(b, name)] = d_in * d_out
                if bias:
                    table[_param(b, name, "bias")] = d_out
            table[f"model.layers.{b}.input_layernorm.weight"] = self.hidden
            table[f"model.layers.{b}.post_attention_layernorm.weight"] = self.hidden
            if self.qk_norm:
                table[f"model.layers.{b}.self_attn.q_norm.weight"] = self.head_dim
                table[f"model.layers.{b}.self_attn.k_norm.weight"] = self.head_dim
        table["model.norm.weight"] = self.hidden
        if not self.tied:
            table["lm_head.weight"] = self.vocab * self.hidden
        return table

    @property
    def head_param(self) -> str:
        return "model.embed_tokens.weight" if self.tied else "lm_head.weight"


def _param(block: int, linear: str, kind: str = "weight") -> str:
    return f"model.layers.{block}.{_LINEARS[linear]}.{linear}.{kind}"


# Shapes of the embedded models, so that planning never has to download and convert one.
_EMBEDDED_SHAPES = {"smollm2-135m-instruct": ModelShape("llama", 576, 1536, 30, 9, 3, 64, 49152, tied=True)}


def load_shape(config: RunConfig) -> ModelShape:
    """The model's shape from its config.json (AutoConfig: no weights are read)."""
    from transformers import AutoConfig

    from tunelab.models.embedded import cached_path
    from tunelab.models.load import resolve_model_path

    if config.model.path in _EMBEDDED_SHAPES and cached_path(config.model.path) is None:
        return _EMBEDDED_SHAPES[config.model.path]
    path = resolve_model_path(config.model.path)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"model.path: cannot read the config of {config.model.path!r}: {exc}") from None
    return ModelShape.from_config(cfg)


# ----------------------------------------------------------------------------------------- the method
@dataclass
class _Method:
    """What a tuning method trains and adds, in the tracer's terms."""

    trainable: set[str] = field(default_factory=set)  # trained base parameters, by name
    extra: int = 0  # parameters the method adds (all trained)
    extra_bytes: int = 4
    lora: dict[str, int] = field(default_factory=dict)  # target linear -> r
    dropout: float = 0.0
    ia3_out: set[str] = field(default_factory=set)  # linears whose output is scaled
    ia3_in: set[str] = field(default_factory=set)  # linears whose input is scaled
    adapters: dict[str, int] = field(default_factory=dict)  # linear followed by an adapter -> bottleneck
    virtual_tokens: int = 0  # prompt tuning: positions added in front of every row
    prefix: int = 0  # prefix tuning: trained key/value positions per block
    quant_bits: int = 0
    double_quant: bool = True
    full_logits: bool = False  # no trained-position shortcut
    input_grad: bool = False  # the embedding output requires grad


def _options(config: RunConfig) -> dict:
    from tunelab.config.load import method_options

    try:
        return method_options(config).model_dump()
    except KeyError:  # not registered in this checkout: the raw options
        return config.method.options()


def _names(targets) -> list[str]:
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    return [t.rsplit(".", 1)[-1] for t in targets if t.rsplit(".", 1)[-1] in _LINEARS]


def _method(config: RunConfig, shape: ModelShape) -> _Method:
    name, opts, lin = config.method.name, _options(config), shape.linears()
    table, m = shape.parameter_table(), _Method()
    if name == "full":
        m.trainable = set(table)
    elif name == "freeze":
        first = shape.layers - int(opts.get("last_n_blocks", 2))
        patterns = [re.compile(p) for p in opts.get("modules") or []]
        m.trainable = {n for n in table if (n.startswith("model.layers.") and int(n.split(".")[2]) >= first)
                       or any(p.search(n) for p in patterns)}
    elif name in ("lora", "qlora"):
        targets = opts.get("target_modules", "all-linear")
        r = int(opts.get("r", 16))
        m.lora = {t: r for t in (list(_LINEARS) if targets == "all-linear" else _names(targets))}
        m.dropout = float(opts.get("dropout", 0.05))
        dora = bool(opts.get("use_dora"))
        tokens = opts.get("trainable_token_indices") or []
        m.extra = shape.layers * sum(r * (lin[t][0] + lin[t][1]) + dora * lin[t][1] for t in m.lora)
        m.extra += len(tokens) * shape.hidden
        m.input_grad = bool(tokens)
        if name == "qlora":
            m.quant_bits, m.double_quant = int(opts.get("bits", 4)), bool(opts.get("double_quant", True))
    elif name == "ia3":
        default_out, default_in = _ia3_defaults(shape.model_type)
        targets = set(_names(opts.get("target_modules") or default_out))
        m.ia3_in = targets & set(_names(opts.get("feedforward_modules") or default_in))
        m.ia3_out = targets - m.ia3_in
        m.extra = shape.layers * (sum(lin[t][1] for t in m.ia3_out) + sum(lin[t][0] for t in m.ia3_in))
    elif name == "prompt":
        m.virtual_tokens = int(opts.get("num_virtual_tokens", 20))
        m.extra, m.full_logits, m.input_grad = m.virtual_tokens * shape.hidden, True, True
    elif name == "prefix":
        m.prefix, width = int(opts.get("num_virtual_tokens", 20)), shape.layers * 2 * shape.kv_heads * shape.head_dim
        hidden = int(opts.get("projection_hidden", 512))
        m.extra = (m.prefix * shape.hidden + shape.hidden * hidden + hidden + hidden * width + width
                   if opts.get("projection") else m.prefix * width)
        m.full_logits = True
    elif name == "adapter":
        bottleneck = int(opts.get("bottleneck", 64))
        m.adapters = {t: bottleneck for t in _names(opts.get("target_modules") or ["o_proj", "down_proj"])}
        m.extra = shape.layers * sum(2 * lin[t][1] * bottleneck + bottleneck + lin[t][1] for t in m.adapters)
    else:
        raise TunelabError(f"tunelab plan does not model method {name!r}; it models full, freeze, lora, qlora, "
                           "ia3, prompt, prefix and adapter")
    try:
        from tunelab.training.loss import _PLAIN_HEAD_MODEL_TYPES as plain
    except ImportError:  # the loss module changed: assume the families it has always covered
        plain = frozenset({"llama", "mistral", "qwen2", "qwen3"})
    m.full_logits = m.full_logits or shape.model_type not in plain
    return m


def _ia3_defaults(model_type: str) -> tuple[list[str], list[str]]:
    """peft's default IA3 targets and feed-forward targets for an architecture (llama's if unknown)."""
    try:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as feedforward,
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as targets,
        )
    except ImportError:
        return ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    return targets.get(model_type, targets["llama"]), feedforward.get(model_type, feedforward["llama"])


# ---------------------------------------------------------------------------------- activation tracer
@dataclass(frozen=True)
class _T:
    """A symbolic activation: ``width`` elements per token of ``nbytes`` each."""

    name: str
    width: float
    nbytes: int
    grad: bool  # requires grad


@dataclass(frozen=True)
class _Env:
    w: int  # bytes per element of the base float weights
    c: int  # compute bytes
    autocast: bool
    gpu: bool
    liger: bool = False
    gqa_repeat: bool = False  # k/v expanded to all heads (sdpa with a mask)
    quant_bits: int = 0
    mask_kv: int = 0  # key positions of the attention mask per query (0: no mask)
    kv_scale: float = 1.0  # key/value positions per query position ((T + P) / T with a prefix)


class _Block:
    """Symbolic forward of decoder block ``index``: ``saved`` holds the bytes per token autograd keeps."""

    def __init__(self, env: _Env, shape: ModelShape, method: _Method, index: int):
        self.env, self.shape, self.m, self.i = env, shape, method, index
        self.saved: dict[str, float] = {}
        self.weight_copies = 0  # bytes of c-byte weight casts kept for backward
        self.down_cast = False  # LoRA casts a 16-bit down_proj input to float32
        self._count = 0

    def keep(self, t: _T) -> None:
        self.saved[t.name] = t.width * t.nbytes

    def new(self, name: str, width: float, nbytes: int, grad: bool) -> _T:
        self._count += 1
        return _T(f"{name}#{self._count}", width, nbytes, grad)

    def cast(self, t: _T, nbytes: int, tag: str) -> _T:
        return t if t.nbytes == nbytes else _T(f"{t.name}>{nbytes}:{tag}", t.width, nbytes, t.grad)

    def amp(self, t: _T, tag: str) -> _T:
        """The input of a lower-precision op under autocast: every consumer casts its own copy."""
        return self.cast(t, self.env.c, tag) if self.env.autocast else t

    def norm(self, x: _T, name: str) -> _T:
        trains = f"model.layers.{self.i}.{name}.weight" in self.m.trainable
        if self.env.liger:
            if x.grad:
                self.keep(x)
            return self.new(name, x.width, x.nbytes, x.grad or trains)
        if x.grad:
            self.keep(self.cast(x, 4, name))  # pow() and the rsqrt product keep the float32 input
        if trains:
            self.keep(self.new(name + ".normed", x.width, x.nbytes, x.grad))
        return self.new(name, x.width, max(x.nbytes, self.env.w), x.grad or trains)

    def linear(self, x: _T, name: str) -> _T:
        env, m, (d_in, d_out, _) = self.env, self.m, self.shape.linears()[name]
        trains = _param(self.i, name) in m.trainable
        if env.quant_bits:  # bitsandbytes: cast to the compute dtype and back; keeps only the packed weight
            out = self.new(name, d_out, x.nbytes, x.grad)
        else:
            if trains:
                self.keep(self.amp(x, name))
            if (x.grad or trains) and env.autocast and env.w != env.c:
                self.weight_copies += d_in * d_out * env.c
            out = self.new(name, d_out, env.c if env.autocast else max(x.nbytes, env.w), x.grad or trains)
        if name in m.ia3_in:
            self.keep(self.cast(x, 4, name + ".ia3"))
        if name in m.ia3_out:
            self.keep(out)
            out = self.new(name + ".ia3", d_out, out.nbytes, True)
        if name in m.lora:
            xa = self.cast(x, 4, name + ".lora")  # peft casts the input to the (float32) adapter dtype
            if m.dropout > 0:
                if x.grad:
                    self.keep(self.new(name + ".mask", d_in, 1 if env.gpu else 4, False))
                xa = self.new(name + ".drop", d_in, 4, x.grad)
            self.keep(self.amp(xa, name + ".A"))
            self.keep(self.new(name + ".mid", m.lora[name], env.c if env.autocast else 4, True))
            if env.autocast and env.c != 4:  # autocast caches c-byte copies of float32 leaf weights
                self.weight_copies += m.lora[name] * (d_in + d_out) * env.c
            out = self.new(name + ".sum", d_out, out.nbytes, True)
        if name in m.adapters:  # Houlsby: y + up(act(down(y))) in the layer's weight dtype
            a_in = self.amp(self.cast(out, 4 if env.quant_bits else env.w, name + ".ad"), name + ".down")
            self.keep(a_in)
            self.keep(self.new(name + ".ad.h", m.adapters[name], a_in.nbytes, True))
            self.keep(self.new(name + ".ad.act", m.adapters[name], a_in.nbytes, True))
            out = self.new(name + ".ad.out", d_out, out.nbytes, True)
        return out

    def attention(self, h: _T, q: _T, k: _T, v: _T) -> _T:
        s, env = self.shape, self.env
        if env.liger:  # in-place rotary: dtype unchanged
            q, k = self.new("q_rope", q.width, q.nbytes, q.grad), self.new("k_rope", k.width, k.nbytes, k.grad)
        else:  # cos/sin carry the hidden dtype, so the products are promoted to it
            q = self.new("q_rope", q.width, max(q.nbytes, h.nbytes), q.grad)
            k = self.new("k_rope", k.width, max(k.nbytes, h.nbytes), k.grad)
        if self.m.prefix:  # the trained prefix is concatenated in front of k and v
            k, v = self.new("k_pre", k.width, k.nbytes, True), self.new("v_pre", v.width, v.nbytes, True)
        if env.gqa_repeat and s.kv_heads != s.heads:
            k, v = self.new("k_rep", q.width, k.nbytes, k.grad), self.new("v_rep", q.width, v.nbytes, v.grad)
        k, v = (replace(t, width=t.width * env.kv_scale) for t in (k, v))
        ins = [self.amp(t, "sdpa") for t in (q, k, v)]
        grad = any(t.grad for t in ins)
        out = self.new("attn", q.width, ins[0].nbytes, grad)
        if grad:
            for t in (*ins, out):
                self.keep(t)
            self.keep(self.new("lse", s.heads, 4, False))
            if env.mask_kv:  # sdpa turns the boolean mask into an additive one of the query dtype
                self.keep(self.new("mask", env.mask_kv, ins[0].nbytes, False))
        return out

    def forward(self, h: _T) -> _T:
        """The block's output for input ``h`` (B, T, d); records what is kept on the way."""
        x = self.norm(h, "input_layernorm")
        o = self.linear(self.attention(h, *(self.linear(x, n) for n in ("q_proj", "k_proj", "v_proj"))), "o_proj")
        h2 = self.new("h2", self.shape.hidden, max(h.nbytes, o.nbytes), h.grad or o.grad)
        x = self.norm(h2, "post_attention_layernorm")
        g, u = self.linear(x, "gate_proj"), self.linear(x, "up_proj")
        if g.grad:
            self.keep(g)  # SiLU's input
        if self.env.liger:  # fused SwiGLU recomputes SiLU
            if u.grad or g.grad:
                self.keep(u)
        else:
            act = self.new("act", g.width, g.nbytes, g.grad)
            if u.grad:
                self.keep(act)
            if act.grad:
                self.keep(u)
        p = self.new("prod", g.width, max(g.nbytes, u.nbytes), g.grad or u.grad)
        y = self.linear(p, "down_proj")
        self.down_cast = "down_proj" in self.m.lora and p.nbytes != 4
        return self.new("h3", self.shape.hidden, max(h2.nbytes, y.nbytes), h2.grad or y.grad)

    def workspace(self) -> float:
        """Bytes per token of gradient buffers alive in this block's backward (the MLP's are the widest)."""
        extra = 4 + (4 if self.m.dropout > 0 else 0) if self.down_cast else 0
        return ((2 if self.env.liger else 3) * self.env.c + extra) * self.shape.intermediate


# --------------------------------------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    """Bytes at the peak phase of a training step, by component; ``phases`` has every phase's tensor bytes."""

    weights: int  # base model weights (quantised where the method says so)
    trainable_weights: int  # parameters the method adds (LoRA, adapters, prompts)
    gradients: int
    optimizer_states: int  # AdamW exp_avg + exp_avg_sq
    activations: int  # tensors autograd keeps for backward (checkpoints, a recomputed block included)
    weight_copies: int  # c-byte casts of float32 weights kept under autocast
    logits: int  # logits, float32 log-softmax and its gradients (or liger's chunk)
    attention_mask: int  # the boolean 4-D mask of a padded or packed batch
    workspace: int  # gradient buffers of the block in backward, or the optimizer's temporaries
    overhead: int  # CUDA context and allocator slack (GPU) or the Python process (CPU)
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)

    def components(self) -> dict[str, int]:
        keys = ("weights", "trainable_weights", "gradients", "optimizer_states", "activations", "weight_copies",
                "logits", "attention_mask", "workspace", "overhead")
        return {k: getattr(self, k) for k in keys}

    @property
    def total(self) -> int:
        return sum(self.components().values())

    @property
    def tensors(self) -> int:
        """Peak bytes of live tensors: what ``torch.cuda.max_memory_allocated`` reports."""
        return self.total - self.overhead


@dataclass(frozen=True)
class _Batch:
    rows: int
    seq: int  # tokens per row, virtual tokens excluded
    logit_rows: float  # positions projected onto the vocabulary
    mask: bool  # a 4-D attention mask exists (padding, packing or a prefix)


def _weight_bytes(shape: ModelShape, m: _Method, w: int) -> int:
    table = shape.parameter_table()
    if not m.quant_bits:
        return w * sum(table.values())
    per = 1.0 if m.quant_bits == 8 else 0.5 + (1 / 64 + 4 / (64 * 256) if m.double_quant else 4 / 64)
    quantised = sum(n for k, n in table.items() if k.endswith("_proj.weight"))
    return int(per * quantised + 4 * (sum(table.values()) - quantised))


def _estimate_memory(shape: ModelShape, m: _Method, env: _Env, batch: _Batch, *, checkpointing: bool,
                     grad_accum: int, held_logits: bool) -> MemoryEstimate:
    table = shape.parameter_table()
    pbytes = 4 if m.quant_bits else env.w
    added = m.extra * m.extra_bytes
    grads = sum(n for k, n in table.items() if k in m.trainable) * pbytes + added
    weights, opt = _weight_bytes(shape, m, env.w), 2 * grads
    tokens = batch.rows * (batch.seq + m.virtual_tokens)
    # the embedding output needs a gradient for a soft prompt, a trained embedding, or qlora's checkpointing
    h = _T("h0", shape.hidden, pbytes, m.input_grad or "model.embed_tokens.weight" in m.trainable
           or bool(m.quant_bits and checkpointing))
    blocks: list[tuple[float, float, int, float, float]] = []  # per block on the gradient path:
    saved = inputs = copies = 0.0  # (saved, input, weight copies, trained bytes, workspace)
    for i in range(shape.layers):
        block = _Block(env, shape, m, i)
        out = block.forward(h)
        if out.grad:
            own = sum(n for k, n in table.items() if k.startswith(f"model.layers.{i}.") and k in m.trainable) * pbytes
            blocks.append((sum(block.saved.values()), h.width * h.nbytes, block.weight_copies,
                           own + added / shape.layers, block.workspace()))
            inputs += h.width * h.nbytes
        saved, copies, h = saved + sum(block.saved.values()), copies + block.weight_copies, out
    head_trains = shape.head_param in m.trainable
    head = (4 * shape.hidden if h.grad and not env.liger else h.width * h.nbytes) * tokens  # final norm input
    head += h.width * h.nbytes * tokens if "model.norm.weight" in m.trainable else 0
    head += (env.c if env.autocast else h.nbytes) * shape.hidden * batch.logit_rows if head_trains else 0
    head_copy = shape.vocab * shape.hidden * env.c if h.grad and env.autocast and env.w != env.c else 0
    if env.liger:  # fused linear cross-entropy: a float32 hidden-size gradient and one chunk of logits
        rows_per_chunk = batch.logit_rows / math.ceil(shape.vocab / shape.hidden)
        chunk = min(batch.logit_rows, 2 ** math.ceil(math.log2(max(1.0, rows_per_chunk))))
        logits_fwd = logits_bwd = int(batch.logit_rows * shape.hidden * 4 + chunk * shape.vocab * 8)
    else:
        held = env.c if held_logits else 0
        logits_bwd = int(batch.logit_rows * shape.vocab * (12 + held))
        logits_fwd = int(batch.logit_rows * shape.vocab * (12 if m.full_logits else 8 + held))
    mask = batch.rows * batch.seq * (batch.seq + m.virtual_tokens + m.prefix) if batch.mask else 0
    static = weights + added + opt + (grads if grad_accum > 1 else 0)
    acts = int((inputs if checkpointing else saved) * tokens + head)
    kept = int(head_copy + (0 if checkpointing else copies))
    # autocast caches a copy of every trained float32 matmul weight for the whole forward
    cache = int(sum(n for k, n in table.items() if k in m.trainable and k.endswith("_proj.weight")) * env.c
                ) if checkpointing and env.autocast and env.w != env.c else 0
    head_grad = shape.vocab * shape.hidden * pbytes if head_trains else 0
    # back-propagating block j: earlier blocks' activations, later blocks' gradients, j's working set
    back = (0, 0, 0, 0, 0)  # (total, activations, weight copies, gradients, workspace)
    done = head_grad if grad_accum == 1 else 0
    left_saved, left_inputs, left_copies = saved * tokens, inputs * tokens, copies
    for one_saved, one_input, one_copies, own, work in reversed(blocks):
        if checkpointing:
            a, c = left_inputs + one_saved * tokens, one_copies
        else:
            a, c = left_saved, left_copies
        live = (int(a), int(c), int(done), int(work * tokens))
        back = max(back, (sum(live), *live))
        done += own if grad_accum == 1 else 0  # j's weight gradients replace its activations as it finishes
        left_saved, left_inputs = left_saved - one_saved * tokens, left_inputs - one_input * tokens
        left_copies -= one_copies
    largest = max([n for k, n in table.items() if k in m.trainable] + [0]) * pbytes
    opt_temp = grads if env.gpu else 2 * largest  # foreach AdamW on CUDA; per-tensor sqrt/div on CPU
    phases = {
        "forward (loss)": static + acts + max(kept, cache + head_copy) + logits_fwd + mask,
        "backward (loss)": static + acts + kept + logits_bwd + mask,
        "backward (blocks)": static + back[0] + mask,
        "optimizer step": static + (grads if grad_accum == 1 else 0) + opt_temp,
    }
    peak = max(phases, key=phases.__getitem__)
    parts = dict(weights=weights, trainable_weights=added, gradients=grads if grad_accum > 1 else 0, optimizer_states=opt,
                 activations=acts, weight_copies=kept, logits=0, attention_mask=mask, workspace=0)
    if peak == "forward (loss)":
        parts.update(weight_copies=max(kept, cache + head_copy), logits=logits_fwd)
    elif peak == "backward (loss)":
        parts.update(logits=logits_bwd)
    elif peak == "backward (blocks)":
        parts.update(activations=back[1], weight_copies=back[2], gradients=parts["gradients"] + back[3], workspace=back[4])
    else:
        parts.update(gradients=grads, workspace=opt_temp, activations=0, weight_copies=0, attention_mask=0)
    return MemoryEstimate(**parts, overhead=GPU_OVERHEAD if env.gpu else CPU_OVERHEAD, peak_phase=peak, phases=phases)


# ----------------------------------------------------------------------------------------------- time
@dataclass
class TimeEstimate:
    flops_per_token: float
    tokens_per_epoch: int | None
    tokens_source: str  # where tokens_per_epoch comes from, or why it is unknown
    total_tokens: float | None
    steps: int | None
    peak_flops: float | None  # the FLOP/s the MFU applies to
    mfu: float
    seconds: float | None


def _flops_per_token(shape: ModelShape, m: _Method, row: float, completion: float, checkpointing: bool) -> float:
    """Training FLOPs per token (see the module docstring); ``row`` = mean tokens per row."""
    block = sum(a * b for a, b, _ in shape.linears().values())
    attn = 2 * shape.heads * shape.head_dim * (row + m.virtual_tokens + m.prefix)  # causal QK^T and AV
    in_path = m.input_grad or m.prefix > 0 or "model.embed_tokens.weight" in m.trainable
    total = 0.0
    for i in range(shape.layers):
        trained = sum(a * b for k, (a, b, _) in shape.linears().items() if _param(i, k) in m.trainable)
        in_path = in_path or trained > 0 or bool(m.lora or m.ia3_out or m.ia3_in or m.adapters)
        total += 2 * block + attn
        if in_path:
            total += 2 * block + 2 * trained + 2 * attn + (2 * block + attn if checkpointing else 0)
    head = shape.vocab * shape.hidden * (1.0 if m.full_logits else completion)
    total += 2 * head * (1 + in_path + (shape.head_param in m.trainable))
    return total + 6 * m.extra


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataProfile:
    """The tokenised training data of one epoch, batched as tunelab batches it."""

    examples: int
    tokens: int  # real tokens
    trained_tokens: int
    processed_tokens: int  # tokens of the padded (or packed) micro-batches
    longest: int
    peak_rows: int  # the micro-batch with the most tokens: its rows and its tokens per row
    peak_seq: int
    peak_trained: int  # the most trained positions in one micro-batch


def profile_data(config: RunConfig) -> DataProfile:
    """Tokenise the training data with the model's tokenizer (no weights) and measure its micro-batches."""
    import torch

    from tunelab.recipes.setup import load_prepared_tokenizer, read_examples, tokenize

    _, tokenizer, added = load_prepared_tokenizer(config)
    data = tokenize(config, tokenizer, read_examples(config), added).train
    lengths = [len(ex.input_ids) for ex in data]
    trained = [sum(1 for t in ex.labels[1:] if t != -100) for ex in data]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.train.seed * 1_000_003)).tolist()
    b, processed, peak = config.train.batch_size, 0, (0, 1, 1)
    for start in range(0, len(order), b):
        ids = order[start:start + b]
        rows, seq = (1, sum(lengths[i] for i in ids)) if config.train.packing else (len(ids), max(lengths[i] for i in ids))
        processed += rows * seq
        peak = max(peak, (rows * seq, rows, seq))
    most_trained = max(sum(trained[i] for i in order[s:s + b]) for s in range(0, len(order), b))
    return DataProfile(len(data), sum(lengths), sum(trained), processed, max(lengths), peak[1], peak[2], most_trained)


def _count_examples(config: RunConfig) -> int | None:
    """Records in data.train, read but not tokenised; None if a file cannot be read."""
    from tunelab.data.readers import read_file

    total = 0
    for path in config.data.train_files():
        raw = read_file(path)
        if any(position == 0 for position, _ in raw.problems):
            return None
        total += len(raw.records)
    return total


# ----------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Everything ``tunelab plan`` predicts for one config on one device."""

    model: str
    shape: ModelShape
    method: str
    device: Device
    precision: str  # resolved: fp32 / bf16 / fp16
    weight_bytes: int  # per base parameter (model.dtype)
    batch: tuple[int, int]  # (rows, tokens per row) of the largest micro-batch
    gradient_checkpointing: bool
    total_params: int
    trainable_params: int
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool
    tight: bool  # fits with under 5 % to spare: allocator fragmentation may tip it over
    fits_by_gpu: dict[str, bool]
    time_by_gpu: dict[str, float | None]
    suggestions: list[str]
    assumptions: list[str]


@dataclass(frozen=True)
class _Knobs:
    tokens_per_epoch: int | None = None
    data: DataProfile | None = None
    completion_fraction: float = 1.0
    mfu: float | None = None
    kernels: Literal["hf", "liger"] = "hf"
    held_logits: bool = False
    padded: bool = True


def _precision(config: RunConfig, device: Device) -> str:
    """``train.precision`` resolved as the training loop resolves it."""
    precision = config.train.precision
    if precision == "auto":
        return "bf16" if device.kind == "gpu" else "fp32"
    if precision == "fp16" and device.kind == "cpu":
        raise TunelabError("train.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    return precision


def _memory_of(config: RunConfig, shape: ModelShape, device: Device, knobs: _Knobs) -> tuple[MemoryEstimate, _Method, _Batch]:
    from tunelab.models.load import torch_dtype

    precision, w, m = _precision(config, device), torch_dtype(config.model.dtype).itemsize, _method(config, shape)
    if config.method.name == "adapter":
        m.extra_bytes = w
    t, d, train = config.data.max_length, knobs.data, config.train
    if d is not None:
        rows, seq = d.peak_rows, d.peak_seq
        logit_rows = rows * (seq - 1) if m.full_logits else d.peak_trained
    else:
        rows, seq = (1, train.batch_size * t) if train.packing else (train.batch_size, t)
        logit_rows = train.batch_size * (t - 1) * (1.0 if m.full_logits else knobs.completion_fraction)
    batch = _Batch(rows, seq, logit_rows, knobs.padded or train.packing or m.prefix > 0)
    mixed = precision in ("bf16", "fp16")
    base = 4 if m.quant_bits else w
    env = _Env(w=base, c=2 if mixed else base, autocast=mixed, gpu=device.kind == "gpu", liger=knobs.kernels == "liger",
               gqa_repeat=batch.mask, quant_bits=m.quant_bits, kv_scale=(seq + m.prefix) / seq,
               mask_kv=seq + m.virtual_tokens + m.prefix if batch.mask else 0)
    memory = _estimate_memory(shape, m, env, batch, checkpointing=train.gradient_checkpointing,
                              grad_accum=train.grad_accum, held_logits=knobs.held_logits)
    return memory, m, batch


def plan(config: RunConfig, gpu: str | None = None, *, tokens_per_epoch: int | None = None, data: DataProfile | None = None,
         completion_fraction: float = 1.0, mfu: float | None = None, kernels: Literal["hf", "liger"] = "hf",
         held_logits: bool = False, padded: bool = True) -> Plan:
    """Predict the peak memory and the training time of ``config`` on ``gpu``, from the model's config.json.

    Args:
        config: The run configuration.
        gpu: A name from :data:`GPUS`, ``cpu``, or ``current``/None (this machine).
        tokens_per_epoch: Tokens one epoch processes (padding included), if known.
        data: A :func:`profile_data` result: its largest micro-batch sets the memory, its tokens the time.
        completion_fraction: Share of positions that are trained (only they get logits); 1.0 = worst case.
        mfu: Model FLOPs utilisation to assume (default 0.35 on a GPU, ``CPU_MFU`` on CPU).
        kernels: ``liger`` models liger-kernel's RMSNorm/SwiGLU/RoPE and fused linear cross-entropy.
        held_logits: The loop keeps the output logits through backward (HF's ``out.loss.backward()``).
        padded: Rows carry a padding mask (sdpa then expands k/v to all heads); False for equal-length rows.

    Raises:
        TunelabError: unknown GPU, unreadable model config, a method the planner does not model.
    """
    from tunelab.models.load import torch_dtype

    if not 0 < completion_fraction <= 1:
        raise TunelabError("completion_fraction must be in (0, 1]: the share of positions whose next token is trained")
    device, shape = resolve_device(gpu), load_shape(config)
    knobs = _Knobs(tokens_per_epoch, data, completion_fraction, mfu, kernels, held_logits, padded)
    memory, m, batch = _memory_of(config, shape, device, knobs)
    table = shape.parameter_table()
    examples = data.examples if data else _count_examples(config)
    time_on = {name: _estimate_time(config, shape, m, g, knobs, examples) for name, g in GPUS.items()}
    gpu_memory = memory if device.kind == "gpu" else _memory_of(config, shape, GPUS["h100-80gb"], knobs)[0]
    fits = memory.total <= device.memory_bytes
    result = Plan(
        config.model.path, shape, config.method.name, device, _precision(config, device),
        torch_dtype(config.model.dtype).itemsize,
        (batch.rows, batch.seq + m.virtual_tokens), config.train.gradient_checkpointing,
        sum(table.values()) + m.extra, sum(n for k, n in table.items() if k in m.trainable) + m.extra,
        memory, _estimate_time(config, shape, m, device, knobs, examples), fits,
        fits and memory.total > 0.95 * device.memory_bytes,
        {name: gpu_memory.total <= g.memory_bytes for name, g in GPUS.items()},
        {name: t.seconds for name, t in time_on.items()}, [], [],
    )
    if not fits or result.tight:
        result.suggestions = _suggest(config, shape, device, knobs)
    result.assumptions = _assumptions(result, knobs, m)
    return result


def _estimate_time(config: RunConfig, shape: ModelShape, m: _Method, device: Device, knobs: _Knobs,
                   examples: int | None) -> TimeEstimate:
    train, d = config.train, knobs.data
    if knobs.tokens_per_epoch:
        tokens, source = knobs.tokens_per_epoch, "given"
    elif d:
        tokens, source = d.processed_tokens, "tokenised data (padded micro-batches)"
    elif examples is not None:
        tokens, source = examples * config.data.max_length, "examples x max_length (an upper bound: most examples are shorter)"
    else:
        tokens, source = None, "unknown: data.train could not be read (pass the tokens per epoch)"
    steps = None
    if examples:
        per_epoch = math.ceil(math.ceil(examples / train.batch_size) / train.grad_accum)
        steps = train.max_steps or max(1, math.ceil(train.epochs * per_epoch))
    row = tokens / examples if tokens and examples else config.data.max_length
    if train.max_steps:
        total = train.max_steps * train.grad_accum * train.batch_size * row
    else:
        total = tokens * train.epochs if tokens else None
    if total and m.virtual_tokens:  # every row also runs the soft prompt
        total *= (row + m.virtual_tokens) / row
    completion = d.trained_tokens / max(d.tokens, 1) if d else knobs.completion_fraction
    flops = _flops_per_token(shape, m, row, completion, train.gradient_checkpointing)
    peak = device.peak_flops(_precision(config, device))
    mfu = knobs.mfu or (GPU_MFU if device.kind == "gpu" else CPU_MFU)
    seconds = total * flops / (peak * mfu) if total and peak else None
    return TimeEstimate(flops, tokens, source, total, steps, peak, mfu, seconds)


def _suggest(config: RunConfig, shape: ModelShape, device: Device, knobs: _Knobs) -> list[str]:
    """Changes that lower the peak, tried in order and kept when they help, until the run fits."""
    from tunelab.config.schema import MethodConfig

    limit, out = device.memory_bytes, []
    current, best = config, _memory_of(config, shape, device, knobs)[0].total

    def attempt(change: str, mutate) -> bool:
        """Apply ``mutate`` to a copy of the current config; keep it if it lowers the peak. True once it fits."""
        nonlocal current, best
        candidate = current.model_copy(deep=True)
        mutate(candidate)
        total = _memory_of(candidate, shape, device, knobs)[0].total
        if total < best:
            current, best = candidate, total
            out.append(f"{'+ ' if out else ''}{change}: {total / GiB:.1f} GiB ({'fits' if total <= limit else 'still too big'})")
        return best <= 0.95 * limit

    def set_attr(section: str, key: str, value):
        return lambda cfg: setattr(getattr(cfg, section), key, value)

    name = config.method.name
    if not config.train.gradient_checkpointing and name not in ("prompt", "prefix"):
        if attempt("train.gradient_checkpointing=true", set_attr("train", "gradient_checkpointing", True)):
            return out
    if name in _FROZEN_BASE and name != "qlora" and config.model.dtype in ("auto", "float32") and device.kind == "gpu":
        if attempt("model.dtype=bfloat16 (the frozen base in bf16; trained weights stay float32)",
                   set_attr("model", "dtype", "bfloat16")):
            return out
    if name == "lora" and attempt("method.name=qlora (4-bit base)",
                                  lambda cfg: setattr(cfg, "method", MethodConfig(name="qlora", **cfg.method.options()))):
        return out
    while current.train.batch_size > 1:
        batch = current.train.batch_size
        half = batch // 2 if batch % 2 == 0 else 1
        accum = current.train.grad_accum * batch // half
        if attempt(f"train.batch_size={half} train.grad_accum={accum} (same effective batch)",
                   lambda cfg: (set_attr("train", "batch_size", half)(cfg), set_attr("train", "grad_accum", accum)(cfg))):
            return out
        if current.train.batch_size == batch:  # the peak does not depend on the batch (optimizer step)
            break
    while current.data.max_length > 256:
        length = current.data.max_length // 2
        if attempt(f"data.max_length={length} (longer examples are truncated or dropped)", set_attr("data", "max_length", length)):
            return out
        if current.data.max_length != length:
            break
    return out


def _assumptions(p: Plan, knobs: _Knobs, m: _Method) -> list[str]:
    gpu = p.device.kind == "gpu"
    overhead = "CUDA context + allocator slack" if gpu else "the Python process; glibc may hold more"
    notes = [f"runtime overhead {p.memory.overhead / GiB:.1f} GiB ({overhead})",
             f"largest micro-batch {p.batch[0]} x {p.batch[1]} tokens"
             + ("" if knobs.data else " (worst case: every row max_length long)")]
    if m.full_logits:
        notes.append("logits at every position (no trained-position shortcut for this method or model)")
    elif not knobs.data:
        notes.append(f"logits at {knobs.completion_fraction:.0%} of positions "
                     "(the completion fraction; 100% is the worst case)")
    if p.shape.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        notes.append(f"model type {p.shape.model_type!r} approximated by a llama-style block")
    if m.quant_bits:
        notes.append("quantised base: bitsandbytes layout (NF4 blocks of 64, double-quantised scales)")
    if p.time.seconds is not None:
        peak = (p.time.peak_flops or 0) / 1e12
        source = "measured matmul peak of the 2-core dev machine" if not gpu else "dense peak"
        notes.append(f"time: {p.time.flops_per_token / 1e9:.3g} GFLOP/token at {peak:.3g} TFLOP/s ({source}) x MFU "
                     f"{p.time.mfu:.2f} (assumed); tokens: {p.time.tokens_source}")
    else:
        why = p.time.tokens_source if p.time.total_tokens is None else "no FLOP/s figure for this device"
        notes.append(f"time unknown: {why}")
    return notes


# --------------------------------------------------------------------------------------------- output
_WHAT = {
    "weights": "base model", "trainable_weights": "added by the method", "gradients": "of trained parameters",
    "optimizer_states": "AdamW: 2 per trained parameter", "activations": "kept for backward",
    "weight_copies": "autocast copies of float32 weights", "logits": "logits, float32 log-softmax, gradients",
    "attention_mask": "4-D mask of padded/packed rows", "workspace": "gradient buffers / optimizer temporaries",
    "overhead": "runtime (assumed)",
}


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}" if n >= 0.005 * GiB else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def print_plan(plan: Plan, console) -> None:
    """Render a plan with rich: memory by component, verdict, time, the GPU catalog, suggestions, assumptions."""
    from rich.table import Table

    mem, dev, t = plan.memory, plan.device, plan.time
    console.print(f"[bold]{plan.method}[/] on {plan.model}: {plan.trainable_params:,} trainable of {plan.total_params:,} "
                  f"parameters; {plan.precision}, {plan.weight_bytes} B per weight, "
                  f"micro-batch {plan.batch[0]} x {plan.batch[1]}{', gradient checkpointing' if plan.gradient_checkpointing else ''}")
    table = Table(title=f"Peak memory (during the {mem.peak_phase})")
    for column, justify in (("component", "left"), ("GiB", "right"), ("what", "left")):
        table.add_column(column, justify=justify)
    for name, value in mem.components().items():
        if value:
            table.add_row(name.replace("_", " "), _gib(value), _WHAT[name])
    table.add_row("[bold]total[/]", f"[bold]{_gib(mem.total)}[/]", f"tensors {_gib(mem.tensors)} GiB + overhead")
    console.print(table)
    console.print("tensors by phase (GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.phases.items()))
    verdict = "[red]does not fit[/]" if not plan.fits else "[yellow]fits, tight[/]" if plan.tight else "[green]fits[/]"
    spare = (dev.memory_bytes - mem.total) / GiB
    console.print(f"{dev.name} ({dev.memory_bytes / GiB:.1f} GiB): {verdict}, {spare:+.1f} GiB to spare")
    steps = f" for {t.steps} steps" if t.steps else ""
    console.print(f"time: ~{_duration(t.seconds)}{steps}" + (f", {t.total_tokens:,.0f} tokens" if t.total_tokens else ""))
    gpus = Table(title="Other GPUs")
    for column in ("gpu", "GiB", "fits", "time"):
        gpus.add_column(column)
    for name, g in GPUS.items():
        fits = "yes" if plan.fits_by_gpu[name] else "no"
        gpus.add_row(name, f"{g.memory_bytes / GiB:.0f}", fits, _duration(plan.time_by_gpu[name]))
    console.print(gpus)
    if plan.suggestions:
        console.print("[bold]To make it fit[/] (cumulative):")
        for line in plan.suggestions:
            console.print(f"  {line}")
    console.print("[dim]Assumptions:[/]")
    for line in plan.assumptions:
        console.print(f"[dim]  - {line}[/]")
