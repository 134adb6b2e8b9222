"""What a web page, or a config pasted into the launch page, can make the dashboard do (issue 37): requests with
a foreign Host or Origin are refused before any route runs, and a launched config is confined (presets from the
listed ones or the folders, output inside the folders, no code of its choosing without --allow-code, a job
subprocess that does not import from its working directory), and every config goes through the shared loader."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .fake_runs import make_runs

REPO = Path(__file__).resolve().parents[2]
GOOD = "model: tiny\ndata: {train: train.jsonl}\n"


class Spawned:
    """Stands in for the job queue's subprocesses: records each command, its env and cwd; plan always succeeds."""

    def __init__(self):
        self.calls: list[dict] = []

    def run(self, args, **kwargs):
        self.calls.append({"args": list(args), **kwargs})
        return subprocess.CompletedProcess(args, 0, "fits", "")

    def popen(self, args, **kwargs):
        self.calls.append({"args": list(args), "popen": True, **kwargs})

        class Done:
            returncode = 0

            def wait(self):
                return 0

            def poll(self):
                return 0

        return Done()


@pytest.fixture
def spawned(monkeypatch):
    from tunelab.ui import jobs

    fake = Spawned()
    monkeypatch.setattr(jobs.subprocess, "run", fake.run)
    monkeypatch.setattr(jobs.subprocess, "Popen", fake.popen)
    return fake


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "runs"
    make_runs(root)
    work = tmp_path / "work"
    (work / "configs" / "tiny").mkdir(parents=True)
    (work / "configs" / "tiny" / "sft.yaml").write_text(GOOD)
    return root, work


def client(site, host: str = "127.0.0.1", **options):
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    root, work = site
    return TestClient(create_app([root], workdir=work, **options), base_url=f"http://{host}")


def test_a_forged_host_is_refused_and_starts_no_job(site, spawned):
    evil = client(site, host="rebind.attacker.example")
    for path, body in (("/api/jobs", {"config_text": GOOD}), ("/api/plan", {"config_text": GOOD})):
        refused = evil.post(path, json=body)
        assert refused.status_code == 400 and "--allowed-host" in refused.json()["detail"]
    assert evil.get("/api/runs").status_code == 400  # reading is refused too: a rebound page would read the answer
    assert spawned.calls == [] and client(site).get("/api/jobs").json() == []
    assert not (site[0] / ".ui-configs").exists()  # nothing written either


def test_allowed_host_names_are_served(site, spawned):
    named = client(site, host="gpu-box.lan", allowed_hosts=["gpu-box.lan"])
    assert named.get("/api/runs").status_code == 200
    assert client(site, host="localhost").get("/").status_code == 200


def test_a_post_from_a_foreign_origin_is_refused(site, spawned):
    local = client(site)
    for origin in ("http://attacker.example", "null", "http://127.0.0.1.attacker.example"):
        refused = local.post("/api/jobs", json={"config_text": GOOD}, headers={"Origin": origin})
        assert refused.status_code == 403, origin
    assert spawned.calls == []
    own = local.post("/api/plan", json={"config_text": GOOD}, headers={"Origin": "http://127.0.0.1"})  # the page's fetch
    assert own.status_code == 200 and own.json()["ok"] is True


def test_a_preset_outside_the_listed_ones_is_refused(site, spawned):
    local = client(site)
    for preset in ("/etc/hostname", str(REPO / "configs/smollm2-135m-instruct/sft_lora.yaml"), "../work/configs/x.yaml"):
        refused = local.post("/api/plan", json={"preset": preset})
        assert refused.status_code == 400 and "preset" in refused.json()["detail"], preset
    assert spawned.calls == []
    assert "configs/tiny/sft.yaml" in local.get("/launch").text  # the listed presets are the allowed ones
    assert local.post("/api/plan", json={"preset": "configs/tiny/sft.yaml"}).json()["ok"] is True
    (site[0] / "mine.yaml").write_text(GOOD)  # a config the user put inside the dashboard's folders
    assert local.post("/api/plan", json={"preset": str(site[0] / "mine.yaml")}).json()["ok"] is True


def test_an_output_dir_outside_the_roots_is_refused(site, spawned, tmp_path):
    local = client(site)
    for where in (tmp_path / "elsewhere", site[0] / ".." / "escape", "~/x", Path("relative/to/cwd")):
        for path in ("/api/plan", "/api/jobs"):
            refused = local.post(path, json={"config_text": GOOD, "overrides": f"output_dir={where}"})
            assert refused.status_code == 400 and "output_dir" in refused.json()["detail"], where
    (site[0] / "link").symlink_to(tmp_path / "work")
    refused = local.post("/api/jobs", json={"config_text": GOOD, "overrides": f"output_dir={site[0] / 'link' / 'run'}"})
    assert refused.status_code == 400  # inside the folder by name, outside once the link is followed
    refused = local.post("/api/jobs", json={"config_text": GOOD, "overrides": f"tracking_uri=sqlite:///{tmp_path}/m.db"})
    assert refused.status_code == 400 and "tracking_uri" in refused.json()["detail"]
    assert spawned.calls == []
    inside = local.post("/api/jobs", json={"config_text": GOOD, "overrides": f"output_dir={site[0] / 'mine'}"})
    assert inside.status_code == 200 and inside.json()["output_dir"] == str(site[0] / "mine")


CODE = {
    "metric": GOOD + "eval: {metric: 'evil.module:run'}\n",
    "reward": GOOD + "recipe: {name: grpo, rewards: [{fn: 'evil:reward', weight: 1.0}]}\n",
    "remote code": "model: {path: tiny, trust_remote_code: true}\ndata: {train: train.jsonl}\n",
}


