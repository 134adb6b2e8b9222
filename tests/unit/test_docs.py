"""The documentation matches the code: the generated configuration reference is current, every ``tunelab``
command, option and config key the docs show exists, and every page of ``docs/`` is reachable from the README.

No model is loaded: commands come from the typer app, keys from the pydantic schema and the registries.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
import yaml
from pydantic import BaseModel

from tunelab.cli import app
from tunelab import reference
from tunelab.config.schema import RunConfig
from tunelab.merging.spec import MergeFile
from tunelab.methods import get_method, method_names
from tunelab.pipeline.spec import PipelineFile
from tunelab.recipes import get_recipe, recipe_names

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [ROOT / "README.md", *PAGES]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?<![\w./\[-])tunelab((?: +[a-z][a-z-]*)*)(.*)")
SECTIONS = ("model", "method", "recipe", "data", "train", "eval", "distributed")


def _code(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(language, body) of each fenced block, and the inline code spans outside them."""
    text = path.read_text(encoding="utf-8")
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return blocks, INLINE.findall(FENCE.sub("", text))


def _command_lines(path: Path) -> list[str]:
    blocks, spans = _code(path)
    lines = [line for lang, body in blocks if lang in ("bash", "sh", "yaml", "")
             for line in body.replace("\\\n", " ").splitlines()]
    return [line for line in lines + spans if COMMAND.search(line)]


def _is_group(command) -> bool:
    return hasattr(command, "commands")  # typer ships its own click: no isinstance against click.Group


def _resolve(words: list[str]) -> tuple[object | None, str]:
    """The click command ``tunelab WORDS...`` names (the longest real prefix), and the path for messages."""
    command = typer.main.get_command(app)
    path = "tunelab"
    for word in words:
        if not _is_group(command):
            break
        sub = command.commands.get(word)
        if sub is None:
            return (command if path != "tunelab" and getattr(command, "invoke_without_command", False) else None), \
                f"{path} {word}"
        command, path = sub, f"{path} {word}"
    return command, path


def command_problems(line: str) -> list[str]:
    """What in one shown command line does not exist: the command, a subcommand or an option."""
    match = COMMAND.search(line)
    words, rest = match.group(1).split(), match.group(2)
    if not words:
        return []  # `tunelab` alone, e.g. in prose
    command, path = _resolve(words)
    if command is None:  # a group alone is fine in prose ("the `tunelab data` commands")
        return [f"`{path}` is not a tunelab command (in: {line.strip()})"]
    rest = re.split(r"\s#|;|\||&&", " ".join(words) + rest)[0]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    return [f"`{path}` has no option {flag} (in: {line.strip()})"
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest) if flag not in known]


def _options_classes(section: str, name: str | None) -> list[type[BaseModel]]:
    """The options class of the named method/recipe, or of all of them when no name is shown."""
    if section == "method":
        names = [name] if name else method_names()
        return [get_method(n).options_class for n in names if n in method_names()]
    names = [name] if name else recipe_names()
    return [get_recipe(n).options_class for n in names if n in recipe_names()]


def key_problems(tree: object, model: type[BaseModel], where: str) -> list[str]:
    """Keys of ``tree`` that ``model`` (and the models nested in it) does not have, as dotted paths."""
    if not isinstance(tree, dict):
        return []
    problems = []
    fields = {(f.alias or n): f for n, f in model.model_fields.items()}
    open_ended = model.model_config.get("extra") == "allow"
    for key, value in tree.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            if not open_ended:
                problems.append(f"unknown key {dotted}")
            continue
        nested = reference.nested_models(fields[key].annotation)
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, dict) and nested:
                problems += key_problems(item, nested[0], dotted)
    return problems


def run_config_problems(tree: dict) -> list[str]:
    """Keys of a run config (whole or partial) the schema, the methods or the recipes do not know."""
    # method/recipe options are checked below, against the named entry's options class (the schema has only name)
    schema_part = {k: ({"name": v["name"]} if "name" in v else {}) if k in ("method", "recipe") and isinstance(v, dict)
                   else v for k, v in tree.items()}
    problems = key_problems(schema_part, RunConfig, "")
    for section in ("method", "recipe"):
        value = tree.get(section)
        if isinstance(value, dict):
            extra = {k: v for k, v in value.items() if k != "name"}
            classes = _options_classes(section, value.get("name"))
            if extra and not any(not key_problems(extra, c, section) for c in classes):
                problems += [f"{section}.{key}: not an option of {value.get('name') or 'any ' + section}"
                             for key in extra if not any(key in c.model_fields for c in classes)]
    return problems


