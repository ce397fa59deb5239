"""Plotly figures of a circuit as a layered graph (no Streamlit).

The layout runs bottom to top, in forward order: ``input``; per layer a row of heads
(``a{l}.h{h}``, left to right) and above it the layer's MLP ``m{l}`` (centred); ``logits`` on
top. Every edge runs upward, from a writer to a reader. A head reads three inputs, its ``q``, ``k``
and ``v``: they are ports just below the head (left, middle, right), so edges into the three stay
apart. An edge to the next row is a straight line; a longer one bows sideways (a quadratic
curve), so it neither runs through the nodes of the rows it crosses nor hides behind the chain of
shorter edges along the same line.

Plotly cannot vary a line's width or colour within one trace, so the edges drawn are grouped into
:data:`N_BINS` bins of score (equal steps between the lowest and the highest drawn score), one
line trace per bin, wider and brighter for higher scores, the highest drawn last (on top). The
exact numbers are in the hover text of a marker at each edge's midpoint (name, score, std, rank),
coloured by the exact score against the colour bar; past :data:`MAX_HOVER` edges only the
highest-scoring ones get a marker (the browser stays responsive; every edge is still drawn).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from tl_noise.edges import EdgeGraph
from tl_noise.names import head_node, mlp_node

N_BINS = 5  # line traces: edges grouped by score
WIDTHS = (0.7, 5.0)  # line width of the lowest and the highest bin
OPACITIES = (0.35, 0.95)
CURVE_POINTS = 9  # points along a bowed edge
BOW = 0.16  # a long edge's sideways bow per row it spans (x units: one head apart) ...
MAX_BOW = 2.0  # ... at most this (the curve's widest point is half of it off the chord)
PORT_DROP = 0.16  # q/k/v ports below their head (rows are one unit apart)
PORT_SHIFT = {"q": -0.18, "k": 0.0, "v": 0.18}
PORT_NAMES = {"q": "query", "k": "key", "v": "value"}
MAX_HOVER = 5000  # edges with a hover marker (the highest-scoring ones)
MAX_LABELS = 80  # nodes labelled on the figure (more: hover only)
COLOURSCALE = "Viridis"
NODE_COLOUR, PORT_COLOUR = "#8c8c8c", "#555555"
TRUTH_COLOURS = ("#00cc96", "#ffa15a", "#ab63fa", "#19d3f3", "#ff6692", "#b6e880")
SCORE = "score (−log std)"
_READER = re.compile(r"^(?P<node>.+?)(?:<(?P<port>[qkv])>)?$")


def node_positions(n_layers: int, n_heads: int, mlps: bool) -> dict[str, tuple[float, float]]:
    """``{node: (x, y)}``: ``input`` at y = 0, layer ``l``'s heads at ``x = head`` in one row,
    its MLP centred in the row above, ``logits`` on top."""
    centre, per_layer = (n_heads - 1) / 2, 2 if mlps else 1
    out = {"input": (centre, 0.0)}
    for layer in range(n_layers):
        row = float(1 + per_layer * layer)
        for head in range(n_heads):
            out[head_node(layer, head)] = (float(head), row)
        if mlps:
            out[mlp_node(layer)] = (centre, row + 1)
    out["logits"] = (centre, float(1 + per_layer * n_layers))
    return out


def row_ticks(n_layers: int, mlps: bool) -> dict[str, Any]:
    """The y axis labelled by row: input, L0 heads, L0 MLP, ..., logits."""
    text = ["input"]
    for layer in range(n_layers):
        text += [f"L{layer} heads"] + ([f"L{layer} MLP"] if mlps else [])
    text.append("logits")
    return {"tickvals": list(range(len(text))), "ticktext": text}


def reader_position(
    reader: str, positions: Mapping[str, tuple[float, float]]
) -> tuple[float, float]:
    """Where an edge into ``reader`` ends: a head's q/k/v port, or the node itself."""
    match = _READER.match(reader)
    if match is None or match["node"] not in positions:
        raise ValueError(f"reader {reader!r} is not a node of the graph")
    x, y = positions[match["node"]]
    port = match["port"]
    return (x + PORT_SHIFT[port], y - PORT_DROP) if port else (x, y)


