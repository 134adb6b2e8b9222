"""Read a run configuration from YAML plus ``key.sub=value`` overrides and validate it, reporting every problem at once.

``config/`` imports nothing above it, so the registries of methods and recipes are the caller's: the resolver
(``tunelab.resolve.load_config``) passes them to :func:`validate_tree`. Problems name the config key and, where the key came from the YAML file, its line
(``train.yaml:12: train.lr: ...``), and say how to fix them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab import safeyaml
from tunelab.config.schema import RESUME_SAFE_KEYS, RESUME_SAFE_PREFIXES, RunConfig
from tunelab.config.sections import MethodConfig, RecipeConfig, section_class
from tunelab.errors import ConfigError


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``a.b=value`` strings; values are read as YAML scalars (``1e-4`` -> float, ``true`` -> bool)."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
            continue
        parsed.append((key.strip().split("."), _override_value(raw)))
    if problems:
        raise ConfigError(problems, source="overrides")
    return parsed


def _override_value(raw: str) -> Any:
    """A YAML scalar or flow collection; text YAML would cut at `` #`` (a comment) is kept whole, as a string."""
    if not raw.strip():
        return raw
    try:
        value = safeyaml.load(raw, source="overrides")
    except yaml.YAMLError:
        return raw
    if "#" in raw and "#" not in json.dumps(value, default=str):
        return raw  # e.g. data.system_prompt=Answer in #hashtags: YAML reads " #..." as a comment
    return value


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in _SHORTHAND_KEYS:
            # `model: NAME` / `method: NAME` / `recipe: NAME` shorthand: expand so a sub-key can be set.
            child = {_SHORTHAND_KEYS[part]: child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[path[-1]] = value


_SHORTHAND_KEYS = {"model": "path", "method": "name", "recipe": "name"}


def key_lines(text: str, source: str = "config") -> dict[tuple[str, ...], int]:
    """Every mapping key path and sequence item (by index) of a YAML document -> its 1-based line number.

    Raises:
        ConfigError: If the document is one :func:`tunelab.safeyaml.load` refuses (an alias bomb).
    """
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[prefix + (str(index),)] = item.start_mark.line + 1
                walk(item, prefix + (str(index),))

    try:
        walk(safeyaml.compose(text, source), ())
    except yaml.YAMLError:
        pass
    return lines


def _key_name(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


class Problems:
    """Collects ``file:line: key: message`` lines of a YAML file other than a run config (a merge file, a
    pipeline); the line is that of the deepest key the file has (``key_lines``)."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int]):
        self.source, self.lines, self.found = source, lines, []

    def add(self, loc: tuple, message: str) -> None:
        parts = tuple(str(p) for p in loc)
        line = next((self.lines[parts[:n]] for n in range(len(parts), 0, -1) if parts[:n] in self.lines), None)
        where = f"{self.source}:{line}: " if line else f"{self.source}: "
        self.found.append(f"{where}{_key_name(loc) or '(top level)'}: {message}")


def _format_pydantic_errors(err: ValidationError, prefix: str, lines: dict, source: str) -> list[str]:
    problems = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"] if not str(p).startswith("function-")]
        # Union branches show up as loc parts like 'str' / 'list[str]'; drop them for readability.
        loc = [p for p in loc if p not in ("str", "list[str]", "int", "float", "none")]
        key = ".".join(([prefix] if prefix else []) + loc) or "(top level)"
        line = lines.get(tuple(key.split(".")))
        where = f"{source}:{line}: " if line else ""
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the README's config reference)"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append(f"{where}{key}: {message}")
    return problems


def _read_text(path: str | Path, source: str) -> str:
    if not Path(path).exists():
        raise ConfigError([f"config file {path} not found (give the path of a YAML run configuration)"], source=source)
    try:
        return safeyaml.read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read {path}: {exc}"], source=source) from None


def read_tree(path: str | Path | None, overrides: list[str] | None = None) -> tuple[dict, dict, str]:
    """The YAML mapping of ``path`` with ``overrides`` applied, its keys' lines, and its name for messages.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML or not a mapping, or an override is malformed.
    """
    source = str(path) if path else "config"
    text = _read_text(path, source) if path is not None else ""
    try:
        tree = safeyaml.load(text, source) if text else {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source=source) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(["the file must be a YAML mapping of keys (model, method, data, train, output_dir)"], source=source)
    for key_path, value in parse_overrides(overrides or []):
        _apply_override(tree, key_path, value)
    return tree, key_lines(text, source), source


# Finds the options class of a registered entry by name (the resolver passes the registry's); KeyError with the
# message for a name that is not registered.
OptionsOf = Callable[[str], type[BaseModel]]
_SECTIONS = {"method": ("lora", MethodConfig), "recipe": ("sft", RecipeConfig)}


def validate_tree(tree: dict, lines: dict, source: str, options_of: dict[str, OptionsOf]) -> tuple[RunConfig | None, list[str]]:
    """Validate a run config tree, its ``method`` and ``recipe`` by the options class ``options_of`` gives for
    their name; returns the config (None when anything is wrong) and every problem, as ``file:line: key: message``."""
    tree, problems = dict(tree), []
    for section, (default, base) in _SECTIONS.items():
        value = tree.get(section, {})
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict):  # anything else is left to RunConfig, which says what the section must be
            tree[section], found = _validate_section(section, default, base, options_of[section], value, lines, source)
            problems += found
    config = None
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as err:
        problems += _format_pydantic_errors(err, "", lines, source)
    return (None if problems else config), problems


def _validate_section(section: str, default: str, base: type[BaseModel], options_of: OptionsOf, tree: dict,
                      lines: dict, source: str) -> tuple[BaseModel, list[str]]:
    """The typed section (``name`` picks the entry, its options class takes the other keys), or a bare one and the
    problems."""
    name = str(tree.get("name", default))
    try:
        cls = section_class(options_of(name), base)
    except KeyError as exc:
        line = lines.get((section, "name")) or lines.get((section,))
        where = f"{source}:{line}: " if line else ""
        return base(name=name), [f"{where}{section}.name: {exc.args[0] if exc.args else exc}"]
    try:
        return cls.model_validate({**tree, "name": name}), []
    except ValidationError as err:
        return base(name=name), _format_pydantic_errors(err, section, lines, source)


def problem_at(lines: dict, source: str, key: str, message: str) -> str:
    """``file:line: key: message`` for a problem found after validation (``key`` dotted, e.g. ``data.format``)."""
    line = lines.get(tuple(key.split(".")))
    return f"{source}:{line}: {key}: {message}" if line else f"{key}: {message}"


def resolved_dict(config: RunConfig) -> dict[str, Any]:
    """The fully resolved configuration, method and recipe defaults included, as plain data."""
    tree = config.model_dump(mode="json")
    tree["method"] = {"name": config.method.name, **config.method.model_dump(mode="json")}
    tree["recipe"] = {"name": config.recipe.name, **config.recipe.model_dump(mode="json")}
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _changes_weights(key: str) -> bool:
    return key not in RESUME_SAFE_KEYS and not key.startswith(RESUME_SAFE_PREFIXES)


def config_hash(resolved: dict[str, Any]) -> str:
    """Hash of the settings that change the trained weights (``RESUME_SAFE_KEYS`` excluded)."""
    flat = {k: v for k, v in _flatten(resolved).items() if _changes_weights(k)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of weight-changing keys that differ between two resolved configs."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if _changes_weights(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
