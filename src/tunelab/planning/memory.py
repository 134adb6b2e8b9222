"""Peak memory of one optimizer step: a symbolic activation tracer of the decoder block and the four phases.
Hand-written: accelerate's ``estimate-memory`` counts weights and a fixed optimizer multiple only; no
library models the activations, partial logits and dtype casts of a given training loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tunelab.planning.devices import CPU_OVERHEAD, GPU_OVERHEAD
from tunelab.planning.method import PlannedMethod
from tunelab.planning.shape import ModelShape, param_name
from tunelab.training.linear_cross_entropy import chunk_rows


# ---------------------------------------------------------------------------------- activation tracer
@dataclass(frozen=True)
class _T:
    """A symbolic activation: ``width`` elements per token of ``nbytes`` each."""

    name: str
    width: float
    nbytes: int
    grad: bool  # requires grad


@dataclass(frozen=True)
class MemoryEnv:
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

    def __init__(self, env: MemoryEnv, shape: ModelShape, method: PlannedMethod, index: int):
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
        trains = param_name(self.i, name) in m.trainable
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
class PlannedBatch:
    rows: int
    seq: int  # tokens per row, virtual tokens excluded
    logit_rows: float  # positions projected onto the vocabulary
    mask: bool  # a 4-D attention mask exists (padding, packing or a prefix)


@dataclass(frozen=True)
class VisionCost:
    """Bytes a VLM's image side adds to the step (``tunelab.planning.vision``); zero for a text model. Weights and
    training state are static; the kept activations live through every phase but the optimizer step."""

    weights: int = 0  # the tower's and projector's weights
    added: int = 0  # adapters the method puts on them (trained)
    trained: int = 0  # their own weights that train (gradients and AdamW states follow)
    activations: int = 0  # kept for backward from the tower and projector forward, alive through the whole backward


def quantised_bytes(m: PlannedMethod) -> float:
    """Bytes per weight of a linear layer bitsandbytes quantises (its absmax scales included)."""
    return 1.0 if m.quant_bits == 8 else 0.5 + (1 / 64 + 4 / (64 * 256) if m.double_quant else 4 / 64)


def _weight_bytes(shape: ModelShape, m: PlannedMethod, w: int) -> int:
    table = shape.parameter_table()
    if not m.quant_bits:
        return w * sum(table.values())
    per = quantised_bytes(m)
    quantised = sum(n for k, n in table.items() if k.endswith("_proj.weight"))
    return int(per * quantised + 4 * (sum(table.values()) - quantised))


def estimate_memory(shape: ModelShape, m: PlannedMethod, env: MemoryEnv, batch: PlannedBatch, *, checkpointing: int,
                     grad_accum: int, held_logits: bool, vision: VisionCost = VisionCost()) -> MemoryEstimate:
    """``checkpointing``: how many blocks (the first ones) recompute their activations in backward."""
    table = shape.parameter_table()
    pbytes = 4 if m.quant_bits else env.w
    added = m.extra * m.extra_bytes
    grads = sum(n for k, n in table.items() if k in m.trainable) * pbytes + added + vision.added + vision.trained
    weights, opt = _weight_bytes(shape, m, env.w) + vision.weights, 2 * grads
    tokens = batch.rows * (batch.seq + m.virtual_tokens)
    # the embedding output needs a gradient for a soft prompt, a trained embedding, or qlora's checkpointing
    h = _T("h0", shape.hidden, pbytes, m.input_grad or "model.embed_tokens.weight" in m.trainable
           or bool(m.quant_bits and checkpointing))
    # per block on the gradient path: (saved, kept until its backward, weight copies kept, its weight
    # copies, trained bytes, workspace, checkpointed); a checkpointed block keeps only its input
    blocks: list[tuple[float, float, int, int, float, float, bool]] = []
    stored = copies = 0.0  # bytes per token kept from the forward; weight copies kept
    for i in range(shape.layers):
        block = _Block(env, shape, m, i)
        out = block.forward(h)
        recomputed = i < checkpointing
        own_saved = sum(block.saved.values())
        keeps = (h.width * h.nbytes if out.grad else 0.0) if recomputed else own_saved
        keeps_copies = 0 if recomputed else block.weight_copies
        if out.grad:
            own = sum(n for k, n in table.items() if k.startswith(f"model.layers.{i}.") and k in m.trainable) * pbytes
            blocks.append((own_saved, keeps, keeps_copies, block.weight_copies, own + added / shape.layers,
                           block.workspace(), recomputed))
        stored, copies, h = stored + keeps, copies + keeps_copies, out
    head_trains = shape.head_param in m.trainable
    # tunelab's loop computes the loss of many trained positions in chunks (training/linear_cross_entropy.py)
    chunked = not (env.liger or m.full_logits or held_logits) and batch.logit_rows > chunk_rows(shape.vocab)
    head = (4 * shape.hidden if h.grad and not env.liger else h.width * h.nbytes) * tokens  # final norm input
    head += h.width * h.nbytes * tokens if "model.norm.weight" in m.trainable else 0
    if head_trains and not chunked:  # lm_head keeps its input for its weight gradient
        head += (env.c if env.autocast else h.nbytes) * shape.hidden * batch.logit_rows
    head_copy = shape.vocab * shape.hidden * env.c if h.grad and env.autocast and env.w != env.c else 0
    if env.liger:  # fused linear cross-entropy: a float32 hidden-size gradient and one chunk of logits
        rows_per_chunk = batch.logit_rows / math.ceil(shape.vocab / shape.hidden)
        chunk = min(batch.logit_rows, 2 ** math.ceil(math.log2(max(1.0, rows_per_chunk))))
        logits_fwd = logits_bwd = int(batch.logit_rows * shape.hidden * 4 + chunk * shape.vocab * 8)
    elif chunked:  # the gradients of the hidden states (and of lm_head) are formed in the forward
        grad_hidden = batch.logit_rows * shape.hidden * h.nbytes
        grad_head = shape.vocab * shape.hidden * 4 if head_trains else 0
        chunk = chunk_rows(shape.vocab) * shape.vocab * (4 + (env.c if env.autocast else env.w))
        logits_fwd = int(grad_hidden + grad_head + chunk)
        logits_bwd = int(2 * grad_hidden + grad_head + (shape.vocab * shape.hidden * env.w if head_trains else 0))
    else:
        held = env.c if held_logits else 0
        logits_bwd = int(batch.logit_rows * shape.vocab * (12 + held))
        logits_fwd = int(batch.logit_rows * shape.vocab * (12 if m.full_logits else 8 + held))
    mask = batch.rows * batch.seq * (batch.seq + m.virtual_tokens + m.prefix) if batch.mask else 0
    static = weights + added + vision.added + opt + (grads if grad_accum > 1 else 0)
    acts = int(stored * tokens + head) + vision.activations
    kept = int(head_copy + copies)
    # autocast caches a copy of every trained float32 matmul weight for the whole forward
    cache = int(sum(n for k, n in table.items() if k in m.trainable and k.endswith("_proj.weight")) * env.c
                ) if checkpointing and env.autocast and env.w != env.c else 0
    head_grad = shape.vocab * shape.hidden * pbytes if head_trains else 0
    # back-propagating block j: earlier blocks' activations, later blocks' gradients, j's working set
    back = (0, 0, 0, 0, 0)  # (total, activations, weight copies, gradients, workspace)
    done = head_grad if grad_accum == 1 else 0
    left_stored, left_copies = stored * tokens, copies  # kept by the blocks <= j
    for one_saved, keeps, keeps_copies, one_copies, own, work, recomputed in reversed(blocks):
        if recomputed:  # block j's activations are rebuilt next to its kept input
            a, c = left_stored + one_saved * tokens, left_copies + one_copies
        else:
            a, c = left_stored, left_copies
        live = (int(a) + vision.activations, int(c), int(done), int(work * tokens))
        back = max(back, (sum(live), *live))
        done += own if grad_accum == 1 else 0  # j's weight gradients replace its activations as it finishes
        left_stored, left_copies = left_stored - keeps * tokens, left_copies - keeps_copies
    # the loop's fused AdamW: in place on CUDA (not yet measured there); on CPU it still allocates about
    # two copies of the largest trained tensor (measured: SmolLM2 full fine-tuning, within 1 %)
    largest = max([n for k, n in table.items() if k in m.trainable] + [0]) * pbytes
    opt_temp = 0 if env.gpu else 2 * largest
    phases = {
        "forward (loss)": static + acts + max(kept, cache + head_copy) + logits_fwd + mask,
        "backward (loss)": static + acts + kept + logits_bwd + mask,
        "backward (blocks)": static + back[0] + mask,
        "optimizer step": static + (grads if grad_accum == 1 else 0) + opt_temp,
    }
    peak = max(phases, key=phases.__getitem__)
    parts = dict(weights=weights, trainable_weights=added + vision.added, gradients=grads if grad_accum > 1 else 0, optimizer_states=opt,
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