def edge_path(
    edge: str, positions: Mapping[str, tuple[float, float]], centre: float
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """``(xs, ys, midpoint)`` of the line drawn for ``edge`` (``"writer->reader"``): straight
    to the next row, else a quadratic curve bowed away from the centre line."""
    writer, _, reader = edge.partition("->")
    if writer not in positions:
        raise ValueError(f"edge {edge!r}: writer {writer!r} is not a node of the graph")
    x0, y0 = positions[writer]
    x1, y1 = reader_position(reader, positions)
    if y1 - y0 <= 1:
        return np.array([x0, x1]), np.array([y0, y1]), ((x0 + x1) / 2, (y0 + y1) / 2)
    side = 1.0 if (x0 + x1) / 2 >= centre else -1.0
    cx, cy = (x0 + x1) / 2 + side * min(BOW * (y1 - y0), MAX_BOW), (y0 + y1) / 2
    t = np.linspace(0.0, 1.0, CURVE_POINTS)
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t**2 * x1
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t**2 * y1
    return xs, ys, (0.25 * x0 + 0.5 * cx + 0.25 * x1, 0.25 * y0 + 0.5 * cy + 0.25 * y1)


def score_bins(scores: Sequence[float], n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """``(bin of each score, bin edges)``: ``n_bins`` equal steps from the lowest to the highest
    score (a single bin when they are all equal)."""
    values = np.asarray(scores, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros(len(values), dtype=np.int64), np.array([low, high])
    edges = np.linspace(low, high, n_bins + 1)
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_bins - 1), edges


def _joined(paths: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The paths as one polyline with a gap (NaN) between consecutive paths (float32: the
    figure of ~32k edges stays a few MB)."""
    gap = np.array([np.nan])
    xs = np.concatenate([p for x, _ in paths for p in (x, gap)]).astype(np.float32)
    ys = np.concatenate([p for _, y in paths for p in (y, gap)]).astype(np.float32)
    return xs, ys


def _style(i: int, n: int) -> tuple[str, float, float]:
    """Colour, width and opacity of bin ``i`` of ``n`` (0: the lowest scores)."""
    frac = i / (n - 1) if n > 1 else 1.0
    colour = sample_colorscale(COLOURSCALE, [(i + 0.5) / n if n > 1 else 1.0])[0]
    width = WIDTHS[0] + (WIDTHS[1] - WIDTHS[0]) * frac
    return colour, width, OPACITIES[0] + (OPACITIES[1] - OPACITIES[0]) * frac


def edge_graph_figure(
    graph: EdgeGraph,
    scores: Mapping[str, float],
    ranked: Sequence[str],
    k: int,
    title: str,
    truth: dict[str, list[list[int]]] | None = None,
) -> go.Figure:
    """The top ``k`` edges of ``ranked`` (every edge, highest score first) over the layered
    nodes of ``graph``: width and colour by score bin, hover with the exact numbers."""
    positions = node_positions(graph.n_layers, graph.n_heads, graph.mlps)
    centre = (graph.n_heads - 1) / 2
    drawn = list(ranked[:k])
    fig = go.Figure()
    if drawn:
        paths = [edge_path(e, positions, centre) for e in drawn]
        bins, edges = score_bins([scores[e] for e in drawn])
        n_bins = len(edges) - 1
        for i in range(n_bins):
            members = [p[:2] for p, b in zip(paths, bins, strict=True) if b == i]
            if not members:
                continue
            xs, ys = _joined(members)
            colour, width, opacity = _style(i, n_bins)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line={"color": colour, "width": width},
                    opacity=opacity,
                    name=f"score {edges[i]:.3g} to {edges[i + 1]:.3g} ({len(members)})",
                    legendgroup="edges",
                    hoverinfo="skip",
                )
            )
        fig.add_trace(_edge_markers(drawn, paths, scores, len(ranked), (edges[0], edges[-1])))
    _add_nodes(fig, positions, drawn)
    _add_truth(fig, positions, truth)
    _finish(fig, title, graph.n_layers, graph.mlps, graph.n_heads)
    return fig


def _edge_markers(
    drawn: list[str],
    paths: list[tuple[np.ndarray, np.ndarray, tuple[float, float]]],
    scores: Mapping[str, float],
    n_edges: int,
    colour_range: tuple[float, float],
) -> go.Scatter:
    """Hover markers at the midpoints of the first :data:`MAX_HOVER` drawn edges; ``customdata``
    holds ``[edge, score, std, rank]``, the hover text the same numbers, formatted."""
    shown = drawn[:MAX_HOVER]
    rows = [(e, scores[e], math.exp(-scores[e]), r) for r, e in enumerate(shown, start=1)]
    data = [list(row) for row in rows]
    text = [
        f"<b>{html.escape(e)}</b><br>{SCORE} {s:.6g}<br>std {std:.6g}<br>rank {r} of {n_edges}"
        for e, s, std, r in rows
    ]
    return go.Scatter(
        x=[paths[i][2][0] for i in range(len(shown))],
        y=[paths[i][2][1] for i in range(len(shown))],
        mode="markers",
        name="edge (hover)",
        showlegend=False,
        customdata=data,
        text=text,
        hovertemplate="%{text}<extra></extra>",
        marker={
            "size": 5,
            "color": [d[1] for d in data],
            "colorscale": COLOURSCALE,
            "cmin": colour_range[0],
            "cmax": colour_range[1],
            "line": {"width": 0.5, "color": "white"},
            "colorbar": {"title": {"text": "score<br>(−log std)"}, "len": 0.6},
        },
    )


def _add_nodes(
    fig: go.Figure, positions: Mapping[str, tuple[float, float]], drawn: list[str]
) -> None:
    """Grey node markers (hover: the drawn edges in and out) and the q/k/v ports edges reach."""
    into: dict[str, int] = {}  # by reader (a head's q/k/v apart)
    node_in: dict[str, int] = {}  # by node
    out_of: dict[str, int] = {}
    for edge in drawn:
        writer, _, reader = edge.partition("->")
        out_of[writer] = out_of.get(writer, 0) + 1
        into[reader] = into.get(reader, 0) + 1
        node = reader.split("<")[0]
        node_in[node] = node_in.get(node, 0) + 1
    names = list(positions)
    fig.add_trace(
        go.Scatter(
            x=[positions[n][0] for n in names],
            y=[positions[n][1] for n in names],
            mode="markers+text" if len(names) <= MAX_LABELS else "markers",
            text=names,
            textposition="middle right",
            textfont={"size": 11},
            customdata=[[n, node_in.get(n, 0), out_of.get(n, 0)] for n in names],
            hovertemplate="<b>%{customdata[0]}</b><br>edges drawn: %{customdata[1]} in, "
            "%{customdata[2]} out<extra></extra>",
            marker={"size": 14, "color": NODE_COLOUR, "line": {"width": 1, "color": "white"}},
            name="nodes",
            showlegend=False,
        )
    )
    ports = [r for r in into if "<" in r]
    if ports:
        points = [reader_position(r, positions) for r in ports]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[p[1] for p in points],
                mode="markers",
                text=[
                    f"<b>{html.escape(r)}</b> ({PORT_NAMES[r[-2]]} input)<br>edges drawn: {into[r]}"
                    for r in ports
                ],
                hovertemplate="%{text}<extra></extra>",
                marker={"size": 5, "color": PORT_COLOUR, "symbol": "triangle-up"},
                name="q/k/v inputs",
                showlegend=False,
            )
        )


def _add_truth(
    fig: go.Figure,
    positions: Mapping[str, tuple[float, float]],
    truth: dict[str, list[list[int]]] | None,
) -> None:
    """Open squares around the model's known circuit heads, one trace per class."""
    for i, (cls, heads) in enumerate((truth or {}).items()):
        nodes = [head_node(int(layer), int(head)) for layer, head in heads]
        nodes = [n for n in nodes if n in positions]
        fig.add_trace(
            go.Scatter(
                x=[positions[n][0] for n in nodes],
                y=[positions[n][1] for n in nodes],
                mode="markers",
                name=f"known circuit: {html.escape(str(cls))}",
                marker={
                    "symbol": "square-open",
                    "size": 26,
                    "line": {"width": 3},
                    "color": TRUTH_COLOURS[i % len(TRUTH_COLOURS)],
                },
                hoverinfo="skip",
            )
        )


def _finish(fig: go.Figure, title: str, n_layers: int, mlps: bool, n_heads: int) -> None:
    rows = len(row_ticks(n_layers, mlps)["tickvals"])
    fig.update_layout(
        title=title,
        xaxis={"visible": False, "range": [-0.5 - MAX_BOW / 2, n_heads - 0.5 + MAX_BOW / 2]},
        yaxis={
            **row_ticks(n_layers, mlps),
            "range": [-0.6, rows - 0.4],
            "showgrid": False,
            "zeroline": False,
        },  # fmt: skip
        legend={"orientation": "h", "y": -0.04, "title": {"text": "edges by score:"}},
        plot_bgcolor="white",
        hovermode="closest",
        margin={"t": 50, "b": 30, "l": 80},
        height=max(560, min(1500, 90 * rows)),
    )


def node_graph_figure(
    n_layers: int,
    n_heads: int,
    mlps: bool,
    scores: Mapping[str, float],
    stds: Mapping[str, float],
    title: str,
    truth: dict[str, list[list[int]]] | None = None,
) -> go.Figure:
    """The layered nodes alone (a node-level run has no edge scores): colour and size by
    ``scores`` (higher = more important), grey open circles for nodes without a score; hover
    with the node's name, score, rank and std."""
    positions = node_positions(n_layers, n_heads, mlps)
    scored = sorted(
        (n for n in positions if n in scores), key=lambda n: (-scores[n], list(positions).index(n))
    )
    rank = {n: i for i, n in enumerate(scored, start=1)}
    fig = go.Figure()
    others = [n for n in positions if n not in rank]
    fig.add_trace(
        go.Scatter(
            x=[positions[n][0] for n in others],
            y=[positions[n][1] for n in others],
            mode="markers+text",
            text=others,
            textposition="middle right",
            hovertemplate="<b>%{text}</b><br>not scored<extra></extra>",
            marker={"size": 12, "symbol": "circle-open", "color": NODE_COLOUR},
            name="not scored",
            showlegend=False,
        )
    )
    if scored:
        values = np.array([scores[n] for n in scored], dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        size = 12 + 22 * ((values - low) / (high - low) if high > low else np.ones_like(values))
        rows = [(n, scores[n], stds.get(n), rank[n]) for n in scored]  # std: None if unknown
        data = [list(row) for row in rows]
        text = [
            f"<b>{n}</b><br>importance {s:.6g}<br>std "
            + ("-" if std is None else f"{std:.6g}")
            + f"<br>rank {r} of {len(scored)}"
            for n, s, std, r in rows
        ]
        fig.add_trace(
            go.Scatter(
                x=[positions[n][0] for n in scored],
                y=[positions[n][1] for n in scored],
                mode="markers",
                customdata=data,
                hovertext=text,
                hovertemplate="%{hovertext}<extra></extra>",
                marker={
                    "size": size.tolist(),
                    "color": values.tolist(),
                    "colorscale": COLOURSCALE,
                    "line": {"width": 1, "color": "white"},
                    "colorbar": {"title": {"text": "node<br>importance"}, "len": 0.6},
                },
                name="nodes",
                showlegend=False,
            )
        )
    _add_truth(fig, positions, truth)
    _finish(fig, title, n_layers, mlps, n_heads)
    return fig


def edge_curve_figure(curve: Mapping[str, Sequence[float]], k: int) -> go.Figure:
    """The measured faithfulness of the top-k edges against k (log axis), the chosen k marked."""
    ks, fs = list(curve["k"]), list(curve["faithfulness"])
    fig = go.Figure(
        go.Scatter(
            x=ks,
            y=fs,
            mode="lines+markers",
            name="measured",
            hovertemplate="k=%{x}<br>faithfulness %{y:.4g}<extra></extra>",
        )
    )
    if k in ks:
        fig.add_trace(
            go.Scatter(
                x=[k],
                y=[fs[ks.index(k)]],
                mode="markers",
                name="drawn",
                marker={"size": 14, "symbol": "circle-open", "line": {"width": 3}},
                hovertemplate="drawn: k=%{x}<br>faithfulness %{y:.4g}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Faithfulness of the top-k edges (measured at the end of the fit)",
        xaxis={"title": "k (edges kept, the rest mean-ablated)", "type": "log"},
        yaxis_title="faithfulness",
        showlegend=False,
        height=320,
    )
    return fig
