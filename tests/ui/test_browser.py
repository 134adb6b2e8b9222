"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a live ``tunelab ui``
app on 127.0.0.1 (started and stopped by the test) over hand-made run directories."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .fake_runs import make_runs

REPO = Path(__file__).resolve().parents[2]


def chromium() -> str | None:
    """Debian's chromium binary (the package's launcher script wraps it), or $TUNELAB_CHROMIUM."""
    for candidate in (os.environ.get("TUNELAB_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


pytestmark = pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (make setup-test installs it)")


SHOTS = Path(os.environ.get("TUNELAB_SCREENSHOTS", "")) if os.environ.get("TUNELAB_SCREENSHOTS") else None


def shot(page, name: str, tmp: Path) -> None:
    """Save what the page looks like (to $TUNELAB_SCREENSHOTS when set, else beside the test's files)."""
    folder = SHOTS or tmp
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_llama):
    from playwright.sync_api import sync_playwright

    from serving.conftest import train_tiny_run
    from tunelab.serving.server import BackgroundServer
    from tunelab.ui.app import create_app

    root = tmp_path_factory.mktemp("ui") / "runs"
    made = make_runs(root)
    made["tiny"] = train_tiny_run(root, tiny_llama, "tiny-red", ["red", "pink"])
    with BackgroundServer(create_app([root])) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield url, browser, made
        browser.close()


def test_runs_table_sorts_filters_and_links_to_a_run(site):
    url, browser, made = site
    page = browser.new_page()
    page.goto(url + "/")
    assert page.locator("tr.run").count() == 5
    shot(page, "runs", made["finished"].parent)
    assert page.locator("tr.run[data-status=interrupted]").count() == 1
    page.fill("#filter", "diverged")
    assert page.locator("tr.run:visible").count() == 1 and page.text_content("#count") == "1 runs"
    page.fill("#filter", "")
    page.click("th[data-sort=tuned]")  # descending: the run with a score first
    assert page.locator("tr.run").first.locator("td").first.text_content() == "sql-lora"
    page.click("text=sql-lora")
    page.wait_for_selector("#chart polyline")
    assert page.locator("#chart polyline").get_attribute("data-points") == "4"
    assert page.locator("#series option").all_text_contents() == ["loss", "lr"]
    page.close()


def test_the_predictions_filter_shows_what_changed(site):
    url, browser, _ = site
    page = browser.new_page()
    page.goto(url + "/run/0/sql-lora")
    assert page.locator("#predictions tr.prediction:visible").count() == 4
    page.check("#changed-only")
    assert page.locator("#predictions tr.prediction:visible").count() == 2
    assert "What colour is snow?" in page.text_content(".probe-lost")
    shot(page, "run", site[2]["finished"].parent)
    page.close()


def test_a_running_run_updates_its_curve_without_a_reload(site):
    url, browser, made = site
    page = browser.new_page()
    page.goto(url + "/run/0/pipeline/dpo/run?poll=0.3")
    page.wait_for_selector("#chart polyline[data-points='2']")
    with (made["running"] / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.5, "lr": 1e-4}) + "\n")
    page.wait_for_selector("#chart polyline[data-points='3']", timeout=10_000)
    page.close()


def test_chat_answers_as_tunelab_eval_and_side_by_side(site):
    from tunelab.evaluation.generate import generate_answers
    from tunelab.evaluation.run import load_for_eval

    url, browser, made = site
    loaded = load_for_eval(str(made["tiny"]))
    expected = generate_answers(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "Colour 3?"}]], max_new_tokens=128)[0]
    page = browser.new_page()
    page.goto(url + "/chat")
    page.select_option("#model-a", "run:0/tiny-red")
    page.select_option("#model-b", index=len(page.locator("#model-b option").all()) - 1)  # the base model
    page.fill("#prompt", "Colour 3?")
    page.click("#send")
    page.wait_for_selector("#chat-status[data-done=yes]", state="attached", timeout=60_000)
    assert page.text_content("#answer-a") == expected
    assert page.text_content("#label-b").startswith("base ")
    shot(page, "chat", made["finished"].parent)
    page.close()


