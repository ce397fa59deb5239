"""The dashboard in a real browser: ``streamlit run`` on a free localhost port, driven by
Debian's headless Chromium through Playwright. Two pages: a node-level run's views, and an edge
run's circuit graph (its size slider moved by keyboard, an edge's hover text read). Each takes a
screenshot into the test's temporary folder, or over ``docs/dashboard.png`` and
``docs/circuit_graph.png`` with ``TL_NOISE_UPDATE_SCREENSHOT=1`` (``make screenshot``).

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
DOCS = REPO / "docs"
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


def screenshot_path(tmp_path: Path, name: str = "dashboard.png") -> Path:
    """docs/``name`` when ``TL_NOISE_UPDATE_SCREENSHOT=1``, else a temporary file."""
    update = os.environ.get(UPDATE_SCREENSHOT) == "1"
    return DOCS / name if update else tmp_path / name


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


@pytest.fixture(scope="module")
def edge_root(tmp_path_factory) -> Path:
    """An edge run on the ``backup`` benchmark (40 steps, the curve measured at its end)."""
    import tl_noise as tn
    from tl_noise.zoo import load_benchmark

    root = tmp_path_factory.mktemp("browser-edge-runs")
    bench = load_benchmark("backup")
    task = bench.task(64, seed=0)
    with tn.attach_edge_noise(bench.model, calibration_tokens=task.tokens) as noise:
        tn.fit(bench.model, noise, task, steps=40, quiet=True, run_dir=root / "edges")
    return root


def test_circuit_graph_renders_for_an_edge_run(edge_root, tmp_path):
    from tl_noise.edges.circuit import rank_edges
    from tl_noise.runs import Run

    screenshot = screenshot_path(tmp_path, "circuit_graph.png")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}; install it with: {INSTALL}")
    from playwright.sync_api import expect, sync_playwright

    run = Run(edge_root / "edges")
    scores = run.edge_scores()
    ranked = rank_edges(scores, list(scores))
    curve = run.edge_curve()
    sizes, values = curve["k"], curve["faithfulness"]
    start = next((k for k, f in zip(sizes, values, strict=True) if f >= 0.8), sizes[-1])
    smaller = sizes[sizes.index(start) - 1]  # one step left of the slider's start
    problems: list[str] = []
    with dashboard_server(edge_root) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.goto(f"{url}/?run=edges", wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=90_000)

            tabs = page.get_by_role("tab")
            expect(tabs).to_have_text(["Circuit graph", "Losses", "Per-head views"])
            title = f"Circuit graph: top {start} of {len(scores)} edges (the fitted noise)"
            chart = page.locator(".js-plotly-plot").filter(has_text=title)
            expect(chart).to_have_count(1)
            expect(page.get_by_text("Cannot show")).to_have_count(0)

            page.get_by_role("slider").nth(1).press("ArrowLeft")  # the circuit size slider
            title = f"Circuit graph: top {smaller} of {len(scores)} edges (the fitted noise)"
            chart = page.locator(".js-plotly-plot").filter(has_text=title)
            expect(chart).to_have_count(1, timeout=30_000)
            measured = values[sizes.index(smaller)]
            metric = page.get_by_test_id("stMetric").filter(has_text="Measured faithfulness")
            expect(metric).to_contain_text(f"{measured:.4g}")
            expect(chart.locator(".scatterlayer .trace")).not_to_have_count(0)

            hover = chart.locator(".scatterlayer .trace").filter(has=page.locator(".point"))
            first = hover.first.locator(".point").first  # the top edge's midpoint marker
            first.hover(force=True)
            label = chart.locator(".hoverlayer")
            expect(label).to_contain_text(ranked[0])
            expect(label).to_contain_text(f"{scores[ranked[0]]:.6g}")
            expect(label).to_contain_text(f"rank 1 of {len(scores)}")
            page.mouse.move(5, 5)  # no hover label in the picture

            page.wait_for_timeout(500)  # let plotly finish its transition before the picture
            box = page.get_by_test_id("stTabs").bounding_box()
            bottom = chart.bounding_box()
            assert box is not None and bottom is not None
            screenshot.parent.mkdir(exist_ok=True)
            clip = {"x": box["x"], "y": box["y"], "width": box["width"],
                    "height": bottom["y"] + bottom["height"] - box["y"]}  # fmt: skip
            page.screenshot(path=str(screenshot), clip=clip, full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    assert not problems, f"browser console errors: {problems}"
