"""The dashboard in a real browser: ``streamlit run`` on a free localhost port, driven by
Debian's headless Chromium through Playwright; takes a screenshot into the test's temporary
folder, or over ``docs/dashboard.png`` with ``TL_NOISE_UPDATE_SCREENSHOT=1`` (to update it).

Needs ``/usr/bin/chromium``: ``bash scripts/install_browser.sh`` installs it (apt).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tl_noise.cli.app import launch

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"
UPDATE_SCREENSHOT = "TL_NOISE_UPDATE_SCREENSHOT"
CHROMIUM = "/usr/bin/chromium"
INSTALL = (
    "bash scripts/install_browser.sh  (apt-get update && apt-get install -y chromium "
    "chromium-driver)"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, embedded_fit) -> Path:
    root = tmp_path_factory.mktemp("browser-runs")
    embedded_fit(root / "induction", steps=60, checkpoint_every=20)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dashboard_server(root: Path):
    port = free_port()
    proc = launch(root, port=port, block=False)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {proc.returncode} before serving")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not answer on {url} within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except Exception:
            proc.kill()
            proc.wait(timeout=15)


def screenshot_path(tmp_path: Path) -> Path:
    """docs/dashboard.png when ``TL_NOISE_UPDATE_SCREENSHOT=1``, else a temporary file."""
    update = os.environ.get(UPDATE_SCREENSHOT) == "1"
    return DOCS_SCREENSHOT if update else tmp_path / "dashboard.png"


def test_dashboard_renders_in_headless_chromium(runs_root, tmp_path):
    screenshot = screenshot_path(tmp_path)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}; install it with: {INSTALL}")
    from playwright.sync_api import expect, sync_playwright

    problems: list[str] = []
    with dashboard_server(runs_root) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.goto(f"{url}/?run=induction", wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=90_000)

            expect(page.get_by_role("heading", name="tl-noise dashboard")).to_be_visible()
            expect(page.get_by_text("completed", exact=False).first).to_be_visible()
            heatmap = page.locator(".js-plotly-plot").filter(has_text="Std per head at step 59")
            expect(heatmap).to_have_count(1)
            expect(heatmap.locator(".heatmaplayer")).to_have_count(1)
            expect(page.get_by_text("Std per head over training")).to_be_visible()
            for tab in ("Other hooks", "Gradients", "Losses", "Ranking", "Compare"):
                expect(page.get_by_role("tab", name=tab)).to_be_visible()

            page.get_by_role("tab", name="Gradients").click()
            grads = page.locator(".js-plotly-plot").filter(has_text="Cosine(noise, task)")
            expect(grads.locator(".heatmaplayer")).to_have_count(1)
            expect(page.get_by_text("Head L0H0: gradients and their projection")).to_be_visible()
            page.get_by_role("tab", name="Ranking").click()
            expect(page.get_by_test_id("stDataFrame")).to_be_visible()
            expect(page.get_by_test_id("stDownloadButton")).to_be_visible()

            page.get_by_role("tab", name="Stds per head").click()
            expect(heatmap).to_be_visible()
            page.wait_for_timeout(500)  # let plotly finish its transition before the picture
            screenshot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    assert not problems, f"browser console errors: {problems}"
