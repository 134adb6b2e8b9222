"""``tunelab plan``: predict the peak memory and the time of a training config before running it.

Everything comes from the model's ``config.json`` (``AutoConfig``; weights are never loaded) and the run
config, for the loop of ``tunelab.recipes.sft``; for a vision-language model also the first image examples of the
data, through its processor (``planning.vision``). Bytes: ``w`` = weight dtype (``model.dtype``; auto =
float32, as ``tunelab.models.load`` loads it), ``c`` = compute dtype (2 under bf16/fp16 autocast, else
``w``). ``B`` micro-batch, ``T`` tokens per row, ``d`` hidden, ``I`` intermediate, ``L`` blocks, ``H``/``KV``
heads, ``hd`` head dim, ``V`` vocabulary, ``N`` parameters, ``P`` virtual tokens.

Parameters (exact for llama, mistral, qwen2, qwen3, qwen3_moe, mixtral; other decoders are approximated by the same block):
  block = d*H*hd + 2*d*KV*hd + H*hd*d (q,k,v,o; + q/k/v biases for qwen2) + 3*d*I (MLP) + 2*d (norms)
  MoE block: the MLP is E experts of 3*d*I_e (fused, as transformers stores them) + E*d (router); a token
  passes through k of the E (``num_experts_per_tok``): the plan says active and total parameters
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
                    shortcut) per logit; above ``chunk_rows(V)`` trained positions the loop's chunked
                    cross-entropy (training/linear_cross_entropy.py) holds instead an N*d gradient of the
                    hidden states (+ a float32 V*d one when lm_head trains) and one chunk of logits
                    (4 + c B per logit of the chunk).
  backward (loss)   static + activations + 12 B per logit: the float32 log-softmax output, its incoming and
                    its outgoing gradient are alive together (+ c when the loop keeps the output logits
                    through backward, as ``out = model(..., labels=...); out.loss.backward()`` does);
                    chunked: the saved gradients and their scaled copies.
  backward (blocks) the largest, over the blocks j in backward order, of static + the activations of blocks
                    <= j (with checkpointing: their inputs + block j recomputed) + the gradients of lm_head
                    and of the blocks after j + j's gradient working set per token: 3*c*I (2*c*I with
                    liger), + 4*I (+ 4*I with dropout) when LoRA casts a 16-bit down_proj input to float32.
  optimizer step    static + all gradients + the fused AdamW's temporaries (CUDA: none, in place; CPU:
                    two copies of the largest trained tensor).
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
input (w*d per token) and recomputes one block at a time; with ``train.gradient_checkpointing: auto`` only
the first k blocks are checkpointed, k the fewest that bring the peak under 95 % of the device's memory
(``checkpointed_blocks``). Liger kernels (``kernels="liger"``): RMSNorm
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
  Tokens: ``tokens_per_epoch`` if given, else a tokenised ``tunelab.stages.profile.profile_data``, else examples x
  max_length (an upper bound, and the plan says so).

Validation (live tensor bytes at the peak, estimate against measurement):
  * GPU, from the anchors (shared/anchors/README.md, H100, torch.cuda.max_memory_allocated; HF + peft
    LoRA r=16 all-linear and full fine-tuning, Llama-3.2-1B and 3.1-8B shapes, seq 2048, with and
    without checkpointing and liger): all 8 within 3 % (tests/unit/test_planning.py keeps them).
  * CPU, measured here with the torch profiler's allocation events (second step, Adam states present):
    SmolLM2-135M LoRA 4 x 512 and full 2 x 512 with every position trained (the chunked loss): within
    0.2 % (4.79 and 3.15 GiB); partial checkpointing of a tiny llama: within 10 % (tests);
    SmolLM2-135M full and LoRA at batch 4/8, seq 256/512, with and without checkpointing, qlora (4-bit,
    bitsandbytes CPU), padded rows with 30 % trained positions: 10 cases within 0.05 %; tiny llama/qwen2,
    every method: within 5 %; SmolLM2 blocks with a 512 vocabulary under bf16 autocast (the dtype
    behaviour of a GPU run): within 5 %. On CPU the process RSS is higher than the live tensors (glibc
    keeps freed blocks: 1.1-2.4x here), which the CPU overhead does not model.

Why hand-written: accelerate's ``estimate-memory`` counts weights and a fixed optimizer multiple only; no
library models the activations, partial logits and dtype casts of a given training loop.

Modules: ``devices`` (Device, the GPU catalog ``GPUS``, ``resolve_device``, overheads and MFU defaults),
``shape`` (ModelShape, ``load_shape``), ``method`` (what a tuning method trains and adds: each method's own ``footprint``, see
``tunelab.methods.footprint``), ``memory`` (the
activation tracer, MemoryEstimate), ``timing`` (TimeEstimate, FLOPs per token), ``data`` (DataProfile,
``profile_examples``; reading the data is ``stages.profile``), ``vision`` (a VLM's tower and projector: exact parameter
counts, the processor's image tokens per example, what ``method.train_vision`` trains and keeps; see its docstring),
``planner`` (Plan, ``plan``, the time estimate, suggestions), ``output`` (``print_plan``).
"""

from tunelab.planning.data import DataProfile, profile_examples
from tunelab.planning.devices import (
    CPU_MATMUL_GFLOPS, CPU_MFU, CPU_OVERHEAD, GPU_MFU, GPU_OVERHEAD, GPUS, Device, GiB, resolve_device,
)
from tunelab.planning.memory import MemoryEstimate
from tunelab.planning.output import print_plan
from tunelab.planning.planner import AUTO_CHECKPOINTING_SHARE, Plan, checkpointed_blocks, plan
from tunelab.planning.shape import ModelShape, load_shape
from tunelab.planning.timing import TimeEstimate

__all__ = [
    "AUTO_CHECKPOINTING_SHARE", "checkpointed_blocks", "CPU_MATMUL_GFLOPS", "CPU_MFU", "CPU_OVERHEAD", "GPUS", "GPU_MFU", "GPU_OVERHEAD", "DataProfile", "Device", "GiB",
    "MemoryEstimate", "ModelShape", "Plan", "TimeEstimate", "load_shape", "plan", "print_plan", "profile_examples",
    "resolve_device",
]
