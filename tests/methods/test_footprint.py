"""Every registered method tells the planner what it trains and adds, without importing the planner."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunelab.methods import get_method, method_names, trainable_parameters
from tunelab.methods.footprint import Footprint, Plannable
from tunelab.models.load import load_model
from tunelab.planning import load_shape


@pytest.mark.parametrize("name", method_names())
def test_every_method_describes_its_footprint(name):
    assert isinstance(get_method(name), Plannable)


def test_importing_the_methods_does_not_import_the_planner():
    code = ("import sys, tunelab.methods, tunelab.methods.footprint; "
            "print(sorted(m for m in sys.modules if m.startswith('tunelab.planning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name, overrides", [
    ("freeze", ["method.last_n_blocks=1", "method.modules=['^model\\.norm']"]),
    ("lora", ["method.r=4", "method.target_modules=[q_proj, down_proj]", "method.use_dora=true"]),
    ("ia3", ["method.target_modules=[v_proj, up_proj, down_proj]", "method.feedforward_modules=[up_proj, down_proj]"]),
    ("prefix", ["method.num_virtual_tokens=3", "method.projection=true", "method.projection_hidden=16"]),
    ("adapter", ["method.bottleneck=4", "method.target_modules=[o_proj]"]),
])
def test_footprint_counts_what_apply_trains(make_config, tiny_llama, name, overrides):
    config = make_config(*overrides, method=name)
    options = config.method
    footprint = get_method(name).footprint(options, load_shape(config))
    assert isinstance(footprint, Footprint)
    table = load_shape(config).parameter_table()
    model = get_method(name).apply(load_model(str(tiny_llama), "float32"), options)
    trained = sum(p.numel() for p in trainable_parameters(model).values())
    assert sum(table[n] for n in footprint.trainable) + footprint.extra == trained