def yaml_problems(text: str) -> list[str]:
    tree = yaml.safe_load(text)
    if not isinstance(tree, dict):
        return []
    if "merge" in tree:
        return key_problems(tree, MergeFile, "")
    if "stages" in tree:
        return key_problems(tree, PipelineFile, "")
    return run_config_problems(tree)


def dotted_problems(key: str) -> list[str]:
    """A dotted key shown in prose or an override (``train.lr``, ``method.r``, ``data.replay.kl``)."""
    section, *rest = key.split(".")
    if section in ("method", "recipe") and rest and rest[0] != "name":
        return [] if any(rest[0] in c.model_fields for c in _options_classes(section, None)) \
            else [f"{key}: no {section} has the option {rest[0]}"]
    tree: object = None
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return key_problems(tree, RunConfig, "")


DOTTED = re.compile(rf"^((?:{'|'.join(SECTIONS)})(?:\.[a-z_]+)+)(?:=|$|:)")
FILE_NAME = re.compile(r"\.(md|jsonl?|ya?ml|py|txt|gguf|csv|parquet|html|sqlite)$")  # train.jsonl is a file, not a key


def test_the_generated_reference_is_current():
    page = ROOT / "docs" / "configuration.md"
    shown = reference.generated_part(page.read_text(encoding="utf-8"), "docs/configuration.md")
    assert shown == reference.render(), (
        "docs/configuration.md's generated reference is out of date with the schema: run "
        "`python -m tunelab.reference --write docs/configuration.md`")


def test_the_reference_covers_every_key_and_registered_entry():
    text = reference.render()
    for path, model in reference.sections(RunConfig):
        for name in model.model_fields:
            assert f"`{path + '.' if path else ''}{name}`" in text
    for name in method_names():
        assert f"`method.name: {name}`" in text
    for name in recipe_names():
        assert f"`recipe.name: {name}`" in text


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_command_shown_exists(path):
    problems = [p for line in _command_lines(path) for p in command_problems(line)]
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_config_key_shown_exists(path):
    blocks, spans = _code(path)
    problems = [p for lang, body in blocks if lang == "yaml" for p in yaml_problems(body)]
    for line in [line for _, body in blocks for line in body.splitlines()] + spans:
        for token in line.split():
            token = token.strip("`'\"(),")
            if (match := DOTTED.match(token)) and not FILE_NAME.search(match.group(1)):
                problems += dotted_problems(match.group(1))
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(sorted(set(problems)))


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if f"(docs/{p.name})" not in readme and f"(docs/{p.name}#" not in readme]
    assert PAGES and not missing, f"README.md does not link these docs pages: {missing}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(path):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    broken = [link for link in links if "://" not in link and not (path.parent / link).exists()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_the_checks_catch_what_they_forbid():
    """Not vacuous: a wrong command, option, key, method option and stale reference are each reported."""
    assert command_problems("tunelab trian x.yaml")
    assert command_problems("tunelab data frobnicate x.yaml")
    assert command_problems("tunelab serve RUN --prot 8000")
    assert not command_problems("tunelab serve RUN --port 8000 --no-mix-adapters  # --not-checked")
    assert not command_problems("tunelab models")
    assert yaml_problems("train: {lr: 1.0e-4, learning_rate: 2}") == ["unknown key train.learning_rate"]
    assert yaml_problems("data: {train: a.jsonl, replay: {path: general, share: 0.2}}") == ["unknown key data.replay.share"]
    assert yaml_problems("method: {name: lora, rank: 8}") == ["method.rank: not an option of lora"]
    assert yaml_problems("stages: [{name: a, kind: sft, config: x.yaml, sett: {}}]")
    assert dotted_problems("train.max_secs") and not dotted_problems("train.max_seconds")
    assert dotted_problems("method.rank") and not dotted_problems("method.r")
    page = f"intro\n{reference.BEGIN}\nold\n{reference.END}\nend\n"
    assert reference.generated_part(page) != reference.render()
    assert reference.generated_part(reference.replace_generated(page, reference.render())) == reference.render()