def test_a_run_launched_from_the_page_trains_and_shows_up(site, tiny_llama, tmp_path):
    url, browser, made = site
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Colour {i}?"},
                                                      {"role": "assistant", "content": "It is red."}]}) + "\n" for i in range(8)))
    config = (f"model: {tiny_llama}\ndata: {{train: {data}}}\nmethod: {{name: lora, r: 4}}\n"
              "train: {batch_size: 4, max_steps: 300, lr: 1.0e-3, warmup_ratio: 0, log_every: 1, save_every: 1000}\n"
              "eval: {probe: false, before: false}\n")
    page = browser.new_page()
    page.goto(url + "/launch")
    page.fill("#config-text", "model: [unclosed")
    page.click("#check")
    page.wait_for_selector("#plan[data-verdict=refused]", timeout=120_000)
    assert page.is_disabled("#start")  # a config that does not validate never reaches the queue
    page.fill("#config-text", config)
    page.click("#check")
    page.wait_for_selector("#plan[data-verdict=ok]", timeout=120_000)
    assert "fits" in page.text_content("#plan")
    page.click("#start")
    page.wait_for_selector("tr.job[data-status=running] a", timeout=120_000)  # the run directory exists: training
    run = page.locator("tr.job a").first.get_attribute("href")
    live = browser.new_page()  # its page while it trains: the loss curve grows without a reload
    live.goto(url + run + "?poll=0.3")
    live.wait_for_selector("#chart polyline", timeout=120_000)
    seen = int(live.locator("#chart polyline").get_attribute("data-points"))
    live.wait_for_function(f"Number(document.querySelector('#chart polyline').dataset.points) > {seen}", timeout=120_000)
    shot(live, "live", made["finished"].parent)
    live.close()
    page.wait_for_selector("tr.job[data-status=finished]", timeout=300_000)
    shot(page, "launch", made["finished"].parent)
    page.goto(url + "/")
    assert page.locator("tr.run[data-status=finished]").count() == 3  # sql-lora, tiny-red and the launched run
    page.close()


def test_the_data_page_lists_bad_records_and_shows_the_loss_mask(site):
    url, browser, made = site
    root = made["finished"].parent
    bad = root / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi?"}]}\nnot json\n')
    good = root / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}]}) + "\n")
    page = browser.new_page()
    page.goto(url + "/data")
    tiny = next(o for o in page.locator("#data-model option").all_text_contents() if o.startswith("/"))
    page.select_option("#data-model", tiny)
    page.fill("#data-path", str(bad))
    page.click("#inspect")
    page.wait_for_selector("#problems li")
    problems = page.locator("#problems li").all_text_contents()
    assert any("bad.jsonl:1" in p for p in problems) and any("bad.jsonl:2" in p for p in problems)
    page.fill("#data-path", str(good))
    page.click("#inspect")
    page.wait_for_selector("#loss-mask mark")
    assert "Red" in "".join(page.locator("#loss-mask mark").all_text_contents())  # the answer is trained
    assert "Colour" not in "".join(page.locator("#loss-mask mark").all_text_contents())  # the prompt is not
    shot(page, "data", root)
    page.fill("#data-path", "/etc/passwd")
    page.click("#inspect")
    page.wait_for_function("document.getElementById('data-result').textContent.includes('outside')")
    page.close()


