"""What importing and running tunelab pulls in: bitsandbytes only for a quantized base (QLoRA).

peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs "Failed to load CPU
gemm_4bit_forward from kernels-community ..." on every run. Each check runs in a fresh interpreter,
because the test process itself may already have imported bitsandbytes for a QLoRA test.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

# Runs in the child: the CLI and the training stack; a two-step LoRA run on a tiny model (tokenize, apply
# the method, train, save the adapter), the adapter loaded back onto a fresh base, and IA3 applied too.
_CHILD = textwrap.dedent("""
    import json, sys
    import tunelab.cli, tunelab.methods, tunelab.stages.model, tunelab.stages.setup, tunelab.stages.training
    from tunelab.resolve import load_config
    from tunelab.methods import get_method
    from tunelab.models.load import load_model
    from tunelab.recipes import sft

    overrides = json.loads(sys.argv[1])
    model_path = overrides[0].split("=", 1)[1]
    result = sft.main(load_config(None, overrides))
    get_method("lora").load(load_model(model_path, "float32"), result.artifact_dir)
    ia3 = get_method("ia3")
    ia3.apply(load_model(model_path, "float32"), ia3.options_class())
    print(json.dumps({"bitsandbytes": sorted(m for m in sys.modules if m.split(".")[0] == "bitsandbytes")}))
""")


def test_training_without_quantization_never_imports_bitsandbytes(tmp_path, tiny_llama):
    if importlib.util.find_spec("bitsandbytes") is None:  # (find_spec does not import it here)
        pytest.skip("bitsandbytes is not installed: there is nothing to keep out")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Colour {i}?"},
                                                      {"role": "assistant", "content": "It is red."}]}) + "\n"
                             for i in range(8)), encoding="utf-8")
    overrides = [f"model={tiny_llama}", f"data.train={train}", f"output_dir={tmp_path / 'run'}", "train.batch_size=4",
                 "train.max_steps=2", "train.warmup_ratio=0", "eval.probe=false", "method.name=lora", "method.r=4"]
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(overrides)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    imported = json.loads(child.stdout.strip().splitlines()[-1])["bitsandbytes"]
    assert imported == [], f"bitsandbytes was imported without quantization: {imported[:3]} ..."
    assert "gemm_4bit_forward" not in child.stderr
