"""The Circuit graph tab: a run's circuit as a layered graph (figures in :mod:`.graph`).

An edge run (``tn.attach_edge_noise``) scores every writer -> reader edge by ``-log std``; the
tab draws the top ``k`` of them. The dashboard loads no model, so the only faithfulness it can
show is what the fit measured at its end, for the fitted noise (``Run.edge_curve``: the top ``k``
edges kept, every other edge mean-ablated, at MIB's edge fractions). The size slider therefore
offers those measured sizes, and shows the measured faithfulness of exactly the edges drawn.
Scrubbed back to an earlier training step, the graph shows that step's scores and no
faithfulness (none was measured there).

A node-level run scores heads and MLPs, not the edges between them: its graph has nodes only,
coloured and sized by importance. The per-head views of the other tabs read per-head noise, so
an edge run gets the graph, its edge ranking and the losses instead (:func:`edge_run_tabs`).
"""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from tl_noise.dashboard import graph, safe, views
from tl_noise.dashboard.views import DATA_ERRORS, section
from tl_noise.edges.circuit import rank_edges
from tl_noise.names import MLP_HOOKS, head_node, hook_layer, mlp_node
from tl_noise.runs import Run
from tl_noise.runs.schema import importance_of

ABLATED = {
    "mean": "mean-ablated (its writer's mean contribution)",
    "resample": "resample-ablated (its writer's contribution on the example's counterfactual)",
}
TARGET = 0.8  # the size slider starts at the smallest measured size reaching this faithfulness
DEFAULT_K = 50  # ... or at this many edges when the run measured none
PER_HEAD_NOTE = (
    "This is an edge-level run: it learned one std per writer -> reader edge, not one per head "
    "or feature. The per-head std heatmap and trajectories, the per-feature stds, the per-head "
    "gradients, the head ranking and the run comparison all read per-head noise, so they are "
    "not shown for it. The Circuit graph tab shows the edges (and ranks them); Losses are as "
    "for any run."
)


def edge_run_tabs(run: Run, step: int, latest: bool, truth: dict | None) -> None:
    """The tabs of an edge run: the graph first, then the losses, then why the per-head views
    are missing."""
    tabs = st.tabs(["Circuit graph", "Losses", "Per-head views"])
    with tabs[0]:
        circuit_graph(run, step, latest, truth)
    with tabs[1]:
        views.losses(run)
    with tabs[2]:
        st.subheader("Per-head views")
        st.info(PER_HEAD_NOTE)


def circuit_graph(run: Run, step: int, latest: bool, truth: dict | None = None) -> None:
    """The run's circuit graph at ``step`` (``latest``: the newest step, drawn from the fitted
    noise): edges for an edge run, nodes only for a node run."""
    st.subheader("Circuit graph")
    if run.is_edge_run():
        with section("the edge graph"):
            edge_graph(run, step, latest, truth)
    else:
        with section("the node graph"):
            node_graph(run, step, latest, truth)


def measured_curve(run: Run, n_edges: int) -> dict[str, list[Any]] | None:
    """The fit's measured ``{"k", "faithfulness"}`` by increasing ``k`` (sizes outside
    ``1..n_edges`` left out), None when not recorded; a malformed one is named, not shown."""
    try:
        curve = run.edge_curve()
    except DATA_ERRORS as err:
        safe.warning(f"The measured faithfulness is not shown: {err}")
        return None
    if not curve:
        return None
    pairs = sorted(dict(zip(curve["k"], curve["faithfulness"], strict=True)).items())
    pairs = [(k, f) for k, f in pairs if 1 <= k <= n_edges]
    return {"k": [k for k, _ in pairs], "faithfulness": [f for _, f in pairs]} if pairs else None


def size_slider(curve: dict[str, list[Any]] | None, n_edges: int, key: str) -> int:
    """The circuit size: one of the measured sizes (starting at the last size chosen when it is
    one, else the smallest that reaches :data:`TARGET`), or any size when none was measured."""
    last = st.session_state.get(key)
    if curve is not None:
        sizes = curve["k"]
        reached = [k for k, f in zip(sizes, curve["faithfulness"], strict=True) if f >= TARGET]
        if st.session_state.get(f"{key}-measured") not in sizes:
            start = last if last in sizes else reached[0] if reached else sizes[-1]
            st.session_state[f"{key}-measured"] = start
        label = "Circuit size: top-k edges (the sizes at which the fit measured faithfulness)"
        k = sizes[0] if len(sizes) == 1 else st.select_slider(label, sizes, key=f"{key}-measured")
    elif n_edges == 1:
        k = 1
    else:
        value = st.session_state.get(f"{key}-any")
        if not isinstance(value, int) or not 1 <= value <= n_edges:
            ok = isinstance(last, int) and 1 <= last <= n_edges
            st.session_state[f"{key}-any"] = last if ok else min(n_edges, DEFAULT_K)
        k = st.slider("Circuit size: top-k edges", 1, n_edges, key=f"{key}-any")
    st.session_state[key] = int(k)  # kept across the two sliders (a plain value, no widget)
    return int(k)