def test_a_launched_run_can_be_cancelled(site, tiny_llama, tmp_path):
    url, browser, _ = site
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Colour {i}?"},
                                                      {"role": "assistant", "content": "It is red."}]}) + "\n" for i in range(8)))
    page = browser.new_page()
    page.goto(url + "/launch")
    page.fill("#config-text", f"model: {tiny_llama}\ndata: {{train: {data}}}\nmethod: {{name: lora, r: 4}}\n"
                              "train: {batch_size: 4, max_steps: 100000, warmup_ratio: 0, save_every: 1000000}\neval: {probe: false}\n")
    page.click("#check")
    page.wait_for_selector("#plan[data-verdict=ok]", timeout=120_000)
    page.click("#start")
    page.wait_for_selector("tr.job[data-status=running] a", timeout=120_000)
    page.locator("tr.job[data-status=running] button.cancel").click()
    page.wait_for_selector("tr.job[data-status=cancelled]", timeout=60_000)
    page.close()
    import time
    import urllib.request

    deadline = time.time() + 60
    while time.time() < deadline:  # the training process itself has ended (SIGINT, as Ctrl-C)
        jobs = json.loads(urllib.request.urlopen(url + "/api/jobs", timeout=10).read())
        if jobs[-1]["returncode"] is not None:
            break
        time.sleep(0.5)
    assert jobs[-1]["status"] == "cancelled" and jobs[-1]["returncode"] is not None


@pytest.mark.slow
def test_the_demo_started_from_the_page(site, tmp_path):
    """The newcomer's path on the real model: start the demo from the launch page (shortened by overrides), watch
    its progress and its loss curve grow, read untuned versus tuned answers and the probe, chat with the result
    (the answer its evaluation recorded); the run's figures are then re-checked independently (``sql_checks``)."""
    from sql_checks import check_sql_run

    url, browser, made = site
    root = made["finished"].parent
    probe = tmp_path / "probe.jsonl"
    probe.write_text("\n".join((REPO / "src/tunelab/evaluation/probes/general.jsonl").read_text().splitlines()[:6]) + "\n")
    page = browser.new_page()
    page.goto(url + "/launch")
    page.select_option("#preset", "demo")
    page.fill("#overrides", f"train.max_steps=12 eval.limit=8 eval.few_shot=1 eval.probe={probe}")
    page.click("#check")
    page.wait_for_selector("#plan[data-verdict=ok]", timeout=300_000)
    page.click("#start")
    demo = "tr.job[data-config=demo]"  # earlier tests of this module queued other jobs
    page.wait_for_selector(f"{demo}[data-status=running] .progress:not([data-total])", timeout=120_000)  # preparing
    page.wait_for_selector(f"{demo}[data-status=running] .progress[data-total='12']", timeout=600_000)  # training: a bar
    shot(page, "launch-demo", root)
    run = page.locator(f"{demo} a").first.get_attribute("href")
    live = browser.new_page()
    live.goto(url + run + "?poll=0.3")
    live.wait_for_selector("#chart polyline", timeout=120_000)
    seen = int(live.locator("#chart polyline").get_attribute("data-points"))
    assert seen < 12
    live.wait_for_function(f"Number(document.querySelector('#chart polyline').dataset.points) > {seen}", timeout=300_000)
    live.close()
    page.wait_for_selector(f"{demo}[data-status=finished]", timeout=900_000)

    run_dir = root / run.split("/", 3)[3]
    page.goto(url + run)
    assert page.locator("#predictions tr.prediction").count() == 8  # untuned and tuned answer beside the reference
    assert page.text_content("#probe-counts").startswith("6 items")
    shot(page, "demo-run", root)
    report = json.loads((run_dir / "eval.json").read_text())
    example = json.loads((REPO / "src/tunelab/examples/sql/test.jsonl").read_text().splitlines()[0])["messages"]
    page.goto(url + "/chat")
    page.select_option("#model-a", "run:" + run.split("/", 2)[2])
    page.fill("#system", example[0]["content"])
    page.fill("#prompt", example[1]["content"])
    page.click("#send")
    page.wait_for_selector("#chat-status[data-done=yes]", state="attached", timeout=120_000)
    assert report["tuned"]["examples"][0]["prompt"] == example[1]["content"]
    assert page.text_content("#answer-a") == report["tuned"]["examples"][0]["prediction"]
    page.close()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    db = Path(next(line.split(":", 1)[1].strip() for line in config.splitlines() if line.strip().startswith("db:")))
    check_sql_run(run_dir, run_dir / manifest["artifact"], db, max_new_tokens=40, probe_items=6)
