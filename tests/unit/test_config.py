from pathlib import Path

import pytest

from tunelab.config import config_hash, resolved_dict
from tunelab.resolve import load_config
from tunelab.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_valid_config_with_shorthands_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "model: some/dir\nmethod: lora\ndata: {train: t.jsonl}\n"))
    assert cfg.model.path == "some/dir"
    assert cfg.method.name == "lora"
    resolved = resolved_dict(cfg)
    assert resolved["method"]["r"] == 16 and resolved["method"]["target_modules"] == "all-linear"
    assert resolved["train"]["seed"] == 0


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, "data: {train: t.jsonl}\n"), ["train.lr=1e-4", "method.r=8", "model.dtype=bfloat16", "train.gradient_checkpointing=true"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.method.options()["r"] == 8
    assert cfg.model.dtype == "bfloat16"
    assert cfg.train.gradient_checkpointing is True


def test_every_problem_reported_at_once_with_lines(tmp_path):
    text = "model: x\nmethod:\n  name: lora\n  r: -1\n  rank: 3\ndata:\n  train: t.jsonl\n  loss_on: everything\ntrain:\n  lr: -5\n  epochz: 2\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    problems = info.value.problems
    text_all = "\n".join(problems)
    assert len(problems) == 5, problems
    assert "c.yaml:4: method.r" in text_all
    assert "c.yaml:5: method.rank: unknown key" in text_all
    assert "c.yaml:8: data.loss_on" in text_all
    assert "c.yaml:10: train.lr" in text_all
    assert "c.yaml:11: train.epochz: unknown key" in text_all


def test_unknown_method_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "method: {name: lorax}\ndata: {train: t.jsonl}\n"))
    assert "unknown method 'lorax'" in str(info.value) and "full" in str(info.value) and "lora" in str(info.value)


def test_missing_data_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config(write(tmp_path, "model: x\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, "data: {train: t}\n"), ["nonsense"])


def test_config_hash_ignores_bookkeeping_keys(tmp_path):
    path = write(tmp_path, "data: {train: t.jsonl}\n")
    base = config_hash(resolved_dict(load_config(path)))
    assert config_hash(resolved_dict(load_config(path, ["train.save_every=5", "output_dir=elsewhere"]))) == base
    assert config_hash(resolved_dict(load_config(path, ["train.lr=3e-5"]))) != base


def test_learning_rate_defaults_to_the_methods_recommendation(tmp_path):
    path = write(tmp_path, "data: {train: t.jsonl}\n")
    assert load_config(path).train.lr == 2e-4  # lora
    assert load_config(path, ["method.name=full"]).train.lr == 5e-5
    assert load_config(path, ["method.name=prompt"]).train.lr == 3e-2
    assert load_config(path, ["method.name=full", "train.lr=1e-5"]).train.lr == 1e-5


def test_a_missing_config_file_is_named(tmp_path):
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml not found"):
        load_config(tmp_path / "missing.yaml")


def test_an_override_value_with_a_hash_is_kept_whole(tmp_path):
    """YAML reads ' #...' as a comment; an override is one value, so the text after '#' is not dropped."""
    cfg = load_config(write(tmp_path, "data: {train: t.jsonl}\n"),
                      ["data.system_prompt=Answer with #tags only", "train.lr=1e-4", "method.target_modules=[q_proj, v_proj]"])
    assert cfg.data.system_prompt == "Answer with #tags only"
    assert cfg.train.lr == 1e-4 and cfg.method.options()["target_modules"] == ["q_proj", "v_proj"]


def test_home_directory_in_paths_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(write(tmp_path, "data: {train: ~/t.jsonl, eval: [~/e.jsonl]}\noutput_dir: ~/runs/a\neval: {db: ~/shop.sqlite}\n"))
    assert cfg.data.train == str(tmp_path / "t.jsonl") and cfg.data.eval == [str(tmp_path / "e.jsonl")]
    assert cfg.output_dir == str(tmp_path / "runs/a") and cfg.eval.db == str(tmp_path / "shop.sqlite")


def test_recipe_is_chosen_and_validated_like_a_method(tmp_path):
    cfg = load_config(write(tmp_path, "recipe: pretrain\ndata: {train: docs}\n"), ["recipe.holdout=0.2"])
    assert cfg.recipe.name == "pretrain" and resolved_dict(cfg)["recipe"] == {"name": "pretrain", "text_field": "text",
                                                                           "holdout": 0.2, "packing": True}
    assert load_config(write(tmp_path, "data: {train: t.jsonl}\n")).recipe.name == "sft"
    with pytest.raises(ConfigError, match=r"c.yaml:1: recipe.colour: unknown key"):
        load_config(write(tmp_path, "recipe: {name: pretrain, colour: red}\ndata: {train: docs}\n"))


def test_the_resolved_description_is_frozen_and_derived_by_copy():
    from pydantic import ValidationError

    from tunelab.config.schema import updated

    config = load_config(None, ["data.train=x.jsonl", "method.r=4", "train.epochs=2"])
    for section, key, value in [(config.train, "lr", 1e-3), (config.method, "r", 8), (config.data, "max_length", 64),
                                (config.eval, "before", False), (config.recipe, "name", "dpo"), (config, "output_dir", "y")]:
        with pytest.raises(ValidationError, match="frozen"):
            setattr(section, key, value)
    derived = updated(config, train=updated(config.train, lr=1e-3), method=updated(config.method, r=8))
    assert (config.train.lr, config.method.r) == (2e-4, 4) and (derived.train.lr, derived.method.r) == (1e-3, 8)
    assert derived.train.given() == config.train.given() == {"epochs"}  # the method's rate and a derived one: not given
    assert derived.recipe.needs == config.recipe.needs and type(derived.method) is type(config.method)
    with pytest.raises(ValidationError):
        updated(config.method, r=0)  # validated by the method's options class
