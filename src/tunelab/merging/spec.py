"""``MERGE.yaml``: which models ``tunelab merge`` combines, and how, validated with every problem reported at once.

```yaml
merge:
  method: ties                 # linear | task_arithmetic | ties | dare_linear | dare_ties
  base: smollm2-135m-instruct  # alias, HF dir (task vectors are differences from it; not needed by linear)
  models:
    - {path: runs/sql-lora, weight: 1.0, density: 0.5}   # a run directory (folded first) or an HF dir
    - {path: runs/reviews-lora}
  lambda: 1.0                  # scale of the merged task vector
  seed: 0                      # DARE's random drops
```

Problems name the file, the line and the key (``merge.yaml:7: merge.models[1].density: ...``) as the run
configuration loader does; relative paths are relative to the current directory, as in run configs.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab import safeyaml
from tunelab.config.load import Problems, key_lines
from tunelab.errors import ConfigError

class ModelEntry(BaseModel):
    """One model of the merge."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a tunelab run directory (its update is folded into its base first) or an HF model directory")
    weight: float = Field(1.0, allow_inf_nan=False, description="its share of the merge")
    density: float | None = Field(None, gt=0, le=1, description="fraction of its task vector kept (ties, dare_*)")


class MergeSection(BaseModel):
    """The ``merge:`` mapping."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str
    base: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    lambda_: float | None = Field(None, alias="lambda", allow_inf_nan=False)
    seed: int = 0


class MergeFile(BaseModel):
    """The whole file: one ``merge:`` mapping."""

    model_config = ConfigDict(extra="forbid")

    merge: MergeSection


def is_merge_file(path: Path) -> bool:
    """Whether ``tunelab merge``'s argument names a merge file rather than a run directory."""
    return path.suffix in (".yaml", ".yml") and not path.is_dir()


def _pydantic_problems(err: ValidationError, problems: Problems) -> None:
    for item in err.errors():
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (the keys are merge.method, base, models (path, weight, density), lambda, seed)"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.add(tuple(item["loc"]), message)


def _source_problem(value: str, *, runs_allowed: bool) -> str | None:
    """Why ``value`` cannot be a model to merge, or None; loading decides the rest (e.g. a hub id's existence)."""
    from tunelab.models.embedded import EMBEDDED
    from tunelab.runs import open_run

    path = Path(value).expanduser()
    if path.is_dir():
        if open_run(path) is not None:
            return None if runs_allowed else "is a run directory; give the base model (its alias or HF directory)"
        if not (path / "config.json").is_file():
            return "is a folder with neither manifest.json (a run) nor config.json (an HF model); point it at one of those"
        return None
    if value in EMBEDDED or (value.count("/") == 1 and not value.startswith((".", "/", "~")) and not path.exists()):
        return None  # an embedded alias or a hub id
    kinds = "a run directory, an HF model directory" if runs_allowed else "an HF model directory"
    return f"{value!r} not found; give {kinds} or an embedded alias ({', '.join(EMBEDDED)})"


def _semantic_problems(section: MergeSection, problems: Problems) -> None:
    from tunelab.merging.rules import MERGE_RULES

    method = section.method
    rule = MERGE_RULES.find(method)
    if rule is None:
        problems.add(("merge", "method"), MERGE_RULES.unknown(method))
        return
    if rule.needs_base and section.base is None:
        problems.add(("merge", "method"), f"{method} merges task vectors (each model minus the base); set merge.base "
                                          "to the base model the models were fine-tuned from")
    if section.base is not None and (why := _source_problem(section.base, runs_allowed=False)):
        problems.add(("merge", "base"), why)
    if rule.averages and section.lambda_ is not None:
        problems.add(("merge", "lambda"), f"{method} averages whole weights and has no task vector to scale; remove lambda "
                                          "or use task_arithmetic")
    if rule.averages and abs(sum(m.weight for m in section.models)) < 1e-12:
        problems.add(("merge", "models"), f"the weights sum to 0, so {method} has no weighted average; give weights with a "
                                          "non-zero sum")
    # A rule that does not use a density would silently ignore one, so giving it is reported as a mistake.
    density_rules = sorted((name for name, other in MERGE_RULES.items() if other.uses_density),
                           key=lambda name: (name.count("_"), name))  # a plain rule before its dare_ variants
    for index, entry in enumerate(section.models):
        if entry.density is not None and not rule.uses_density:
            problems.add(("merge", "models", index, "density"), f"{method} keeps every entry of a task vector; density "
                                                                f"applies to {', '.join(density_rules)}: remove it or change merge.method")
        if why := _source_problem(entry.path, runs_allowed=True):
            problems.add(("merge", "models", index, "path"), why)


def load_merge_spec(path: str | Path) -> MergeSection:
    """Read and validate a merge file.

    Raises:
        ConfigError: Every problem found (unreadable YAML, unknown keys, bad values, an unknown method, a
            missing base, models that are not there), each with the file line and the key.
    """
    source = str(path)
    try:
        text = safeyaml.read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read {path}: {exc} (give the path of a merge YAML file)"], source=source) from None
    try:
        tree = safeyaml.load(text, source)
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source=source) from None
    if not isinstance(tree, dict):
        raise ConfigError(["the file must be a YAML mapping with one key, merge: {method, base, models, lambda, seed}"], source=source)
    problems = Problems(source, key_lines(text, source))
    try:
        section = MergeFile.model_validate(tree).merge
    except ValidationError as err:
        _pydantic_problems(err, problems)
        section = None
    if section is not None:
        _semantic_problems(section, problems)
    if problems.found:
        raise ConfigError(problems.found, source=source)
    assert section is not None
    return section