@pytest.mark.parametrize("kind", sorted(CODE))
def test_code_in_a_launched_config_needs_allow_code(site, spawned, kind):
    local = client(site)
    refused = local.post("/api/plan", json={"config_text": CODE[kind]})
    assert refused.status_code == 400 and "--allow-code" in refused.json()["detail"]
    as_override = local.post("/api/jobs", json={"config_text": GOOD, "overrides": "eval.metric=os:system"})
    assert as_override.status_code == 400 and "eval.metric" in as_override.json()["detail"]
    assert spawned.calls == []
    opted_in = client(site, allow_code=True).post("/api/plan", json={"config_text": CODE[kind]})
    assert opted_in.status_code == 200 and opted_in.json()["ok"] is True


def test_jobs_do_not_import_from_their_working_directory(site, spawned):
    root, work = site
    assert client(site).post("/api/jobs", json={"config_text": GOOD}).status_code == 200
    import time

    deadline = time.time() + 10
    while not any(c.get("popen") for c in spawned.calls) and time.time() < deadline:
        time.sleep(0.05)
    plan, train = spawned.calls[0], next(c for c in spawned.calls if c.get("popen"))
    for call in (plan, train):
        assert call["args"][:4] == [sys.executable, "-P", "-m", "tunelab"]
        assert call["env"]["PYTHONSAFEPATH"] == "1"
        assert Path(call["cwd"]) == work  # the dashboard's own working directory, never a folder a config names
    assert train["args"][4] == "train" and train["args"][-1].startswith(f"output_dir={root.resolve()}")


def alias_bomb(levels: int = 9) -> str:
    """A flow YAML sequence of ``levels`` anchors, each holding nine aliases of the one before: 9**levels strings."""
    items = ['&a0 ["x","x","x","x","x","x","x","x","x"]']
    items += [f"&a{n} [" + ",".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, levels)]
    return "[" + ", ".join(items) + "]"


BOMBS = {"config": {"config_text": f"model: tiny\ndata: {{train: train.jsonl}}\neval: {{labels: {alias_bomb()}}}\n"},
         "override": {"config_text": GOOD, "overrides": f"eval.labels='{alias_bomb()}'"}}


@pytest.mark.parametrize("where", sorted(BOMBS))
def test_an_alias_bomb_is_refused_quickly(site, where):
    """The plan route reads the pasted YAML and the overrides with the shared loader, which refuses alias bombs.
    Run in a child with 2 GiB of address space beyond what torch takes, a time limit, and ``tunelab plan`` replaced
    by a failure: a loader that expanded the bomb (9**9 strings), or let it through to plan, fails there, not here."""
    root, work = site
    code = ("import json, re, resource, torch, tunelab.methods, tunelab.recipes; "
            "size = int(re.search(r'VmSize:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30),) * 2); "
            "from fastapi.testclient import TestClient; from tunelab.ui import jobs; from tunelab.ui.app import create_app; "
            "jobs.subprocess.run = lambda *a, **k: (_ for _ in ()).throw(RuntimeError('the bomb reached tunelab plan')); "
            f"c = TestClient(create_app([{str(root)!r}], workdir={str(work)!r}), base_url='http://127.0.0.1'); "
            f"r = c.post('/api/plan', json={BOMBS[where]!r}); print(json.dumps([r.status_code, r.text]))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=work)
    except subprocess.TimeoutExpired:
        pytest.fail("the alias bomb was still being read after 90 s")
    assert done.returncode == 0, done.stderr[-2000:]
    status, text = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == 400 and "alias" in text.lower(), text[:500]


def test_the_launch_page_plans_through_the_guard(tmp_path, tiny_llama):
    """Live, as the page's script does it: a POST with the page's own Origin passes the guard and a real
    ``tunelab plan`` (run with -P from the working directory) accepts the config; a foreign Origin does not."""
    from tunelab.serving.server import BackgroundServer
    from tunelab.ui.app import create_app

    root = tmp_path / "runs"
    root.mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Colour {i}?"},
                                                      {"role": "assistant", "content": "Red."}]}) + "\n" for i in range(4)))
    config = f"model: {tiny_llama}\ndata: {{train: {data}}}\nmethod: {{name: lora, r: 4}}\ntrain: {{batch_size: 2, max_steps: 2}}\n"

    def post(url: str, origin: str) -> tuple[int, dict]:
        request = urllib.request.Request(url + "/api/plan", json.dumps({"config_text": config}).encode(),
                                         {"Content-Type": "application/json", "Origin": origin})
        try:
            with urllib.request.urlopen(request, timeout=240) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    with BackgroundServer(create_app([root], workdir=tmp_path)) as url:
        assert post(url, "http://attacker.example")[0] == 403
        status, answer = post(url, url)
        assert status == 200 and answer["ok"] is True, answer


def test_the_ui_command_passes_its_allowed_hosts_and_allow_code(tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from tunelab.cli import app

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda asgi, **kwargs: served.append(asgi))
    done = CliRunner().invoke(app, ["ui", "--runs", str(tmp_path), "--allowed-host", "box.lan", "--allow-code"])
    assert done.exit_code == 0, done.output
    assert TestClient(served[0], base_url="http://box.lan").get("/api/runs").status_code == 200
    assert TestClient(served[0], base_url="http://other.lan").get("/api/runs").status_code == 400
    metric = TestClient(served[0], base_url="http://box.lan").post("/api/plan", json={"config_text": CODE["metric"],
                                                                                        "overrides": "output_dir=/nowhere"})
    assert metric.status_code == 400 and "--allow-code" not in metric.json()["detail"]  # code allowed; output_dir not
