"""``tunelab serve`` and ``tunelab chat``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from tunelab.clikit import console, friendly
from tunelab.errors import TunelabError

_EXTRA = "pip install 'tunelab[serve]'"


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``chat`` to the ``tunelab`` command."""
    app.command("serve")(friendly(serve_command))
    app.command("chat")(friendly(chat_command))


def _need_serve_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TunelabError(f"tunelab serve needs {', '.join(missing)}: {_EXTRA}")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=RUN_DIR`` options as a dict, each checked for its ``=`` and a unique name.

    Raises:
        TunelabError: a spec has no ``=``, an empty side, or repeats a name.
    """
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise TunelabError(f"--adapter {spec!r}: write NAME=RUN_DIR (for example --adapter reviews=runs/reviews-lora)")
        if name in adapters:
            raise TunelabError(f"--adapter {spec!r}: the name {name!r} is given twice; give each adapter its own name")
        adapters[name.strip()] = path.strip()
    return adapters


def serve_command(
    target: Annotated[str, typer.Argument(help="a run directory, or a model (embedded alias, HF dir, .gguf, hub id)")]
    = "smollm2-135m-instruct",
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="NAME=RUN_DIR: another adapter on the same base "
                                                          "(repeatable); a run's adapter/ folder works too")] = None,
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but 127.0.0.1 exposes the models to the network"),
    port: int = typer.Option(8000, min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNELAB_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1 routes"),
    name: Optional[str] = typer.Option(None, "--name", help="the base model's name in requests (default: the model given)"),
    engine: str = typer.Option("tunelab", help="tunelab (built in, CPU or GPU) or vllm (starts vLLM's OpenAI server)"),
    max_pending: int = typer.Option(64, min=1, help="requests waiting or decoding at most; more are answered 429"),
    max_batch: int = typer.Option(16, min=1, help="prompts decoded together at most"),
    batching: str = typer.Option("continuous", help="continuous (requests join and leave the batch between decode "
                                 "steps; LoRA adapters of one base decode together) or dynamic (one generate call per "
                                 "batch of requests for one model)"),
    mix_adapters: bool = typer.Option(True, "--mix-adapters/--no-mix-adapters", help="continuous batching: decode "
                                      "requests for different LoRA adapters of one base in one batch (peft's per-row "
                                      "routing), or one adapter per batch"),
    watch: Optional[Path] = typer.Option(None, "--watch", help="a run being trained: serve each new checkpoint as NAME@step-N"),
    allowed_host: Annotated[Optional[list[str]], typer.Option("--allowed-host", help="a host name clients reach the "
                            "server by (repeatable; IP addresses, localhost and --host always work): other Host "
                            "headers are refused, which stops DNS-rebinding web pages")] = None,
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, "--max-body-bytes", min=1, help="largest request body; "
                                       "larger ones are answered 413"),
    max_prompts: int = typer.Option(64, "--max-prompts", min=1, help="prompts one /v1/completions request may send"),
    max_rows: int = typer.Option(128, "--max-rows", min=1, help="completions one request may ask for (prompts x n)"),
    drain_seconds: float = typer.Option(30.0, "--drain-seconds", min=0, help="on Ctrl-C or SIGTERM, how long running "
                                        "requests may finish before they are cancelled"),
) -> None:
    """Serve a base model and its adapters with OpenAI's API (chat, completions, models) on one base in memory.

    The request's `model` picks the base or an adapter; each adapter answers with its own run's chat template,
    so greedy answers equal `tunelab eval`'s predictions. Adapters load and unload at runtime with vLLM's
    routes (POST /v1/load_lora_adapter, /v1/unload_lora_adapter). Ctrl-C stops accepting requests, lets
    the admitted ones finish for --drain-seconds, cancels the rest, and exits.
    """
    adapters = parse_adapters(adapter or [])
    if engine == "vllm":
        return _serve_vllm(target, adapters, host, port, api_key, name)
    if engine != "tunelab":
        raise TunelabError(f"--engine {engine!r}: use tunelab or vllm")
    if batching not in ("continuous", "dynamic"):  # before minutes of model loading
        raise TunelabError(f"--batching {batching!r}: use continuous or dynamic")
    _need_serve_extra()
    from tunelab.serving.app import create_app
    from tunelab.serving.limits import Limits
    from tunelab.serving.server import run_server

    limits = Limits(max_body_bytes=max_body_bytes, max_prompts=max_prompts, max_rows=max_rows, drain_seconds=drain_seconds)
    registry = _load_registry(target, adapters, name)
    app = create_app(registry, api_key=api_key, max_pending=max_pending, max_batch_rows=max_batch, batching=batching,
                     mix_adapters=mix_adapters, limits=limits, host=host, allowed_hosts=tuple(allowed_host or ()))
    if watch is not None:
        from tunelab.serving.watch import CheckpointWatcher

        app.state.watcher = CheckpointWatcher(registry, watch)
        app.state.watcher.start()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it")
    ids = ", ".join(m.id for m in registry.entries())
    console.print(f"Serving [bold]{escape(ids)}[/] on http://{host}:{port}/v1 (OpenAI API); Ctrl-C to stop", soft_wrap=True)
    try:
        run_server(app, host, port, drain_seconds=drain_seconds)
    finally:
        if watch is not None:
            app.state.watcher.stop()


def _load_registry(target: str, adapters: dict[str, str], name: str | None):
    from tunelab.serving.models import Registry

    with console.status("loading the base model and adapters ..."):
        registry = Registry(target, base_id=name)
        for adapter_name, path in adapters.items():
            registry.load(adapter_name, path)
    return registry


def _serve_vllm(target: str, adapters: dict[str, str], host: str, port: int, api_key: str | None, name: str | None) -> None:
    from tunelab.models.load import resolve_model_path
    from tunelab.runs import open_run
    from tunelab.serving.vllm import exec_vllm, vllm_command

    run = open_run(target)
    if run is not None:
        adapters = {Path(target).name: target, **adapters}
        base = run.base_model
    else:
        base = resolve_model_path(target)
    argv, env = vllm_command(base, adapters, host=host, port=port, api_key=api_key, served_name=name or target)
    console.print("starting: " + " ".join(argv), soft_wrap=True, highlight=False, markup=False)
    exec_vllm(argv, env)


def chat_command(
    target: Annotated[str, typer.Argument(help="a run directory, or a model (embedded alias, HF dir, .gguf, hub id)")],
    system: Optional[str] = typer.Option(None, "--system", help="a system message to start with"),
    max_tokens: int = typer.Option(256, min=1, help="longest answer in tokens"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 answers greedily (as evaluation does)"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
) -> None:
    """Talk to a run or a model in the terminal, with the chat template it was trained with (no server needed).

    Answers stream as they are generated. /reset forgets the conversation, /system TEXT sets the system
    message, /exit (or Ctrl-D) ends.
    """
    import sys

    from tunelab.evaluation.run import load_for_eval
    from tunelab.generation import SamplingSettings
    from tunelab.serving.chat import ChatSession, chat_loop

    with console.status(f"loading {target} ..."):
        loaded = load_for_eval(target)
    settings = SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens)
    session = ChatSession(loaded.model.eval(), loaded.tokenizer, settings, system=system)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(session, input, write)
