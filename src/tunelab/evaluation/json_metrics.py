"""The JSON metrics of ``evaluation.metrics``: valid JSON, valid against a schema, and the fields right.

``json_schema`` calls ``jsonschema`` (imported lazily). ``json_fields`` is ours, because no library scores
structured extraction field by field: the reference is a JSON object; an example's score is the share of
its fields (or of the ``fields`` option's) whose predicted value equals the reference's — strings compared
after trimming, collapsing whitespace and casefolding, numbers by value (``3`` equals ``3.0``), everything
else (booleans, null, lists, objects) exactly. A prediction that is not a JSON object scores 0; extra
predicted fields cost nothing (a field-level recall). ``details`` name the wrong and the missing fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluation.scoring import import_for_metric, per_example, register_metric, strip_fence


def _parse_json(prediction: str) -> tuple[Any, str | None]:
    try:
        return json.loads(strip_fence(prediction)), None
    except json.JSONDecodeError as e:
        return None, str(e)


@register_metric("json_valid")
def json_valid(name: str, preds: list[str], refs: list[list[str]], opts: dict):
    def one(pred: str, ref: str) -> tuple[float, dict]:
        _, error = _parse_json(pred)
        return (0.0, {"error": error}) if error else (1.0, {})

    return per_example(name, preds, refs, one)


def _load_schema(schema: Any) -> dict:
    if isinstance(schema, (str, Path)):
        path = Path(schema)
        if not path.is_file():
            raise TunelabError(f"json_schema metric: schema file {str(path)!r} not found; "
                               "pass schema as a dict or the path of an existing .json file.")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TunelabError(f"json_schema metric: schema file {str(path)!r} is not valid JSON ({e}).") from e
    if not isinstance(schema, dict):
        raise TunelabError(f"json_schema metric: option schema must be a dict or a .json path, got {type(schema).__name__}.")
    return schema


@register_metric("json_schema", options=("schema",), required=("schema",), hint="schema=<dict or path of a .json schema>")
def json_schema(name: str, preds: list[str], refs: list[list[str]], opts: dict):
    jsonschema = import_for_metric("jsonschema", "jsonschema", name)
    schema = _load_schema(opts["schema"])
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        raise TunelabError(f"json_schema metric: the schema itself is invalid: {e.message}. Fix the schema.") from e
    validator = cls(schema)

    def one(pred: str, ref: str) -> tuple[float, dict]:
        value, error = _parse_json(pred)
        if error:
            return 0.0, {"error": f"invalid JSON: {error}"}
        problem = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path) or "(root)"
            return 0.0, {"error": f"{where}: {problem.message}"}
        return 1.0, {}

    return per_example(name, preds, refs, one)


def same_value(predicted: Any, reference: Any) -> bool:
    """``json_fields``' comparison of one field (see the module docstring)."""
    if isinstance(reference, str) and isinstance(predicted, str):
        return " ".join(predicted.split()).casefold() == " ".join(reference.split()).casefold()
    numbers = (int, float)
    if isinstance(reference, numbers) and isinstance(predicted, numbers) and not isinstance(reference, bool) \
            and not isinstance(predicted, bool):
        return float(predicted) == float(reference)
    return type(predicted) is type(reference) and predicted == reference


@register_metric("json_fields", options=("fields",))
def json_fields(name: str, preds: list[str], refs: list[list[str]], opts: dict):
    wanted = opts.get("fields")
    if wanted is not None and (not isinstance(wanted, list) or not all(isinstance(f, str) for f in wanted)):
        raise TunelabError(f"json_fields metric: option fields must be a list of field names, got {wanted!r}")

    def one(pred: str, ref: str) -> tuple[float, dict]:
        try:
            reference = json.loads(ref)
        except json.JSONDecodeError as e:
            raise TunelabError(f"json_fields metric: a reference is not JSON ({e}): {ref[:80]!r}") from None
        if not isinstance(reference, dict):
            raise TunelabError(f"json_fields metric: a reference is not a JSON object: {ref[:80]!r}")
        fields = wanted or list(reference)
        value, error = _parse_json(pred)
        if error or not isinstance(value, dict):
            return 0.0, {"error": f"invalid JSON: {error}" if error else "not a JSON object", "fields": len(fields)}
        missing = [f for f in fields if f not in value]
        wrong = [f for f in fields if f in value and not same_value(value[f], reference.get(f))]
        right = len(fields) - len(missing) - len(wrong)
        return (right / len(fields) if fields else 1.0), {k: v for k, v in (("missing", missing), ("wrong", wrong)) if v}

    return per_example(name, preds, refs, one)
