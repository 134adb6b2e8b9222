"""A bounded soak test of ``tunelab serve`` as users run it: the real command in its own process on 127.0.0.1,
a few hundred mixed requests from concurrent clients (greedy and sampled, chat and text, ``n`` > 1 over several
prompts, stop strings that end rows at different steps, streams cut by their reader), two adapters and a third
loaded and unloaded while the others are served. It asserts what a client relies on: no 5xx, every answer
complete (``n`` x prompts choices, in OpenAI's order) and attributed to its own prompt (greedy rows equal the
same prompt's answer asked alone), and the server's memory back near where it started. It ends by itself: a
fixed number of requests, each with a timeout, the whole run under a deadline, then SIGTERM.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

CLIENTS = 6
REQUESTS_PER_CLIENT = 40
DEADLINE_S = 240
TEXT_PROMPTS = ["Colour 1?", "Colour 2? It is", "Tell me about colour 3 and colour 4 please:", "5"]
CHATS = [[{"role": "user", "content": f"Colour {i}?"}] for i in range(4)]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tiny_runs):
    """``tunelab serve red --adapter blue=...`` in its own process; yields (url, pid), SIGTERM at the end."""
    from tunelab.serving.server import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(tiny_runs["red"]), "--name", "tiny",
                             "--adapter", f"blue={tiny_runs['blue']}", "--port", str(port), "--max-pending", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a loaded 2-core machine imports torch slowly
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"tunelab serve did not start:\n{proc.communicate()[0][-3000:]}")
    yield url, proc.pid
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("tunelab serve did not exit within 60 s of SIGTERM")


def _greedy_references(url: str) -> dict:
    """Each model's greedy answer to each prompt asked alone: what a batched row must equal."""
    refs = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for model in ("tiny", "red", "blue"):
            for i, prompt in enumerate(TEXT_PROMPTS):
                body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
                refs[(model, "text", i)] = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            for i, chat in enumerate(CHATS):
                body = {"model": model, "messages": chat, "max_tokens": 6, "temperature": 0}
                refs[(model, "chat", i)] = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    return refs


