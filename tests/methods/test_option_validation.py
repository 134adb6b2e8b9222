"""Method options that used to fail only at apply time, minutes into a run, are refused by load_config."""

from __future__ import annotations

import pytest

from tunelab.resolve import load_config
from tunelab.errors import ConfigError

_BASE = ["data.train=/nonexistent/train.jsonl"]


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, _BASE + list(overrides))
    return "\n".join(info.value.problems)


def test_invalid_freeze_regex_names_the_key_and_the_pattern():
    text = _problems("method.name=freeze", "method.modules=['(']")
    assert "method.modules" in text and "'('" in text and "regular expression" in text


def test_invalid_freeze_regex_in_a_file_gives_its_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: /nonexistent/train.jsonl\nmethod:\n  name: freeze\n  modules: ['norm.weight$', '[a-']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.startswith(f"{path}:5: method.modules") and "'[a-'" in p for p in info.value.problems)


def test_freeze_that_trains_nothing_is_refused():
    assert "nothing to train" in _problems("method.name=freeze", "method.last_n_blocks=0")
    load_config(None, _BASE + ["method.name=freeze", "method.last_n_blocks=0", "method.modules=['norm.weight$']"])


@pytest.mark.parametrize("overrides, key", [
    (["method.name=lora", "method.target_modules=(q_proj"], "method.target_modules"),
    (["method.name=lora", "method.target_modules=[]"], "method.target_modules"),
    (["method.name=qlora", "method.target_modules=[q_proj, '']"], "method.target_modules"),
    (["method.name=lora", "method.trainable_token_indices=[3, -1]"], "method.trainable_token_indices"),
    (["method.name=ia3", "method.target_modules=[k_proj, v_proj]", "method.feedforward_modules=[down_proj]"],
     "feedforward_modules"),
    (["method.name=ia3", "method.target_modules=[]"], "method.target_modules"),
    (["method.name=adapter", "method.target_modules=[o_proj, ' ']"], "method.target_modules"),
])
def test_options_checkable_statically_are_checked_at_load(overrides, key):
    assert key in _problems(*overrides)


@pytest.mark.parametrize("overrides", [
    ["method.name=lora", "method.target_modules=.*\\.(q|v)_proj"],  # peft matches one string as a regex
    ["method.name=lora", "method.target_modules=all-linear", "method.trainable_token_indices=[0, 5]"],
    ["method.name=ia3", "method.target_modules=[k_proj, down_proj]", "method.feedforward_modules=[down_proj]"],
    ["method.name=adapter", "method.target_modules=[o_proj]"],
    ["method.name=freeze", "method.modules=['norm\\.weight$']"],
])
def test_valid_options_still_load(overrides):
    load_config(None, _BASE + overrides)
