"""Inputs that would reach memory before any check: each is refused with a clear error, fast.

Cases that, unfixed, would read forever, block, or allocate gigabytes run in one child process with a
memory limit and per-case time limits, so a regression fails these tests instead of taking the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tunelab.resolve import load_config
from tunelab.data import load_examples
from tunelab.data import readers
from tunelab.data.preferences import load_preferences
from tunelab.errors import DataError, TunelabError
from tunelab.merging.spec import load_merge_spec
from tunelab.pipeline.spec import load_pipeline
from tunelab.runs import read_run_config

# Each level holds 8 aliases of the one above: about 300k values expanded, from 200 bytes of YAML.
BOMB = textwrap.dedent("""\
    a: &a [1, 1, 1, 1, 1, 1, 1, 1]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d]
    f: [*e, *e, *e, *e, *e, *e, *e, *e]
""")
# The classic: nine levels of nine, 387 million values, under 1 KB.
LAUGHS = "a0: &a0 [lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)


def _problems(excinfo) -> str:
    return "\n".join(getattr(excinfo.value, "problems", [str(excinfo.value)]))


# --- YAML ----------------------------------------------------------------------------------------


def test_config_alias_bomb_is_refused_with_the_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(BOMB)
    with pytest.raises(TunelabError) as excinfo:
        load_config(path)
    assert f"{path}:6: too many YAML aliases" in _problems(excinfo)


def test_billion_laughs_is_refused_quickly():
    from tunelab import safeyaml

    assert len(LAUGHS) < 1024
    start = time.perf_counter()
    with pytest.raises(TunelabError, match="x.yaml:6: too many YAML aliases"):
        safeyaml.load(LAUGHS, source="x.yaml")
    assert time.perf_counter() - start < 2  # the config loader's case runs in the child process below


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: tiny\nloop: &a [*a]\n")
    with pytest.raises(TunelabError) as excinfo:
        load_config(path)
    assert f"{path}:2: a YAML alias refers to a node it is inside" in _problems(excinfo)
    path.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(TunelabError) as excinfo:
        load_config(path)
    assert f"{path}:1: YAML nested more than" in _problems(excinfo)


def test_plain_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: tiny\ntrain: &t {lr: 0.001}\neval: {}\nx: &x [1, 2]\n")
    with pytest.raises(TunelabError) as excinfo:
        load_config(path)  # `x` is an unknown key: the file is read, and its line still reported
    assert f"{path}:4: x: unknown key" in _problems(excinfo)


def test_merge_pipeline_and_run_config_refuse_alias_bombs(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    for load in (load_merge_spec, load_pipeline):
        with pytest.raises(TunelabError) as excinfo:
            load(path)
        assert f"{path}:6: too many YAML aliases" in _problems(excinfo), load.__name__
    (tmp_path / "config.yaml").write_text(BOMB)
    with pytest.raises(TunelabError, match="too many YAML aliases"):
        read_run_config(tmp_path)


def test_oversized_yaml_file_is_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: tiny\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(TunelabError, match="larger than 1 MiB"):
        load_config(path)


# --- JSONL lines and records ---------------------------------------------------------------------

GOOD = '{"prompt": "p", "completion": "c"}\n'


def test_overlong_jsonl_line_is_refused_without_losing_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000, raising=False)
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + '{"prompt": "' + "x" * 5000 + '", "completion": "c"}\n' + GOOD + "\n")
    with pytest.raises(DataError) as excinfo:
        load_examples([str(path)])
    assert excinfo.value.problems == [f"{path}:2: line longer than 1,000 bytes; split the record or check the file"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize(("value", "reason"), [
    ('"\\ud800"', "lone UTF-16 surrogate"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("1" * 100_000, "integer with more than"),
])
def test_unusable_json_values_are_data_errors_with_the_line(tmp_path, suffix, value, reason):
    record = '{"prompt": "p", "completion": "c", "extra": ' + value + "}"
    path = tmp_path / f"d{suffix}"
    path.write_text(GOOD + record + "\n" if suffix == ".jsonl" else f"[{GOOD}, {record}]")
    with pytest.raises(DataError) as excinfo:
        load_examples([str(path)])
    [problem] = excinfo.value.problems
    where = f"{path}:2: " if suffix == ".jsonl" else f"{path}:"
    assert problem.startswith(where) and reason in problem, problem


def test_surrogate_in_a_csv_messages_cell_and_in_preferences(tmp_path):
    path = tmp_path / "d.csv"
    cell = '"[{""role"": ""user"", ""content"": ""\\ud800""}, {""role"": ""assistant"", ""content"": ""a""}]"'
    path.write_text("messages\n" + cell + "\n")
    with pytest.raises(DataError) as excinfo:
        load_examples([str(path)])
    assert excinfo.value.problems[0].startswith(f"{path}:2: ") and "lone UTF-16 surrogate" in excinfo.value.problems[0]
    prefs = tmp_path / "p.jsonl"
    prefs.write_text('{"prompt": "p", "chosen": "a\\udc00", "rejected": "b"}\n')
    with pytest.raises(DataError) as excinfo:
        load_preferences([str(prefs)])
    assert excinfo.value.problems[0].startswith(f"{prefs}:1: ") and "surrogate" in excinfo.value.problems[0]


def test_valid_surrogate_pairs_are_kept(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "\\ud83d\\ude00", "completion": "c"}\n')
    [example] = load_examples([str(path)])
    assert example.messages[0]["content"] == "\U0001F600"


def test_template_multiplication_is_bounded_and_names_the_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "x", "a": "y"}\n')
    template = {"prompt": "{{ q * 100000000 }}", "response": "{{ a }}"}
    with pytest.raises(DataError) as excinfo:
        load_examples([str(path)], format="raw", template=template)
    [problem] = excinfo.value.problems
    assert problem.startswith(f"{path}:1: data.template.prompt: ") and "more than a data template may make" in problem


def test_template_output_is_bounded(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "' + "x" * 1000 + '", "a": "y"}\n')
    template = {"prompt": "{% for i in range(100000) %}{{ q }}{% endfor %}", "response": "{{ a }}"}
    with pytest.raises(DataError, match="data.template.prompt: an output of more than"):
        load_examples([str(path)], format="raw", template=template)


def test_ordinary_templates_still_render(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "hi", "n": 3, "items": ["a", "b"], "id": 123456789012}\n')
    template = {"prompt": "{{ q ~ '!' * n }} {{ items|join(', ') }} {{ '%05d'|format(n) }} {{ id }} "
                          "{{ '{:>4}'.format(q) }}{% for i in range(2) %}{{ i }}{% endfor %}{{ range(3)|length }}",
                "response": "{{ (n ** 2) + 1 }}"}
    [example] = load_examples([str(path)], format="raw", template=template)
    assert example.messages[0]["content"] == "hi!!! a, b 00003 123456789012   hi013"
    assert example.messages[1]["content"] == "10"


# --- files that are not files, and what would allocate gigabytes: in a limited child process ------

_CHILD = r'''
import json, os, resource, sys, threading, time
resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
from tunelab.data import load_examples
from tunelab.data.templates import prepare_tokenizer
from tunelab.data.records import data_fingerprint
from tunelab.resolve import load_config

class Tok:
    chat_template = None

tmp = sys.argv[1]
data = os.path.join(tmp, "d.jsonl")
with open(data, "w") as f:
    f.write('{"q": "x", "a": "y"}\n')
zero = os.path.join(tmp, "zero.jsonl")
os.symlink("/dev/zero", zero)
fifo = os.path.join(tmp, "fifo.jsonl")
os.mkfifo(fifo)
os.symlink("/dev/zero", os.path.join(tmp, "zero.jinja"))
os.symlink("/dev/zero", os.path.join(tmp, "zero.yaml"))
os.mkfifo(os.path.join(tmp, "fifo.yaml"))
laughs = os.path.join(tmp, "laughs.yaml")
with open(laughs, "w") as f:
    f.write(sys.argv[2])

def raw(prompt):
    return lambda: load_examples([data], format="raw", template={"prompt": prompt, "response": "{{ a }}"})

CASES = {
    "devzero": lambda: load_examples([zero]),
    "fifo": lambda: load_examples([fifo]),
    "fingerprint": lambda: data_fingerprint([zero]),
    "chat_template": lambda: prepare_tokenizer(Tok(), os.path.join(tmp, "zero.jinja")),
    "config_devzero": lambda: load_config(os.path.join(tmp, "zero.yaml")),
    "config_fifo": lambda: load_config(os.path.join(tmp, "fifo.yaml")),
    "config_laughs": lambda: load_config(laughs),
    "mul": raw("{{ 'x' * 10**10 }}"),
    "pow": raw("{{ 9 ** 999999999 }}"),
    "concat": raw("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"),
    "ljust": raw("{{ 'x'.ljust(10**10) }}"),
    "center": raw("{{ 'x'|center(10**10) }}"),
    "join": raw("{{ range(100000)|join('y' * 1000000) }}"),
    "printf": raw("{{ '%10000000000s' % 'x' }}"),
    "format": raw("{{ '{:>10000000000}'.format('x') }}"),
    "extend": raw("{% set l = ['x'] %}{% for i in range(40) %}{% set _ = l.extend(l) %}{% endfor %}{{ l|length }}"),
    "steps": raw("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
}
results = {}
for name, case in CASES.items():
    out = {}
    def run():
        start = time.perf_counter()
        try:
            case()
            out["error"] = None
        except BaseException as e:
            out["error"] = f"{type(e).__name__}: {e}"
        out["seconds"] = time.perf_counter() - start
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    results[name] = out if out else {"error": "hung", "seconds": None}
print(json.dumps(results))
sys.stdout.flush()
os._exit(0)
'''

_EXPECTED = {
    "devzero": "a device or socket, not a regular file",
    "fifo": "a FIFO, not a regular file",
    "fingerprint": "not a regular file",
    "chat_template": "not a regular file",
    "config_devzero": "not a regular file",
    "config_fifo": "not a regular file",
    "config_laughs": "laughs.yaml:6: too many YAML aliases",
    **{name: "data.template.prompt: " for name in
       ("mul", "pow", "concat", "ljust", "center", "join", "printf", "format", "extend", "steps")},
}


@pytest.fixture(scope="module")
def isolated(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("isolated")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp), LAUGHS], capture_output=True, text=True, timeout=400, env=env)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", sorted(_EXPECTED))
def test_refused_in_bounded_time_and_memory(isolated, case):
    result = isolated[case]
    assert result["error"] is not None and _EXPECTED[case] in result["error"], result
    # Unbounded, these run for hours or exhaust memory; 30 s leaves room for a loaded 2-core machine (the
    # step-bounded template took 10.07 s with five other jobs on the cores, ~2 s on quiet ones).
    assert "MemoryError" not in result["error"] and result["seconds"] < 30, result