class Soak:
    """The mixed requests of one client thread and what went wrong with them."""

    def __init__(self, url: str, refs: dict, seed: int):
        self.url, self.refs, self.rng = url, refs, random.Random(seed)
        self.problems: list[str] = []
        self.statuses: list[int] = []

    def run(self, count: int, deadline: float) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for _ in range(count):
                if time.monotonic() > deadline:
                    return
                kind = self.rng.choice([self.text_batch, self.chat_sampled, self.chat_greedy, self.cut_stream])
                try:
                    kind(http)
                except httpx.HTTPError as exc:
                    self.problems.append(f"{kind.__name__}: {type(exc).__name__}: {exc}")

    def _post(self, http, path: str, body: dict) -> dict | None:
        reply = http.post(path, json=body)
        self.statuses.append(reply.status_code)
        if reply.status_code != 200:
            if not (reply.status_code == 404 and body["model"] == "extra"):  # unloaded meanwhile: the one allowed refusal
                self.problems.append(f"{path} {body['model']}: {reply.status_code} {reply.text[:200]}")
            return None
        return reply.json()

    def text_batch(self, http) -> None:
        """Several prompts, n greedy copies each, beside sampled rows with stops: prompt-major order, own prompt's answer."""
        model = self.rng.choice(["tiny", "red", "blue"])
        picks = self.rng.sample(range(len(TEXT_PROMPTS)), self.rng.randint(2, 3))
        n = self.rng.randint(1, 3)
        body = {"model": model, "prompt": [TEXT_PROMPTS[i] for i in picks], "n": n, "max_tokens": 6, "temperature": 0}
        answer = self._post(http, "/v1/completions", body)
        if answer is None:
            return
        choices = answer["choices"]
        if [c["index"] for c in choices] != list(range(len(picks) * n)):
            self.problems.append(f"text {model}: indices {[c['index'] for c in choices]} for {len(picks)} prompts x n={n}")
            return
        for c in choices:
            expected = self.refs[(model, "text", picks[c["index"] // n])]
            if c["text"] != expected:
                self.problems.append(f"text {model} choice {c['index']}: {c['text']!r}, its prompt alone gives {expected!r}")

    def chat_sampled(self, http) -> None:
        model = self.rng.choice(["tiny", "red", "blue", "extra"])
        n = self.rng.randint(2, 6)
        body = {"model": model, "messages": self.rng.choice(CHATS), "n": n, "temperature": 1.0,
                "max_tokens": self.rng.randint(3, 12), "stop": self.rng.sample(["e", "o", " ", "."], 2)}
        answer = self._post(http, "/v1/chat/completions", body)
        if answer is not None and [c["index"] for c in answer["choices"]] != list(range(n)):
            self.problems.append(f"sampled chat {model} n={n}: got indices {[c['index'] for c in answer['choices']]}")

    def chat_greedy(self, http) -> None:
        model = self.rng.choice(["tiny", "red", "blue"])
        i = self.rng.randrange(len(CHATS))
        answer = self._post(http, "/v1/chat/completions", {"model": model, "messages": CHATS[i], "max_tokens": 6,
                                                           "temperature": 0})
        if answer is not None and answer["choices"][0]["message"]["content"] != self.refs[(model, "chat", i)]:
            self.problems.append(f"greedy chat {model} #{i}: {answer['choices'][0]['message']['content']!r}")

    def cut_stream(self, http) -> None:
        """A reader that goes away after the first event (a closed browser tab)."""
        body = {"model": self.rng.choice(["tiny", "red", "blue"]), "messages": self.rng.choice(CHATS), "max_tokens": 64,
                "temperature": 1.0, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            self.statuses.append(reply.status_code)
            if reply.status_code != 200:
                self.problems.append(f"stream: {reply.status_code}")
                return
            next(reply.iter_lines())


def _load_and_unload(url: str, run: Path, stop: threading.Event, problems: list[str]) -> int:
    cycles = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            for route, body in (("/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(run)}),
                                ("/v1/unload_lora_adapter", {"lora_name": "extra"})):
                reply = http.post(route, json=body)
                if reply.status_code != 200:
                    problems.append(f"{route}: {reply.status_code} {reply.text[:200]}")
                stop.wait(0.5)
            cycles += 1
    return cycles


def test_a_few_hundred_mixed_requests_all_answered_whole_and_memory_returns(served, tiny_runs):
    url, pid = served
    refs = _greedy_references(url)
    warm = Soak(url, refs, seed=99)
    warm.run(10, time.monotonic() + 60)  # every code path once before the baseline
    assert not warm.problems, warm.problems
    start_rss = _rss_mib(pid)

    deadline = time.monotonic() + DEADLINE_S
    soaks = [Soak(url, refs, seed) for seed in range(CLIENTS)]
    stop, loader_problems, cycles = threading.Event(), [], []
    loader = threading.Thread(target=lambda: cycles.append(_load_and_unload(url, tiny_runs["blue"], stop, loader_problems)))
    threads = [threading.Thread(target=s.run, args=(REQUESTS_PER_CLIENT, deadline)) for s in soaks]
    loader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S + 130)
    stop.set()
    loader.join(130)
    assert not any(t.is_alive() for t in threads + [loader]), "a client hung past the deadline"

    statuses = [s for soak in soaks for s in soak.statuses]
    problems = [p for soak in soaks for p in soak.problems] + loader_problems
    assert not [s for s in statuses if s >= 500], problems
    assert not problems, f"{len(problems)} problems, first: {problems[:8]}"
    assert len(statuses) >= CLIENTS * REQUESTS_PER_CLIENT * 0.9, "the deadline cut the soak short"
    assert cycles and cycles[0] >= 2
    time.sleep(2)
    end_rss = _rss_mib(pid)
    print(f"\nsoak: {len(statuses)} requests, {cycles[0]} load/unload cycles, RSS {start_rss:.0f} -> {end_rss:.0f} MiB")
    assert end_rss < start_rss * 1.25 + 64, f"the server's memory grew from {start_rss:.0f} to {end_rss:.0f} MiB"
