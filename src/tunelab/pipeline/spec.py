"""``PIPELINE.yaml``: named stages run in order, each pointing at earlier ones by name, validated with every
problem reported at once (``pipeline.yaml:7: stages[1].set.init_from: ...``).

```yaml
output_dir: runs/sql-pipeline          # stage NAME writes to output_dir/NAME
stages:
  - name: sft
    kind: sft                          # a recipe: sft, pretrain, dpo, reward, distill, grpo
    config: configs/smollm2-135m-instruct/sft_lora_sql.yaml
    set: {train.epochs: 1}             # dotted overrides of the config
  - name: mistakes
    kind: preferences                  # pairs from a run's mistakes on its training data
    model: sft
    data: src/tunelab/examples/sql/train.jsonl
  - name: dpo
    kind: dpo
    config: configs/smollm2-135m-instruct/dpo_lora_sql.yaml
    set: {init_from: sft, data.train: mistakes}
  - {name: merged, kind: merge, from: dpo}
  - {name: gguf, kind: export, from: merged, format: gguf, quant: q8_0}
```

A ``synth`` stage (``data:`` a documents folder, ``model:`` the generator, ``synth:`` the settings of ``tunelab data
synth``) makes ``train.jsonl`` (named by the stage's name) and, with ``synth.eval_fraction``, ``eval.jsonl`` (named
``NAME.eval``): ``set: {data.train: docs, data.eval: docs.eval}``.

A value that is exactly the name of an earlier stage (in ``from``, ``model``, ``data``, and in the ``set``
keys that take a path: ``init_from``, ``data.train``, ``data.eval``, ``recipe.teacher``, ``recipe.task_eval``, ``model``) stands for
that stage's output: a training stage's run directory, a merge's model folder, an export's folder, the pairs
or answers file of a data stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab import safeyaml
from tunelab.config.load import Problems, key_lines
from tunelab.errors import ConfigError

DATA_KINDS = ("preferences", "generate", "synth")
OTHER_KINDS = ("merge", "export", "eval") + DATA_KINDS


class Stage(BaseModel):
    """One stage; which keys apply depends on ``kind`` (checked in :func:`load_pipeline`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the stage's folder under output_dir")
    kind: str
    config: str | None = Field(None, description="training stages: the run config file")
    set: dict[str, Any] = Field(default_factory=dict, description="training stages: dotted overrides of the config")
    from_: str | None = Field(None, alias="from", description="merge/export: the stage (or folder) whose result it takes")
    model: str | None = Field(None, description="eval/preferences/generate: the model (a stage, run directory or model spec); "
                                                "synth: the generator (also an http://.../v1 endpoint; default the embedded model)")
    data: str | None = Field(None, description="eval/preferences: examples; generate: prompts; synth: the documents folder")
    synth: dict[str, Any] = Field(default_factory=dict, description="synth: settings of tunelab data synth (chunk_tokens, "
                                                                     "eval_fraction, ...)")
    metric: str | None = Field(None, description="eval/preferences: the metric (default: the run's eval.metric)")
    db: str | None = Field(None, description="eval/preferences: SQLite database for sql_exec")
    format: Literal["hf", "gguf", "gguf-lora"] = "gguf"
    quant: Literal["f16", "q8_0", "q4_0"] = "f16"
    prompts: int = Field(8, ge=1, description="merge/export: held prompts the result is checked on")
    force: bool = Field(False, description="merge/export: publish even if the check fails (recorded in the report)")
    limit: int | None = Field(None, ge=1, description="eval: only the first N examples")
    max_new_tokens: int | None = Field(None, ge=1)


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: str
    stages: list[Stage] = Field(min_length=1)


class _TopLevel(BaseModel):
    """The file's own keys, checked apart from its stages (each stage is checked on its own)."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str
    stages: list[Any] = Field(min_length=1)


KIND_KEYS = {
    "merge": {"from_", "prompts", "force"},
    "export": {"from_", "format", "quant", "prompts", "max_new_tokens", "force"},
    "eval": {"model", "data", "metric", "db", "limit", "max_new_tokens"},
    "preferences": {"model", "data", "metric", "db", "max_new_tokens"},
    "generate": {"model", "data", "max_new_tokens"},
    "synth": {"model", "data", "synth"},
}
_REQUIRED = {"merge": ("from_",), "export": ("from_",), "eval": ("model", "data"), "preferences": ("model", "data"),
             "generate": ("model", "data"), "synth": ("data",)}


def is_training(kind: str) -> bool:
    return kind not in OTHER_KINDS


def _stage_problems(index: int, stage: Stage, earlier: list[str], problems: Problems) -> None:
    from tunelab.recipes import recipe_names

    where = ("stages", index)
    if stage.name in earlier:
        problems.add(where + ("name",), f"a second stage named {stage.name!r}; names must be unique")
    if is_training(stage.kind):
        if stage.kind not in recipe_names():
            problems.add(where + ("kind",), f"unknown kind {stage.kind!r}; choose a recipe ({', '.join(recipe_names())}) "
                                            f"or {', '.join(OTHER_KINDS)}")
        elif stage.config is None:
            problems.add(where, f"a {stage.kind} stage needs config: (a run config file)")
        elif not Path(stage.config).is_file():
            problems.add(where + ("config",), f"{stage.config} not found")
        return
    given = {k for k in stage.model_fields_set if k not in ("name", "kind")}
    for key in sorted(given - KIND_KEYS[stage.kind]):
        problems.add(where + ("from" if key == "from_" else key,), f"does not apply to a {stage.kind} stage (its keys: "
                     f"{', '.join(sorted(k.rstrip('_') for k in KIND_KEYS[stage.kind]))})")
    for key in _REQUIRED[stage.kind]:
        if getattr(stage, key) is None:
            problems.add(where, f"a {stage.kind} stage needs {key.rstrip('_')}:")
    if stage.kind == "synth":
        from pydantic import ValidationError

        from tunelab.synth.settings import SynthSettings

        try:
            SynthSettings(**stage.synth)
        except ValidationError as error:
            _pydantic(error, where + ("synth",), problems)


def _pydantic(error: ValidationError, prefix: tuple, problems: Problems) -> None:
    for item in error.errors():
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        problems.add(prefix + tuple("from" if p == "from_" else p for p in item["loc"]), message)


def load_pipeline(path: str | Path) -> PipelineFile:
    """Read and validate a pipeline file; each stage is checked on its own, so every problem is reported at once.

    Raises:
        ConfigError: every problem, each with its file, line and key.
    """
    source = str(path)
    try:
        text = safeyaml.read_text(path)
        tree = safeyaml.load(text, source)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"cannot read the pipeline file ({getattr(error, 'strerror', None) or error})"], source=source) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML ({error})"], source=source) from None
    problems = Problems(source, key_lines(text, source))
    tree = tree if isinstance(tree, dict) else {}
    raw_stages = tree.get("stages")
    try:
        _TopLevel.model_validate(tree)
    except ValidationError as error:
        _pydantic(error, (), problems)
    stages: list[Stage] = []
    for index, raw in enumerate(raw_stages if isinstance(raw_stages, list) else []):
        try:
            stage = Stage.model_validate(raw)
        except ValidationError as error:
            _pydantic(error, ("stages", index), problems)
            continue
        _stage_problems(index, stage, [s.name for s in stages], problems)
        stages.append(stage)
    if problems.found:
        raise ConfigError(problems.found, source=source)
    return PipelineFile(output_dir=tree["output_dir"], stages=stages)
