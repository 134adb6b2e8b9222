"""The configuration reference, generated from the typed schema so that it cannot drift from the code.

``python -m tunelab.reference`` prints the reference as Markdown: every section of
:class:`~tunelab.config.schema.RunConfig` with its keys, types, limits, defaults and descriptions, then every
registered method and recipe with its typed options (read from the registries, as ``tunelab methods`` and
``tunelab recipes`` do). ``python -m tunelab.reference --write docs/configuration.md`` replaces the part
of that page between :data:`BEGIN` and :data:`END`; ``tests/unit/test_docs.py`` fails when the page differs
from what this module generates now.

Written by hand: pydantic's JSON schema holds the same facts, but no well-kept library renders a pydantic
model as Markdown tables of dotted keys, and a JSON-schema-to-Markdown tool would add a dependency for ~150
lines. Like ``load.py``, it imports the method and recipe registries only inside functions.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

BEGIN = "<!-- generated: tunelab.reference -->"
END = "<!-- end generated -->"
_HEADER = ("| key | type | default | description |", "|---|---|---|---|")
_LIMITS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "at least", "max_length": "at most"}
_SCALARS = {str: "text", int: "integer", float: "number", bool: "true/false", type(None): "null", Any: "any",
            Path: "path"}


def _prose(text: str | None) -> str:
    """A docstring or description as one Markdown line: reST ````code```` becomes `code`, pipes are escaped."""
    if not text:
        return ""
    return " ".join(inspect.cleandoc(text).split()).replace("``", "`").replace("|", "\\|")


def _first_paragraph(text: str | None) -> str:
    return _prose(inspect.cleandoc(text).split("\n\n")[0]) if text else ""


def _sentence(text: str) -> str:
    text = _prose(text)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation contains (``Replay | None``, ``list[str | TrainSource]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in nested_models(arg)]


def type_text(annotation: Any, names: dict[type, str]) -> str:
    """A type as a reader says it: ``Literal['a', 'b'] | None`` → "`a`, `b` or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        values = [f"`{yaml.safe_dump(v, default_flow_style=True).splitlines()[0]}`" for v in args]
        return ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a, names) for a in args)
    if origin is list:
        inner = type_text(args[0], names) if args else "any"
        return f"list of ({inner})" if " or " in inner else f"list of {inner}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"`{names[annotation]}` mapping" if annotation in names else "mapping"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    dumped = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return f"`{dumped.removesuffix('...').strip()}`".replace("|", "\\|")


def default_text(field: FieldInfo) -> str:
    """The default as YAML, "required" when there is none."""
    if field.default_factory is not None:
        return _value(field.default_factory())
    if field.default is PydanticUndefined:
        return "required"
    return _value(field.default)


def limits_text(field: FieldInfo) -> str:
    """Numeric and length limits (``Field(gt=0)`` → "> 0")."""
    found = []
    for item in field.metadata:
        for attribute, word in _LIMITS.items():
            bound = getattr(item, attribute, None)
            if bound is not None:
                found.append(f"{word} {bound}")
    return ", ".join(found)


def _key(name: str, field: FieldInfo) -> str:
    return field.alias or name


def field_rows(model: type[BaseModel], prefix: str, names: dict[type, str]) -> list[str]:
    """One table row per field of ``model``, keys written ``prefix.key``."""
    rows = []
    for name, field in model.model_fields.items():
        kind = type_text(field.annotation, names)
        if limits := limits_text(field):
            kind += f" ({limits})"
        key = f"{prefix}.{_key(name, field)}" if prefix else _key(name, field)
        nested = nested_models(field.annotation)
        about = _prose(field.description) or (_first_paragraph(nested[0].__doc__) if nested else "")
        rows.append(f"| `{key}` | {kind} | {default_text(field)} | {about} |")
    return rows


