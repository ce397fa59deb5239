"""The README's figure: each method's top-k faithfulness curve against the optimum, per model.

``.venv/bin/python -m benchmarks.quality.figure [RESULTS_JSON] [--out docs/faithfulness.png]``
draws the curves with plotly and takes the PNG with headless Chromium (``/usr/bin/chromium``,
through playwright), as the dashboard's screenshot is taken.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from benchmarks.quality.__main__ import RESULTS

SHOWN = ("tl-noise", "tl-noise, one fit (no refine)", "mean ablation",
         "attribution patching (TL)", "subnetwork probing", "acdc greedy")  # fmt: skip
CHROMIUM = "/usr/bin/chromium"


def figure(results: dict) -> go.Figure:
    names = list(results)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    palette = ("#d62728", "#ff9896", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f")
    for col, name in enumerate(names, start=1):
        model = results[name]
        ks = list(range(len(model["optimum"])))
        fig.add_trace(go.Scatter(x=ks, y=model["optimum"], name="optimum f*(k)",
                                 line={"color": "black", "width": 3}, showlegend=col == 1),
                      row=1, col=col)  # fmt: skip
        for method, colour in zip(SHOWN, palette, strict=True):
            row = model["methods"].get(method)
            if row is None:
                continue
            fig.add_trace(go.Scatter(x=ks, y=row["curve"], name=method, showlegend=col == 1,
                                     line={"color": colour, "dash": "solid" if method ==
                                           "tl-noise" else "dot"}), row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text="k (nodes kept)", row=1, col=col)
    fig.update_yaxes(title_text="faithfulness f(top k)", range=[-0.3, 1.15], row=1, col=1)
    fig.update_layout(width=420 * len(names), height=430, template="plotly_white",
                      legend={"orientation": "h", "y": -0.22})  # fmt: skip
    return fig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", nargs="?", type=Path, default=RESULTS / "attribution_quality.json")
    p.add_argument("--out", type=Path, default=Path("docs/faithfulness.png"))
    args = p.parse_args(argv)
    fig = figure(json.loads(args.results.read_text()))
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "figure.html"
        fig.write_html(page_file, include_plotlyjs="inline", full_html=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": int(fig.layout.width) + 40,
                                              "height": int(fig.layout.height) + 40})  # fmt: skip
            page.goto(page_file.as_uri())
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