def edge_graph(run: Run, step: int, latest: bool, truth: dict | None) -> None:
    """Size slider, measured faithfulness, the graph, the curve and the edge ranking."""
    edges = run.edge_graph()
    scores = run.edge_scores(None if latest else step)
    ranked = rank_edges(scores, list(scores))  # the fit's order: ties in the graph's order
    curve = measured_curve(run, len(ranked)) if latest else None
    k = size_slider(curve, len(ranked), key=f"{run.path}-circuit-k")
    faithfulness = curve["faithfulness"][curve["k"].index(k)] if curve else None
    left, right = st.columns(2)
    left.metric("Edges drawn", f"{k} of {len(ranked)}")
    if faithfulness is not None:
        ablated = ABLATED[run.edge_ablation()]
        right.metric(
            "Measured faithfulness of the drawn circuit",
            f"{faithfulness:.4g}",
            help=f"Measured at the end of the fit: these k edges kept, every other edge "
            f"{ablated}; 1 = the full model's behaviour, 0 = all edges ablated.",
        )
        st.caption(f"Every edge outside the drawn circuit is {ablated}.")
    else:
        right.metric("Measured faithfulness of the drawn circuit", "-")
        st.caption(
            "No faithfulness was measured for this run (it is measured at the end of a fit)."
            if latest
            else f"Step {step}: faithfulness was measured only for the fitted noise (the "
            "newest step)."
        )
    source = "the fitted noise" if latest else f"step {step}"
    title = f"Circuit graph: top {k} of {len(ranked)} edges ({source})"
    st.plotly_chart(
        graph.edge_graph_figure(edges, scores, ranked, k, safe.plain_title(title), truth),
        key="circuit-graph",
    )
    st.caption(
        "Bottom to top: input, each layer's heads (their q/k/v inputs are the small triangles "
        "below them) and MLP, logits. Width and colour: the edge's score, -log std (higher = "
        "more important); hover an edge's midpoint for its name, score, std and rank."
        + (f" Hover markers on the top {graph.MAX_HOVER} only." if k > graph.MAX_HOVER else "")
    )
    if curve is not None:
        st.plotly_chart(graph.edge_curve_figure(curve, k), key="edge-curve")
    edge_table(run, scores, ranked, k)


def edge_table(run: Run, scores: dict[str, float], ranked: list[str], k: int) -> None:
    """The drawn edges, ranked, and the whole ranking as CSV."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "rank": range(1, len(ranked) + 1),
            "edge": ranked,
            "score": [scores[e] for e in ranked],
            "std": [math.exp(-scores[e]) for e in ranked],
        }
    )
    st.markdown(f"**The {k} edges drawn** (score = -log std)")
    st.dataframe(frame.iloc[:k], hide_index=True, key="edge-table")
    st.download_button(
        "Download edge ranking (CSV)",
        frame.to_csv(index=False),
        file_name=f"{run.name}-edges.csv",
        mime="text/csv",
        key="edge-ranking-csv",
    )


def node_stds(run: Run, step: int | None) -> dict[str, float]:
    """``{node: std}``: each head's (the per-head view), each MLP's (geometric mean over the
    std of its MLP hooks: ``hook_mlp_out``, ``mlp.hook_post``)."""
    matrix = run.head_std_matrix(step)
    out = {
        head_node(layer, head): float(matrix[layer, head])
        for layer in range(run.n_layers)
        for head in range(run.n_heads)
        if math.isfinite(float(matrix[layer, head]))
    }
    stds = run.final_stds() if step is None else run.stds_at(step)
    for name, std in stds.items():
        layer = hook_layer(name)
        if layer is not None and name.endswith(MLP_HOOKS) and std.numel():
            out[mlp_node(layer)] = float(std.double().clamp_min(1e-30).log().mean().exp())
    return out


def node_graph(run: Run, step: int, latest: bool, truth: dict | None) -> None:
    """The nodes coloured and sized by importance: the fit's recorded node importance for the
    fitted noise, else ``-log std`` at ``step``."""
    stds = node_stds(run, None if latest else step)
    fitted = importance_of(
        (run.summary() or {}).get("node_importance"), str(run.path / "summary.json")
    )
    if latest and fitted:
        scores, source = fitted, "the fit's node importance (summary.json)"
    else:
        scores = {n: -math.log(s) for n, s in stds.items() if s > 0}
        source = "-log std " + ("of the fitted noise" if latest else f"at step {step}")
    mlps = not run.config["model"]["fingerprint"].get("attn_only", False)
    positions = graph.node_positions(run.n_layers, run.n_heads, mlps)
    drawn = {n: float(v) for n, v in scores.items() if n in positions and math.isfinite(v)}
    left_out = len(scores) - len(drawn)
    scores = drawn
    if not scores:
        st.info("This run scored no head or MLP (its noise is on other hook points).")
        return
    title = f"Circuit graph: node importance ({len(scores)} nodes scored)"
    st.plotly_chart(
        graph.node_graph_figure(run.n_layers, run.n_heads, mlps, scores, stds, title, truth),
        key="circuit-graph",
    )
    safe.caption(
        f"A node-level run scores heads and MLPs, not the edges between them, so only nodes "
        f"are drawn: colour and size by importance, from {source}; grey open circles have no "
        "score. For edges, fit edge noise (tn.attach_edge_noise)."
        + (f" {left_out} score(s) of other hook points are not drawn." if left_out else "")
    )