def sections(model: type[BaseModel], path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """``(dotted path, model)`` for ``model`` and every model nested in it, depth first in field order."""
    found = [(path, model)]
    for name, field in model.model_fields.items():
        for nested in nested_models(field.annotation):
            sub = f"{path}.{name}" if path else name
            if typing.get_origin(field.annotation) is not None and _is_list_of(field.annotation, nested):
                sub += "[]"
            found += sections(nested, sub)
    return found


def _is_list_of(annotation: Any, model: type) -> bool:
    """Whether ``model`` appears inside a ``list[...]`` of ``annotation`` (a mixture entry, not the section)."""
    if typing.get_origin(annotation) is list:
        return bool(nested_models(annotation))
    return any(_is_list_of(a, model) for a in typing.get_args(annotation))


def _table(title: str, intro: str, rows: list[str], level: str = "###") -> list[str]:
    out = [f"{level} {title}", ""]
    if intro:
        out += [intro, ""]
    if rows:
        out += [*_HEADER, *rows, ""]
    return out


def schema_reference() -> list[str]:
    """The sections of ``RunConfig``: the top-level keys first, then each section's keys."""
    found = sections(RunConfig)
    names = {model: path for path, model in found if path}
    out: list[str] = []
    for path, model in found:
        title = "Top level" if not path else f"`{path}`"
        intro = _first_paragraph(model.__doc__)
        if model.model_config.get("extra") == "allow" and path not in ("method", "recipe"):  # those say so themselves
            intro += " Any other key is passed on as an option of the metric."
        out += _table(title, intro.strip(), field_rows(model, path, names))
    return out


def _registry_entry(kind: str, name: str, summary: str, facts: list[str], options: type[BaseModel]) -> list[str]:
    intro = " ".join(part for part in (summary, "; ".join(facts) + "." if facts else "") if part)
    rows = field_rows(options, kind, {})
    if not rows:
        intro += " No options of its own."
    return _table(f"`{kind}.name: {name}`", intro.strip(), rows, level="####")


def methods_reference() -> list[str]:
    """Every registered method: its default learning rate, artifact, capabilities and options."""
    from tunelab.methods import get_method, method_names

    out = _table("Methods", "`method.name` picks one; its options sit beside `name` in the `method:` section "
                 "(`tunelab methods` prints the same).", [])
    for name in method_names():
        method = get_method(name)
        facts = [f"default `train.lr` {method.default_lr:g}", f"artifact `{method.artifact}/`",
                 "mergeable" if method.mergeable else "not mergeable"]
        if method.incompatible:
            facts.append("refuses " + ", ".join(f"`train.{feature}`" for feature in sorted(method.incompatible)))
        doc = inspect.getmodule(type(method)).__doc__
        out += _registry_entry("method", name, _first_paragraph(doc), facts, method.options_class)
    return out


def recipes_reference() -> list[str]:
    """Every registered recipe: its summary and options."""
    from tunelab.recipes import get_recipe, recipe_names

    out = _table("Recipes", "`recipe.name` (or `recipe: NAME`) picks one; its options sit beside `name` in the "
                 "`recipe:` section (`tunelab recipes` prints the same).", [])
    for name in recipe_names():
        recipe = get_recipe(name)
        out += _registry_entry("recipe", name, _sentence(recipe.summary), [], recipe.options_class)
    return out


def render() -> str:
    """The whole generated reference, as Markdown (without the markers)."""
    lines = ["_Generated from the typed schema by `python -m tunelab.reference --write docs/configuration.md`; "
             "do not edit by hand._", "", *schema_reference(), *methods_reference(), *recipes_reference()]
    return "\n".join(lines).rstrip() + "\n"


def generated_part(page: str, source: str = "the page") -> str:
    """The text between the markers of ``page``; TunelabError naming the markers when they are missing."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise TunelabError(f"{source} has no generated section: put the lines {BEGIN} and {END} where the "
                           "reference belongs, then run python -m tunelab.reference --write " + source)
    return page[start + len(BEGIN):end].strip("\n") + "\n"


def replace_generated(page: str, generated: str, source: str = "the page") -> str:
    """``page`` with its generated section replaced by ``generated``."""
    generated_part(page, source)  # the markers must be there
    head, rest = page.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{generated.strip(chr(10))}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or with ``--write PAGE`` put it between the markers of PAGE."""
    from tunelab.atomic import write_text_atomic

    parser = argparse.ArgumentParser(prog="python -m tunelab.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="a Markdown page whose generated section is replaced")
    args = parser.parse_args(argv)
    text = render()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    try:
        page = args.write.read_text(encoding="utf-8")
        write_text_atomic(args.write, replace_generated(page, text, str(args.write)))
    except OSError as err:
        print(f"error: cannot update {args.write}: {err.strerror}; give the Markdown page that holds the markers "
              f"(docs/configuration.md)", file=sys.stderr)
        return 2
    except TunelabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the configuration reference into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
