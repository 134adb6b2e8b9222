"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a live ``tunelab ui``
app on 127.0.0.1 (started and stopped by the test) over hand-made run directories."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .fake_runs import make_runs


def chromium() -> str | None:
    """Debian's chromium binary (the package's launcher script wraps it), or $TUNELAB_CHROMIUM."""
    for candidate in (os.environ.get("TUNELAB_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


pytestmark = pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (make setup-test installs it)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    from tunelab.serving.server import BackgroundServer
    from tunelab.ui.app import create_app

    root = tmp_path_factory.mktemp("ui") / "runs"
    made = make_runs(root)
    with BackgroundServer(create_app([root])) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield url, browser, made
        browser.close()


def test_runs_table_sorts_filters_and_links_to_a_run(site):
    url, browser, _ = site
    page = browser.new_page()
    page.goto(url + "/")
    assert page.locator("tr.run").count() == 4
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
