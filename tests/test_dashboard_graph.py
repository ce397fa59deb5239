"""The dashboard's circuit graph (tl_noise.dashboard.circuit and .graph) on real run directories.

A module fixture fits edge noise and node noise on the ``backup`` benchmark (a few steps each),
then derives an edge run still being written and two damaged ones. Streamlit's AppTest drives the
page; the graph's numbers are checked against the run reader: the edges drawn are exactly the
top-k of ``Run.edge_scores()``, the faithfulness shown is the stored one for the chosen k, and
the hover text carries the exact scores.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("pandas")  # the app extra (absent from the 3.x environment)
pytest.importorskip("plotly")
streamlit_testing = pytest.importorskip("streamlit.testing.v1")

import tl_noise as tn  # noqa: E402
from tl_noise.dashboard import graph  # noqa: E402
from tl_noise.edges import EdgeGraph  # noqa: E402
from tl_noise.edges.circuit import rank_edges  # noqa: E402
from tl_noise.io import write_json  # noqa: E402
from tl_noise.names import NODE_HOOKS  # noqa: E402
from tl_noise.runs import Run  # noqa: E402

AppTest = streamlit_testing.AppTest
APP = Path(__file__).resolve().parent.parent / "apps" / "dashboard.py"
STEPS = 6
TITLE = "Circuit graph: top {k} of {n} edges ({source})"


@pytest.fixture(scope="module")
def graph_root(tmp_path_factory) -> Path:
    from tl_noise.zoo import load_benchmark

    root = tmp_path_factory.mktemp("graph-runs")
    bench = load_benchmark("backup")
    task = bench.task(32, seed=0)
    with tn.attach_edge_noise(bench.model, calibration_tokens=task.tokens) as noise:
        tn.fit(bench.model, noise, task, steps=STEPS, batch_size=16, quiet=True,
               run_dir=root / "edges")  # fmt: skip
    with tn.attach_noise(bench.model, NODE_HOOKS, calibration_tokens=task.tokens) as noise:
        tn.fit(bench.model, noise, task, steps=STEPS, batch_size=16, quiet=True,
               refine_window=0, run_dir=root / "nodes")  # fmt: skip

    live = root / "edges-live"  # still being written: no final noise, no summary, no curve
    shutil.copytree(root / "edges", live)
    shutil.rmtree(live / "final")
    (live / "summary.json").unlink()
    write_json(live / "status.json", {"state": "running", "step": STEPS, "message": ""})

    bad_curve = root / "edges-bad-curve"
    shutil.copytree(root / "edges", bad_curve)
    summary = json.loads((bad_curve / "summary.json").read_text())
    summary["ranking_info"]["faithfulness"] = {"k": [1, 2], "faithfulness": ["high"]}
    write_json(bad_curve / "summary.json", summary)

    resample = root / "edges-resample"  # as a fit with corrupted tokens records it
    shutil.copytree(root / "edges", resample)
    summary = json.loads((resample / "summary.json").read_text())
    summary["ranking_info"]["ablation"] = "resample"
    write_json(resample / "summary.json", summary)

    bad_graph = root / "edges-bad-graph"
    shutil.copytree(root / "edges", bad_graph)
    config = json.loads((bad_graph / "config.json").read_text())
    config["noise"]["graph"] = {"n_layers": "three"}
    write_json(bad_graph / "config.json", config)
    return root


def open_app(monkeypatch, root: Path, run: str) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["dashboard.py", str(root)])
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = run
    return at.run()


def charts(at: AppTest) -> dict[str, dict]:
    """Rendered plotly figures by title."""
    out = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        out[spec["layout"].get("title", {}).get("text", "")] = spec
    return out


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def trace(fig: dict, name: str) -> dict:
    (found,) = [t for t in fig["data"] if t.get("name") == name]
    return found


def line_traces(fig: dict) -> list[dict]:
    return [t for t in fig["data"] if t.get("mode") == "lines"]


def floats(data) -> list[float]:
    """A plotly array (a list, or base64 binary) as floats."""
    if isinstance(data, dict):
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"]).tolist()
    return [math.nan if v is None else float(v) for v in data]


def n_paths(ys: list[float]) -> int:
    """The paths of a NaN-separated polyline."""
    return sum(
        1 for i, v in enumerate(ys) if not math.isnan(v) and (i == 0 or math.isnan(ys[i - 1]))
    )


def check_edges_drawn(at: AppTest, run: Run, k: int, step: int | None = None) -> None:
    """The graph draws exactly the top ``k`` edges of ``run.edge_scores(step)``, hover data and
    text with their exact numbers, the table lists them."""
    scores = run.edge_scores(step)
    ranked = rank_edges(scores, list(scores))
    source = "the fitted noise" if step is None else f"step {step}"
    fig = charts(at)[TITLE.format(k=k, n=len(scores), source=source)]
    hover = trace(fig, "edge (hover)")
    assert [row[0] for row in hover["customdata"]] == ranked[:k]
    for name, score, std, rank in hover["customdata"]:
        assert score == scores[name]  # exact: JSON floats round-trip
        assert std == pytest.approx(math.exp(-scores[name]), rel=1e-12)
        assert ranked[rank - 1] == name
    for text, (name, score, _, rank) in zip(hover["text"], hover["customdata"], strict=True):
        shown = name.replace("<", "&lt;").replace(">", "&gt;")
        assert f"<b>{shown}</b>" in text and f"{score:.6g}" in text
        assert f"rank {rank} of {len(scores)}" in text
    bins = line_traces(fig)
    assert sum(n_paths(floats(t["y"])) for t in bins) == k
    widths = [t["line"]["width"] for t in bins]
    assert widths == sorted(widths)  # the higher bins are drawn wider (and last)
    counts = [int(t["name"].rsplit("(", 1)[1].rstrip(")")) for t in bins]
    assert sum(counts) == k
    (table,) = [d.value for d in at.dataframe]  # the edge table, the only one on the page
    assert table["edge"].tolist() == ranked[:k] and table["rank"].tolist() == list(range(1, k + 1))


def test_edge_run_shows_the_graph_first_and_explains_the_per_head_views(graph_root, monkeypatch):
    at = open_app(monkeypatch, graph_root, "edges")
    assert_clean(at)
    assert not at.warning
    assert [s.value for s in at.subheader] == ["Circuit graph", "Loss curves", "Per-head views"]
    assert any("edge-level run" in i.value for i in at.info)
    assert "Losses" in charts(at)


def test_edge_graph_draws_the_top_k_with_the_measured_faithfulness(graph_root, monkeypatch):
    run = Run(graph_root / "edges")
    curve = run.edge_curve()
    n_edges = len(run.edge_scores())
    assert curve is not None and curve["k"][-1] == n_edges == run.edge_graph().n_edges
    at = open_app(monkeypatch, graph_root, "edges")
    slider = at.select_slider(key=f"{run.path}-circuit-k-measured")
    assert [int(o) for o in slider.options] == curve["k"]
    reached = [k for k, f in zip(curve["k"], curve["faithfulness"], strict=True) if f >= 0.8]
    default = reached[0] if reached else curve["k"][-1]
    assert int(slider.value) == default
    for k in (default, curve["k"][0], curve["k"][2]):
        if k != default:
            at.select_slider(key=f"{run.path}-circuit-k-measured").set_value(k).run()
        assert_clean(at)
        check_edges_drawn(at, run, k)
        measured = curve["faithfulness"][curve["k"].index(k)]
        metric = at.metric[1]
        assert metric.label == "Measured faithfulness of the drawn circuit"
        assert metric.value == f"{measured:.4g}"
        assert at.metric[0].value == f"{k} of {n_edges}"
        marked = trace(charts(at)[graph_curve_title()], "drawn")
        assert marked["x"] == [k] and marked["y"] == [measured]


def test_the_graph_says_how_the_edges_outside_it_were_ablated(graph_root, monkeypatch):
    for name, ablation in [("edges", "mean"), ("edges-resample", "resample")]:
        assert Run(graph_root / name).edge_ablation() == ablation
        at = open_app(monkeypatch, graph_root, name)
        assert_clean(at)
        said = [c.value for c in at.caption if "outside the drawn circuit" in c.value]
        assert said == [f"Every edge outside the drawn circuit is {ablation}-ablated " + (
            "(its writer's mean contribution)." if ablation == "mean"
            else "(its writer's contribution on the example's counterfactual).")]  # fmt: skip


def graph_curve_title() -> str:
    return "Faithfulness of the top-k edges (measured at the end of the fit)"


def test_scrubbing_back_shows_that_steps_scores_without_faithfulness(graph_root, monkeypatch):
    run = Run(graph_root / "edges")
    at = open_app(monkeypatch, graph_root, "edges")
    k = int(at.select_slider(key=f"{run.path}-circuit-k-measured").value)
    at.select_slider(key="step").set_value(2).run()
    assert_clean(at)
    # no faithfulness was measured at step 2: any size, starting at the last one chosen
    assert at.slider(key=f"{run.path}-circuit-k-any").value == k
    check_edges_drawn(at, run, k, step=2)
    assert at.metric[1].value == "-"
    assert any("only for the fitted noise" in c.value for c in at.caption)
    assert graph_curve_title() not in charts(at)


def test_running_edge_run_draws_its_latest_record(graph_root, monkeypatch):
    run = Run(graph_root / "edges-live")
    at = open_app(monkeypatch, graph_root, "edges-live")
    assert_clean(at)
    n_edges = run.edge_graph().n_edges
    slider = at.slider(key=f"{run.path}-circuit-k-any")
    assert (slider.min, slider.max, slider.value) == (1, n_edges, min(n_edges, 50))
    check_edges_drawn(at, run, slider.value)  # edge_scores(): the newest full record
    assert any("No faithfulness was measured" in c.value for c in at.caption)
    slider.set_value(7).run()
    check_edges_drawn(at, run, 7)


def test_damaged_edge_runs_show_messages(graph_root, monkeypatch):
    at = open_app(monkeypatch, graph_root, "edges-bad-curve")
    assert_clean(at)
    assert any("measured faithfulness is not shown" in w.value for w in at.warning)
    check_edges_drawn(at, Run(graph_root / "edges-bad-curve"), 50)  # drawn as if none measured
    at = open_app(monkeypatch, graph_root, "edges-bad-graph")
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "Cannot show the edge graph" in errors[0]
    assert "no edge graph in its config" in errors[0]
    assert "Losses" in charts(at)  # the rest of the page still shows


def test_node_run_draws_nodes_only(graph_root, monkeypatch):
    run = Run(graph_root / "nodes")
    at = open_app(monkeypatch, graph_root, "nodes")
    assert_clean(at)
    subheaders = [s.value for s in at.subheader]
    assert subheaders[-2:] == ["Circuit graph", "Compare two runs"]
    scores = run.summary()["node_importance"]
    fig = charts(at)[f"Circuit graph: node importance ({len(scores)} nodes scored)"]
    assert not line_traces(fig)  # no edges
    nodes = trace(fig, "nodes")
    assert {row[0]: row[1] for row in nodes["customdata"]} == scores
    ranked = sorted(scores, key=lambda n: -scores[n])
    assert [row[0] for row in nodes["customdata"]] == ranked
    assert [row[3] for row in nodes["customdata"]] == list(range(1, len(scores) + 1))
    assert nodes["marker"]["color"] == [scores[n] for n in ranked]
    sizes = nodes["marker"]["size"]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    std = run.head_std_matrix()
    head = next(row for row in nodes["customdata"] if row[0] == "a1.h2")
    assert head[2] == pytest.approx(float(std[1, 2]), rel=1e-6)
    assert f"importance {scores['a1.h2']:.6g}" in nodes["hovertext"][ranked.index("a1.h2")]
    assert set(trace(fig, "not scored")["text"]) == {"input", "logits"}
    # the edge runs under the same root are no default for the comparison
    assert at.selectbox(key="nodes-compare-with").value is None
    at.selectbox(key="nodes-compare-with").set_value("edges").run()
    assert_clean(at)
    assert any("edge-level run" in i.value for i in at.info)


# -------------------------------------------------------------------- the figures alone


def test_layout_puts_every_row_in_forward_order():
    positions = graph.node_positions(2, 3, mlps=True)
    assert positions["input"] == (1.0, 0.0) and positions["logits"] == (1.0, 5.0)
    assert positions["a1.h2"] == (2.0, 3.0) and positions["m1"] == (1.0, 4.0)
    assert "m0" not in graph.node_positions(2, 3, mlps=False)
    assert graph.row_ticks(1, mlps=False)["ticktext"] == ["input", "L0 heads", "logits"]
    x, y = graph.reader_position("a1.h0<q>", positions)
    assert x < positions["a1.h0"][0] and y < positions["a1.h0"][1]
    with pytest.raises(ValueError, match="'a7.h0<q>' is not a node"):
        graph.reader_position("a7.h0<q>", positions)


def test_edges_to_the_next_row_are_straight_longer_ones_bow():
    positions = graph.node_positions(3, 2, mlps=True)
    xs, ys, mid = graph.edge_path("a0.h0->m0", positions, centre=0.5)
    assert len(xs) == 2 and mid == (0.25, 1.5)
    xs, ys, mid = graph.edge_path("a0.h0->a2.h0<k>", positions, centre=0.5)
    assert len(xs) == graph.CURVE_POINTS and (xs[0], ys[0]) == positions["a0.h0"]
    assert min(xs) < 0 and mid[0] < 0  # bowed away from the centre, not through a1.h0
    with pytest.raises(ValueError, match="writer 'zz'"):
        graph.edge_path("zz->m0", positions, centre=0.5)


def test_hover_markers_stop_at_the_cap_but_every_edge_is_drawn(monkeypatch):
    edges = EdgeGraph(n_layers=2, n_heads=2, mlps=True)
    scores = {name: float(i % 7) for i, name in enumerate(edges.locate())}
    ranked = rank_edges(scores, list(scores))
    monkeypatch.setattr(graph, "MAX_HOVER", 10)
    fig = json.loads(graph.edge_graph_figure(edges, scores, ranked, 30, "t").to_json())
    hover = next(t for t in fig["data"] if t["name"] == "edge (hover)")
    assert [row[0] for row in hover["customdata"]] == ranked[:10]
    lines = [t for t in fig["data"] if t["mode"] == "lines"]
    assert sum(n_paths(floats(t["y"])) for t in lines) == 30
    same = {name: 1.0 for name in scores}  # equal scores: one bin
    fig = json.loads(graph.edge_graph_figure(edges, same, list(same), 5, "t").to_json())
    assert len([t for t in fig["data"] if t["mode"] == "lines"]) == 1
