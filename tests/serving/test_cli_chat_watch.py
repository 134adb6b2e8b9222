"""The command line around the server: --adapter parsing, the vLLM command line, the terminal chat, --watch."""

from __future__ import annotations

import json

import pytest

from serving.conftest import PROMPTS
from tunelab.errors import TunelabError


def test_adapter_options_are_name_equals_path():
    from tunelab.serving.cli import parse_adapters

    assert parse_adapters(["a=runs/x", "b = runs/y"]) == {"a": "runs/x", "b": "runs/y"}
    for bad in (["runs/x"], ["=runs/x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(TunelabError, match="--adapter"):
            parse_adapters(bad)


def test_the_vllm_command_line_names_the_base_the_adapters_and_their_rank(tiny_runs, tmp_path):
    from tunelab.serving.vllm import vllm_command

    argv, env = vllm_command("/models/base", {"red": tiny_runs["red"], "blue": tiny_runs["blue"] / "adapter"},
                             host="0.0.0.0", port=9000, api_key="k", served_name="tiny")
    assert argv[:3] == ["vllm", "serve", "/models/base"]
    assert argv[argv.index("--port") + 1] == "9000" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--served-model-name") + 1] == "tiny" and argv[argv.index("--api-key") + 1] == "k"
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "8"  # r=4 rounded up to vLLM's 8
    assert argv[argv.index("--max-loras") + 1] == "2"
    modules = argv[argv.index("--lora-modules") + 1:argv.index("--lora-modules") + 3]
    assert modules == [f"red={tiny_runs['red'] / 'adapter'}", f"blue={tiny_runs['blue'] / 'adapter'}"]
    assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(TunelabError, match="LoRA adapters only"):
        vllm_command("/models/base", {"x": tmp_path})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1024}))
    with pytest.raises(TunelabError, match="max-lora-rank"):
        vllm_command("/models/base", {"x": tmp_path})


def test_serve_with_vllm_missing_is_a_friendly_error(tiny_runs, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app

    monkeypatch.setattr("shutil.which", lambda name: None)
    result = CliRunner().invoke(app, ["serve", str(tiny_runs["red"]), "--engine", "vllm"])
    assert result.exit_code == 2 and "pip install vllm" in result.output


def test_an_unknown_batching_mode_is_refused_before_any_model_loads(monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.serving import models

    monkeypatch.setattr(models, "Registry", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(app, ["serve", "no-such-model", "--batching", "iterative"])
    assert result.exit_code == 2 and "use continuous or dynamic" in result.output


def test_the_terminal_chat_streams_answers_keeps_the_conversation_and_obeys_commands(tiny_runs, eval_predictions):
    from tunelab.evaluation.run import load_for_eval
    from tunelab.generation import SamplingSettings
    from tunelab.serving.chat import ChatSession, chat_loop

    loaded = load_for_eval(str(tiny_runs["red"]))
    session = ChatSession(loaded.model, loaded.tokenizer, SamplingSettings(max_new_tokens=8))
    lines = iter([PROMPTS[0][0]["content"], "/system Be brief.", "/bogus", PROMPTS[1][0]["content"], "/reset",
                  PROMPTS[2][0]["content"], "/exit", "never read"])
    out: list[str] = []
    first_turn = []

    def read(prompt: str) -> str:
        line = next(lines)
        if line == "/system Be brief.":
            first_turn.extend(session.messages)
        return line

    chat_loop(session, read, out.append)
    assert first_turn == [PROMPTS[0][0], {"role": "assistant", "content": eval_predictions["red"][0]}]
    assert eval_predictions["red"][0] in "".join(out)  # streamed to the terminal
    assert "unknown command '/bogus'" in "".join(out) and "(conversation reset)" in "".join(out)
    assert session.messages[0] == {"role": "system", "content": "Be brief."}  # /reset keeps the system message
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert next(lines) == "never read"


def test_watch_serves_a_runs_checkpoint_as_name_at_step(tiny_llama, tiny_runs, eval_predictions):
    from tunelab.generation import SamplingSettings, generate
    from tunelab.serving.models import Registry
    from tunelab.serving.watch import CheckpointWatcher

    registry = Registry(str(tiny_llama), base_id="tiny")
    watcher = CheckpointWatcher(registry, tiny_runs["red"])
    try:
        assert watcher.poll() == ["red@step-6"] and watcher.poll() == []
        served = registry.get("red@step-6")
        with registry.lock, served.active() as module:
            texts = [c.text.strip() for c in generate(module, served.tokenizer, PROMPTS, SamplingSettings(max_new_tokens=8))]
        assert texts == eval_predictions["red"]  # the last checkpoint is the finished adapter
    finally:
        watcher.stop()


def test_tunelab_serve_answers_the_openai_client_and_ctrl_c_drains_and_exits(tiny_runs):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    from openai import OpenAI

    from tunelab.serving.server import free_port

    port = free_port()
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(tiny_runs["red"]), "--adapter",
                             f"blue={tiny_runs['blue']}", "--port", str(port), "--name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "red", "blue"}
        assert client.chat.completions.create(model="blue", messages=PROMPTS[0], temperature=0, max_tokens=4).choices
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Serving" in output


def test_a_missing_serve_extra_names_what_to_install(monkeypatch):
    import sys

    from tunelab.serving.cli import _need_serve_extra

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    with pytest.raises(TunelabError, match=r"uvicorn.*pip install 'tunelab\[serve\]'"):
        _need_serve_extra()
