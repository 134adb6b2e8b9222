"""The typed run configuration.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is an error, not a silent
default. The ``method`` and ``recipe`` sections are the registered entry's own options class
(``tunelab.config.sections``), chosen by the resolver (``tunelab.resolve``), so adding a method or a recipe
never touches this file. Every section is frozen: the resolved run description is immutable, and a stage that
derives another value (the data-chosen defaults, the planner's variants) builds a new one with :func:`updated`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, field_validator, model_validator

from tunelab.config.sections import MethodConfig, RecipeConfig


class _Section(BaseModel):
    # frozen: the resolved run description is never assigned into; a changed value is a new one (``updated``)
    model_config = ConfigDict(extra="forbid", frozen=True)


Section = TypeVar("Section", bound=BaseModel)


def updated(section: Section, **changes: Any) -> Section:
    """A copy of a (frozen) config section with ``changes``, validated by the section's own class.

    The changed keys count as set (``model_fields_set``), as an assignment would; what a section keeps beside its
    fields (``train.given()``, ``recipe.needs``) is carried over. ``updated(config, train=updated(config.train,
    lr=1e-4))`` is the run description with another learning rate; ``config`` itself is left as it was.

    Raises:
        pydantic.ValidationError: a changed value the section does not accept.
    """
    checked = type(section).model_validate({**dict(section), **changes})
    return section.model_copy(update={key: getattr(checked, key) for key in changes})


class ModelConfig(_Section):
    """Which model to fine-tune.

    ``path`` is a local HF directory, a hub id (when online), a ``.gguf`` file or an embedded alias
    such as ``smollm2-135m-instruct``. In YAML, ``model: NAME`` is shorthand for ``model: {path: NAME}``.
    """

    path: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


def _expand_user(value: Any) -> Any:
    """``~`` in a path (or in each path of a list) becomes the home directory."""
    if isinstance(value, str) and value.startswith("~"):
        return str(Path(value).expanduser())
    if isinstance(value, list):
        return [_expand_user(v) for v in value]
    return value


class RawTemplate(_Section):
    """Jinja templates that turn a raw record (any fields) into an instruction example."""

    prompt: str
    response: str
    system: str | None = None


class TrainSource(_Section):
    """One source of a training mixture: ``data.train: [{path, weight, name}, ...]``."""

    path: str
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="its share of each epoch, relative to the others")
    name: str | None = Field(None, description="its name in logs (default: the file name)")

    _path = field_validator("path", mode="before")(lambda v: _expand_user(v))


# ``data.replay: {path: general}``: 58 general instructions (none of them a forgetting-probe item) answered by the
# embedded SmolLM2-135M-Instruct itself, greedily (``tunelab data generate``; provenance in each record's meta)
GENERAL_REPLAY = Path(__file__).resolve().parents[1] / "examples" / "general" / "replay_smollm2.jsonl"
GENERAL_PROMPTS = GENERAL_REPLAY.parent / "prompts.jsonl"
SELF_REPLAY = "self"  # ``data.replay: {path: self}``: the tuned model's own answers to GENERAL_PROMPTS (stages.replay)


class Replay(_Section):
    """``data.replay``: general data mixed into every epoch to limit forgetting."""

    path: str = Field(description="a data file (any format data.train reads); 'general': general instructions answered "
                                  "by the embedded SmolLM2-135M-Instruct (its own behaviour, replayed); 'self': the same "
                                  "instructions answered by the model being tuned, before tuning (generated once, cached)")
    ratio: float = Field(0.1, gt=0, lt=1, description="the replayed share of each epoch's examples")
    kl: float = Field(0.0, ge=0, le=1, description="on the replayed answers, this share of the loss is the KL divergence "
                                                 "from the untuned model's next-token distributions (the rest their "
                                                 "cross-entropy); above 0 a frozen copy of the untuned model is kept")

    _path = field_validator("path", mode="before")(lambda v: str(GENERAL_REPLAY) if v == "general" else _expand_user(v))


class FimConfig(_Section):
    """Fill-in-the-middle over code (``data.format: fim``, recipe pretrain): ``tunelab.data.fim``."""

    rate: float = Field(0.5, ge=0, le=1, description="share of documents rearranged prefix/suffix/middle (the rest stay plain)")
    spm_rate: float = Field(0.5, ge=0, le=1, description="share of the FIM documents in SPM order (the others PSM)")


class DataConfig(_Section):
    """Where the examples come from and how they become token ids and loss masks.

    ``train`` is a file, a list of files (concatenated), or a weighted mixture (a list of ``{path, weight,
    name}``): each epoch then draws ``weight / Σ weights`` of its examples from each source, deterministically
    from (seed, epoch); ``replay`` adds a share of general data to every epoch.
    """

    train: str | list[str | TrainSource]
    replay: Replay | None = None
    eval: str | list[str] | None = None
    validation: float | int | None = Field(None, gt=0, description="hold out this many train examples (an integer) or "
                                           "this share of them (a number below 1), drawn by train.seed and never "
                                           "trained on, for the validation loss (keep_best, early_stopping); without "
                                           "data.eval the task evaluation uses them too. A replay is never held out")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "raw", "fim"] = "auto"
    fim: FimConfig | None = None
    template: RawTemplate | None = None
    system_prompt: str | None = None
    chat_template: str = "auto"
    loss_on: Literal["assistant", "last_turn", "all"] = "assistant"
    train_on_reasoning: bool = Field(True, description="an answer's reasoning (reasoning_content or a leading <think> "
                                     "block) is in the loss; false trains the answer after it only")
    max_length: int = Field(1024, gt=0)
    too_long: Literal["truncate", "drop", "error"] = "truncate"

    _paths = field_validator("eval", "chat_template", mode="before")(lambda v: _expand_user(v))
    _train = field_validator("train", mode="before")(
        lambda v: [e if isinstance(e, dict) else _expand_user(e) for e in v] if isinstance(v, list) else _expand_user(v))

    def train_files(self) -> list[str]:
        """Every file training reads: the sources, then the replay file."""
        sources = [self.train] if isinstance(self.train, str) else [s.path if isinstance(s, TrainSource) else s for s in self.train]
        return sources + ([self.replay.path] if self.replay else [])

    def mixture(self) -> list[tuple[str, str, float]] | None:
        """``(path, name, weight)`` of each source when training draws a weighted mixture (weights given, or a
        replay); None when the files are simply concatenated."""
        entries = [self.train] if isinstance(self.train, str) else list(self.train)
        if self.replay is None and not any(isinstance(e, TrainSource) and e.weight != 1.0 for e in entries):
            return None
        sources = [(e.path, e.name or Path(e.path).stem, e.weight) if isinstance(e, TrainSource) else (e, Path(e).stem, 1.0)
                   for e in entries]
        if self.replay is not None:
            total = sum(weight for _, _, weight in sources)
            sources.append((self.replay.path, "replay", total * self.replay.ratio / (1 - self.replay.ratio)))
        return sources

    def eval_files(self) -> list[str]:
        if self.eval is None:
            return []
        return [self.eval] if isinstance(self.eval, str) else list(self.eval)

    @model_validator(mode="after")
    def _raw_needs_template(self) -> "DataConfig":
        if self.format == "raw" and self.template is None:
            raise ValueError("data.format is 'raw' but data.template is missing: add data.template.prompt and data.template.response")
        if self.fim is not None and self.format != "fim":
            raise ValueError(f"data.fim applies to data.format fim (this is {self.format})")
        return self


class TrainConfig(_Section):
    """The optimisation loop. Under ``defaults: data`` (sft), epochs, lr, warmup_ratio and batch_size left unset are
    chosen from the data at the start of a run (``tunelab.training.defaults``); the values below are the fixed ones."""

    defaults: Literal["data", "fixed"] = Field("data", description="data: choose epochs, lr, warmup, batch, LoRA rank "
                                               "and a validation slice the config leaves unset from the examples, their "
                                               "trained tokens and the model's width (printed at the start, recorded in "
                                               "config.yaml); fixed: the fixed defaults")
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    max_seconds: float | None = Field(None, gt=0, description="stop after this many seconds of optimizer steps (summed "
                                      "over resumes; epochs/max_steps stay an upper bound); the learning-rate schedule "
                                      "then follows whichever budget is further spent")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float | None = Field(None, gt=0, description="peak learning rate; default: the method's recommended rate (see `tunelab methods`)")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    save_every: int | None = Field(None, gt=0, description="checkpoint every N optimizer steps (default: once per epoch)")
    keep_last: int = Field(2, gt=0, description="checkpoints kept on disk")
    eval_every: int | None = Field(None, gt=0, description="validation loss every N steps (default: at each checkpoint)")
    log_every: int | None = Field(None, gt=0, description="log every N optimizer steps; default: every step on CPU, "
                                  "every 10 on a GPU (reading the loss makes the host wait for the GPU)")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute block activations in backward to save memory: true = every block; auto = "
        "only as many blocks as the memory plan (tunelab plan) needs to fit this device, usually none")
    kernels: Literal["none", "liger"] = Field("none", description="liger: liger-kernel's Triton RMSNorm, RoPE and SwiGLU "
                                              "(CUDA only; pip install liger-kernel)")
    early_stopping: int | None = Field(None, gt=0, description="end training after this many validations in a row "
                                       "without a lower eval_loss (validations: train.eval_every; needs eval data)")
    keep_best: bool = Field(False, description="make the artifact from the validated step with the lowest eval_loss, "
                            "not the last step (needs eval data)")
    packing: bool = Field(False, description="concatenate each micro-batch's examples into rows without padding "
                          "(one row with flash-attention, rows no longer than the longest example otherwise; attention "
                          "never crosses examples; same loss, less wasted compute when lengths vary)")
    _given: frozenset[str] = PrivateAttr(frozenset())

    def model_post_init(self, context: Any) -> None:
        # The keys the config itself set (lr: None means unset), before anything fills in a default.
        self._given = frozenset(k for k in self.model_fields_set if not (k == "lr" and self.lr is None))

    def given(self) -> frozenset[str]:
        """The keys the config set (not those a default filled in later, like the method's rate)."""
        return self._given


class DistributedConfig(_Section):
    """How several processes (``tunelab train --nproc N``, ``torchrun``, ``accelerate launch``) share the training.

    Without a distributed launch this section is ignored. The global batch is ``batch_size × grad_accum ×
    processes``; the loss of a step is normalised by the trained tokens of all ranks together.
    """

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field("ddp", description="ddp: every rank holds the whole model "
                                                           "(accelerate's DDP); fsdp: parameters, gradients and optimizer "
                                                           "state sharded over ranks (torch's FSDP2 fully_shard, the ZeRO-3 "
                                                           "partitioning); deepspeed: reserved, refused until wired")
    zero_stage: Literal[0, 1, 2, 3] | None = Field(None, description="DeepSpeed ZeRO stage (strategy deepspeed only)")
    cpu_offload: bool = Field(False, description="fsdp/deepspeed: keep sharded parameters and optimizer state in CPU memory")
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON config (strategy deepspeed only)")
    timeout_minutes: float = Field(60, gt=0, description="how long a rank waits for the others at a collective (rank 0 "
                                   "evaluates the untuned model alone while the others wait)")

    @model_validator(mode="after")
    def _deepspeed_only(self) -> "DistributedConfig":
        if self.strategy != "deepspeed":
            wrong = [key for key in ("zero_stage", "deepspeed_config") if getattr(self, key) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} only apply to strategy deepspeed (this is {self.strategy})")
        return self


class EvalConfig(BaseModel):
    """Before/after evaluation on ``data.eval``, in-context baselines and the forgetting probe.

    Keys other than those below are options of the metric (e.g. ``labels`` for ``accuracy``).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    metric: str = "exact_match"
    db: str | None = Field(None, description="SQLite database for sql_exec (opened read-only)")
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0, description="prompts per generation batch (decoding is memory-bound: larger is faster)")
    before: bool = Field(True, description="also evaluate the untuned model (zero-shot baseline)")
    few_shot: int = Field(0, ge=0, description="k-shot baseline of the untuned model with k train examples (0 = off)")
    rag: int = Field(0, ge=0, description="retrieval baseline of the untuned model: top-k BM25 matches as context (0 = off)")
    rag_documents: str | None = Field(None, description="folder of .txt/.md files to retrieve from; default: the train examples")
    before_from: str | None = Field(None, description="reuse the untuned model's results from this eval_before.json "
                                     "(tunelab compare shares one between its candidates)")
    probe: bool | str = Field(True, description="forgetting probe: true = the built-in one (40 chat questions; for a "
                              "model without a chat template of its own, the same 40 facts as text to continue), "
                              "general or completion to pick one, a JSONL path, or false")
    limit: int | None = Field(None, gt=0, description="evaluate only the first N eval examples")

    _paths = field_validator("db", "probe", "rag_documents", "before_from", mode="before")(lambda v: _expand_user(v))

    def metric_options(self) -> dict[str, Any]:
        options = dict(self.model_extra or {})
        if self.db is not None:
            options["db"] = self.db
        return options


class RunConfig(_Section):
    """The whole ``tunelab train`` configuration."""

    recipe: SerializeAsAny[RecipeConfig] = Field(default_factory=RecipeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodConfig] = Field(default_factory=MethodConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output_dir: str = "runs/latest"
    init_from: str | None = Field(None, description="a finished run directory to start from: its adapter is trained on "
                                  "(same method and options), or with init_from_merge its result is merged into the base first")
    init_from_merge: bool = Field(False, description="merge init_from's result into the base and train a fresh method on top")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(["tensorboard"], description="experiment trackers beside "
                                                               "metrics.jsonl: tensorboard (live), mlflow (the tracking extra)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite mlflow.db beside output_dir)")

    _output = field_validator("output_dir", "init_from", mode="before")(lambda v: _expand_user(v))

    @model_validator(mode="after")
    def _validation_data(self) -> "RunConfig":
        data, train = self.data, self.train
        wants = [k for k, on in (("train.early_stopping", train.early_stopping), ("train.keep_best", train.keep_best)) if on]
        if wants and not (data.eval_files() or data.validation):
            raise ValueError(f"{' and '.join(wants)} need validation data: set data.eval, or data.validation "
                             "(e.g. 0.1) to hold out a share of the train examples")
        if isinstance(data.validation, float) and data.validation >= 1:
            raise ValueError(f"data.validation: {data.validation} is a share (below 1) or a count (an integer)")
        return self

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("method", mode="before")
    @classmethod
    def _method_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


# Keys whose change does not alter the trained weights; resuming with a different value is allowed.
RESUME_SAFE_KEYS = frozenset(
    {"train.save_every", "train.keep_last", "train.log_every", "train.eval_every", "output_dir", "tracking", "tracking_uri"}
)
# distributed.*: the manifest records the strategy and process count a run started with, and a resume is checked
# against those (stages.run), so a single-process run (which ignores the section) never counts it as a change.
RESUME_SAFE_PREFIXES = ("eval.", "distributed.")
