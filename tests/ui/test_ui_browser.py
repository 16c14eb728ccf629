"""The whole UI flow in the system's headless Chromium, on the tiny model: runs page, a run from the form, its
loss curve gaining points live, stop (Ctrl-C), resume, finish, a second run, compare, chat, language switch.

Needs Chromium (`apt-get install -y chromium`) and Playwright (`pip install -e '.[test,ui]'`); skipped otherwise.
Screenshots go to tmp_path/screenshots (and to $TUNELAB_UI_SCREENSHOTS when set: that is how docs/images/ was made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.ui.conftest import CHROMIUM, LiveServer, tiny_dataset

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason="browser tests need Chromium and Playwright: apt-get install -y chromium && pip install -e '.[test,ui]' "
           "(or set TUNELAB_CHROMIUM to a Chromium binary)")

LONG = 300_000  # ms; a safety limit on a shared 2-core machine, not a timing assertion


class Shots:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.extra = Path(os.environ["TUNELAB_UI_SCREENSHOTS"]) if os.environ.get("TUNELAB_UI_SCREENSHOTS") else None

    def __call__(self, page, name: str) -> None:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=False)
        if self.extra is not None:
            shutil.copy(path, self.extra / path.name)


def fill_form(page, fields: dict[str, str]) -> None:
    page.goto(page.url.split("#")[0] + "#/new")
    page.wait_for_selector("#f-model-name")
    page.eval_on_selector_all("#config-form details", "els => els.forEach(d => d.open = true)")
    for key, value in fields.items():
        sel = "#f-" + key.replace(".", "-", 1)
        if page.eval_on_selector(sel, "el => el.tagName") == "SELECT":
            page.select_option(sel, value)
        else:
            page.fill(sel, value)
    page.wait_for_function("name => document.querySelector('#yaml').value.includes(name)", arg=fields["output.run_name"])
    page.wait_for_function("() => document.querySelector('#config-error').hidden")


def points(page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points") or 0)


def wait_status(page, status: str) -> None:
    page.wait_for_selector(f'#run-status [data-status="{status}"]', timeout=LONG)


def test_browser_flow(workdir, tiny_model_dir, tmp_path, no_dtype_second_pass):
    from tunelab.ui.app import create_app

    data = tiny_dataset(workdir)
    shots = Shots(tmp_path / "screenshots")
    common = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.train": data, "data.max_length": "64",
              "training.batch_size": "2", "training.logging_steps": "1", "eval.metrics": "[perplexity]",
              "tracking.report_to": "[none]"}
    with LiveServer(create_app("outputs", workdir=workdir, poll_s=0.3)) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": 860})
        page.set_default_timeout(60_000)
        page.goto(server.url + "/#/runs")
        page.wait_for_selector("#runs-table caption")  # no runs yet

        # ---- a run from the form: dataset validated first, then the exact command started
        fill_form(page, {**common, "training.max_steps": "60", "training.save_steps": "5",
                         "output.run_name": "first"})
        page.click("#btn-validate")
        page.wait_for_selector("#validate-rejected >> text=line 25")  # the empty record: file, line, reason
        assert "tunelab validate data/raw/tiny.jsonl" in page.inner_text("#validate-report")
        assert page.inner_text("#train-command").strip() == "$ tunelab train --config configs/first.yaml"
        shots(page, "new-run")
        page.click("#btn-start")
        page.wait_for_url("**/#/run/first")
        page.wait_for_selector("#chart-loss", timeout=LONG)

        # ---- live: the loss curve gains points without a reload
        page.wait_for_function("() => +document.querySelector('#chart-loss').dataset.points >= 2", timeout=LONG)
        before = points(page)
        page.wait_for_function(f"() => +document.querySelector('#chart-loss').dataset.points > {before}",
                               timeout=LONG)
        shots(page, "run-live")

        # ---- stop = Ctrl-C: checkpoint, interrupted; resume continues to the end
        page.click("#btn-stop")
        wait_status(page, "interrupted")
        assert "Resume with: tunelab train --resume" in page.inner_text("#log")
        page.click("#btn-resume")
        page.wait_for_selector("#last-command >> text=tunelab train --resume outputs/first")
        wait_status(page, "finished")
        page.wait_for_selector("#artefacts >> text=checkpoint-final")
        made_by = page.inner_text("#artefacts")  # the first command, then the resume that finished it
        assert "$ tunelab train --config configs/first.yaml\n$ tunelab train --resume outputs/first" in made_by
        assert "line 25" in page.inner_text("#rejected")
        shots(page, "run-finished")

        # ---- a second run, then compare the two
        fill_form(page, {**common, "training.max_steps": "4", "lora.r": "8", "output.run_name": "second"})
        page.click("#btn-start")
        page.wait_for_url("**/#/run/second")
        page.wait_for_selector("#chart-loss", timeout=LONG)
        wait_status(page, "finished")
        page.goto(server.url + "/#/runs")
        page.wait_for_selector('tr[data-run="second"] [data-status="finished"]', timeout=LONG)
        page.check('input[data-run="first"]')
        page.check('input[data-run="second"]')
        shots(page, "runs")
        page.click("#compare-btn")
        page.wait_for_selector("#config-diff >> text=lora.r")
        assert "★" in page.inner_text("#metrics-table")
        assert "training.max_steps" in page.inner_text("#config-diff")
        assert "output.run_name" not in page.inner_text("#config-diff")
        page.click("#btn-export")
        page.wait_for_selector("#export-link")
        shots(page, "compare")

        # ---- chat: base and fine-tuned answers side by side
        page.goto(server.url + "/#/chat/first")
        page.fill("#chat-max", "8")
        page.fill("#chat-prompt", "What is 2 plus 2?")
        page.click("#chat-send")
        page.wait_for_selector('#chat-base [data-done]', timeout=LONG)
        page.wait_for_selector('#chat-tuned [data-done]', timeout=LONG)
        assert page.get_attribute('#chat-tuned [data-done]', 'data-done') in ('stop', 'length')
        shots(page, "chat")

        # ---- 中文
        page.select_option("#lang", "zh")
        page.goto(server.url + "/#/runs")
        page.wait_for_selector('tr[data-run="first"]')
        assert "实验列表" in page.inner_text("main") and "已完成" in page.inner_text("#runs-table")
        shots(page, "runs-zh")
        browser.close()
    assert (workdir / "configs" / "first.yaml").is_file()
    assert len(list((tmp_path / "screenshots").glob("*.png"))) == 7
