"""Plotly figures of a run: per-head heatmaps, trajectories, gradients, losses (no Streamlit).

Stds span decades, so heatmaps colour ``log10(std)`` and label the colour bar and the hover text
with the std itself; a signed quantity (cosine, signed gradient, log-ratio of two runs) gets a
diverging scale centred on 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from tl_noise.dashboard.ranges import (
    clipped_axis,
    log_axis,
)

SCALES = ("log", "signed", "linear")
TRUTH_COLOURS = ("#00cc96", "#ffa15a", "#ab63fa", "#19d3f3", "#ff6692", "#b6e880")
HEAD_COLOURS = (
    "#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880",
    "#ff97ff", "#fecb52", "#1f77b4", "#8c564b",
)  # fmt: skip
LAYER_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def _cells(values: Tensor) -> list[list[float | None]]:
    # plotly has no JSON for NaN/inf: leave those cells empty
    return [[float(v) if math.isfinite(float(v)) else None for v in row] for row in values]


def _log_ticks(z: Tensor) -> dict[str, Any]:
    finite = z[torch.isfinite(z)]
    if finite.numel() == 0:
        return {}
    low, high = float(finite.min()), float(finite.max())
    vals: list[int] | list[float]
    if high - low >= 2:  # whole decades read best, at most about six of them
        every = max(1, math.ceil((math.ceil(high) - math.floor(low)) / 6))
        vals = list(range(math.floor(low), math.ceil(high) + 1, every))
    else:
        vals = [low + (high - low) * i / 4 for i in range(5)] if high > low else [low]
    return {"tickvals": vals, "ticktext": [f"{10**v:.3g}" for v in vals]}


def heatmap(
    values: Float[Tensor, "rows cols"],
    title: str,
    label: str = "std",
    scale: str = "log",
    x_title: str = "head",
    y_title: str = "layer",
    y_labels: Sequence[str] | None = None,
    ground_truth: dict[str, list[list[int]]] | None = None,
    zrange: tuple[float, float] | None = None,
) -> go.Figure:
    """Heatmap of ``values`` (rows: layers or hooks, columns: heads or features).

    ``scale``: ``"log"`` colours ``log10|v|`` (hover shows ``v``), ``"signed"`` is diverging
    around 0, ``"linear"`` plain. ``ground_truth`` outlines the listed ``[layer, head]`` cells.
    ``zrange``: a fixed colour range in the coloured units (:func:`value_range`), e.g. the
    range over a whole run, so that colours mean the same at every step.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; accepted: {', '.join(SCALES)}")
    values = values.detach().double().cpu()
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D tensor, got shape {list(values.shape)}")
    rows, cols = values.shape
    y: list[str | int] = list(y_labels) if y_labels is not None else list(range(rows))
    z = values.abs().log10() if scale == "log" else values
    colorbar: dict[str, Any] = {"title": {"text": label}}
    kwargs: dict[str, Any] = {"colorscale": "Viridis"}
    if scale == "log":
        colorbar.update(_log_ticks(z if zrange is None else torch.tensor(zrange)))
    elif scale == "signed":
        finite = values[torch.isfinite(values)]
        bound = float(finite.abs().max()) if finite.numel() else 1.0
        kwargs = {"colorscale": "RdBu", "zmid": 0.0, "zmin": -bound, "zmax": bound}
    if zrange is not None:
        kwargs.update(zmin=zrange[0], zmax=zrange[1])
    fig = go.Figure(
        go.Heatmap(
            z=_cells(z),
            x=list(range(cols)),
            y=y,
            customdata=_cells(values),
            hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{label} "
            "%{customdata:.4g}<extra></extra>",
            colorbar=colorbar,
            hoverongaps=False,
            **kwargs,
        )
    )
    for i, (cls, heads) in enumerate((ground_truth or {}).items()):
        fig.add_trace(
            go.Scatter(
                x=[h for _, h in heads],
                y=[y[layer] for layer, _ in heads],
                mode="markers",
                name=cls,
                marker={
                    "symbol": "square-open",
                    "size": 26,
                    "line": {"width": 3},
                    "color": TRUTH_COLOURS[i % len(TRUTH_COLOURS)],
                },
                hovertemplate=f"{cls}: {y_title} %{{y}}, {x_title} %{{x}}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        xaxis={"title": x_title, "dtick": 1 if cols <= 32 else None},
        yaxis={"title": y_title, "autorange": "reversed", "type": "category"},
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 50, "b": 40},
        height=max(260, min(700, 60 + 34 * rows)),
    )
    return fig


def histogram(log10_values: dict[str, Tensor], title: str) -> go.Figure:
    """Overlaid histograms of ``log10(std)``, one per group."""
    fig = go.Figure()
    for name, values in log10_values.items():
        finite = values[torch.isfinite(values)]
        fig.add_trace(go.Histogram(x=finite.tolist(), name=name, opacity=0.7))
    fig.update_layout(title=title, barmode="overlay", xaxis_title="log10 std", yaxis_title="count")
    return fig


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def tied_heads(frame: Any) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """``(layer, head) -> the other heads with the same trajectory`` (equal to 9 significant
    digits at every step), for the heads that share theirs."""
    groups: dict[tuple[float, ...], list[tuple[int, int]]] = {}
    for (layer, head), rows in frame.groupby(["layer", "head"], sort=True):
        key = tuple(float(f"{v:.9g}") for v in rows.sort_values("step")["std"])
        groups.setdefault(key, []).append((int(layer), int(head)))
    return {h: [o for o in heads if o != h] for heads in groups.values() if len(heads) > 1
            for h in heads}  # fmt: skip


def trajectories(frame: Any, ground_truth: dict[str, list[list[int]]] | None = None) -> go.Figure:
    """Std of every head over the steps (``frame``: step, layer, head, std; log y axis). The
    colour tells the head, the dash the layer; heads with identical trajectories (drawn on top
    of each other) say so in their legend entry and hover text."""
    truth = {(l_, h): cls for cls, heads in (ground_truth or {}).items() for l_, h in heads}
    ties = tied_heads(frame)
    fig = go.Figure()
    for (layer, head), rows in frame.groupby(["layer", "head"], sort=True):
        layer, head = int(layer), int(head)
        cls = truth.get((layer, head))
        name = head_label(layer, head) + (f" ({cls})" if cls else "")
        same = ties.get((layer, head), [])
        tie = " = " + ", ".join(head_label(*h) for h in same) if same else ""
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows["std"],
                mode="lines",
                name=name + tie,
                legendgroup=f"layer {layer}",
                line={
                    "width": 3 if cls else 1.5,
                    "color": HEAD_COLOURS[head % len(HEAD_COLOURS)],
                    "dash": LAYER_DASHES[layer % len(LAYER_DASHES)],
                },
                hovertemplate=f"{name}{tie}<br>step %{{x}}<br>std %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Std per head over training",
        xaxis_title="step",
        yaxis={"title": "std", **log_axis(frame["std"])},
        legend={"title": {"text": "colour: head, dash: layer"}},
        height=420,
    )
    return fig


DRILL_DOWN_SERIES = {  # column -> (legend entry, colour); a norm shares its gradient's entry
    "std": ("std", "#636efa"),
    "noise_norm": ("noise-loss gradient", "#1f77b4"),
    "task_norm": ("task-loss gradient", "#d62728"),
    "projected_norm": ("projected gradient", "#ff7f0e"),
    "noise": ("noise-loss gradient", "#1f77b4"),
    "task": ("task-loss gradient", "#d62728"),
    "projected": ("projected gradient", "#ff7f0e"),
    "cosine": ("cosine(noise, task)", "#2ca02c"),
    "alpha": ("equivalent alpha", "#9467bd"),
    "scale": ("equivalent scale", "#8c564b"),
}
DRILL_DOWN_PANELS = (
    ("std", ("std",), "log"),
    ("gradient norms", ("noise_norm", "task_norm", "projected_norm"), "log"),
    ("signed gradients (sum over the head's parameters)", ("noise", "task", "projected"), "linear"),
    ("cosine / alpha", ("cosine", "alpha"), "linear"),
    ("scale", ("scale",), "linear"),
)
PROJECTED_LINE = {"dash": "dash", "width": 2}  # drawn over the noise-loss line, which shows through
CLIPPED = ("scale",)  # spiky series: the axis ends at the SCALE_CLIP quantiles


def drill_down(frame: Any, layer: int, head: int) -> go.Figure:
    """One head over the steps: std, the norms and sums of the noise-loss, task-loss and
    projected gradients, their cosine, and the equivalent alpha and scale."""
    rows = frame[(frame["layer"] == layer) & (frame["head"] == head)].sort_values("step")
    panels = [(t, [c for c in cols if c in rows], a) for t, cols, a in DRILL_DOWN_PANELS]
    panels = [p for p in panels if p[1]]
    fig = make_subplots(
        rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=[p[0] for p in panels]
    )
    shown: set[str] = set()
    for i, (_, columns, axis) in enumerate(panels, start=1):
        for column in columns:
            name, colour = DRILL_DOWN_SERIES[column]
            fig.add_trace(
                go.Scatter(
                    x=rows["step"],
                    y=rows[column],
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=name not in shown,
                    line={"color": colour, **(PROJECTED_LINE if "projected" in column else {})},
                    opacity=0.85 if "projected" in column else 1.0,
                    hovertemplate=f"{column}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
                ),
                row=i,
                col=1,
            )
            shown.add(name)
        values = rows[columns].to_numpy()
        if axis == "log":
            fig.update_yaxes(row=i, col=1, **log_axis(values))
        else:
            clip = clipped_axis(values) if set(columns) <= set(CLIPPED) else {}
            fig.update_yaxes(type=axis, row=i, col=1, **clip)
    fig.update_xaxes(title_text="step", row=len(panels), col=1)
    fig.update_layout(
        title=f"Head {head_label(layer, head)}: gradients and their projection",
        height=170 * len(panels) + 80,
    )
    return fig


def loss_curves(frame: Any) -> go.Figure:
    """Task, noise and total loss over the steps (task loss on a log axis)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("task loss", "noise loss", "total loss"))
    for i, column in enumerate(("task", "noise", "total"), start=1):
        fig.add_trace(
            go.Scatter(x=frame["step"], y=frame[column], mode="lines", name=column),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text="step", row=1, col=i)
    if (frame["task"] > 0).all():
        fig.update_yaxes(row=1, col=1, **log_axis(frame["task"]))
    fig.update_layout(title="Losses", showlegend=False, height=340)
    return fig


def global_curves(frame: Any) -> go.Figure:
    """Mean std, the global equivalent alpha and scale, and lambda (budget mode) per step."""
    columns = [c for c in ("mean_std", "alpha", "scale", "lambda") if frame[c].notna().any()]
    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=columns)
    for i, column in enumerate(columns, start=1):
        fig.add_trace(
            go.Scatter(x=frame["step"], y=frame[column], mode="lines", name=column),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text="step", row=1, col=i)
        if column in CLIPPED:
            fig.update_yaxes(row=1, col=i, **clipped_axis(frame[column]))
    fig.update_layout(title="Mean std and alphaless equivalents", showlegend=False, height=320)
    return fig


def faithfulness(curve: dict[str, list[float]]) -> go.Figure:
    """Faithfulness of the top-k heads against k."""
    fig = go.Figure(
        go.Scatter(
            x=curve["k"],
            y=curve["faithfulness"],
            mode="lines+markers",
            hovertemplate="k=%{x}<br>faithfulness %{y:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Faithfulness of the top-k heads",
        xaxis_title="k (heads kept)",
        yaxis_title="faithfulness",
        height=360,
    )
    return fig


def comparison_scatter(a: Tensor, b: Tensor, name_a: str, name_b: str) -> go.Figure:
    """Std of each head in run A against run B (log axes, diagonal = equal)."""
    n_layers, n_heads = a.shape
    xs, ys, text = [], [], []
    for layer in range(n_layers):
        for head in range(n_heads):
            x, y = float(b[layer, head]), float(a[layer, head])
            if math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0:
                xs.append(x)
                ys.append(y)
                text.append(head_label(layer, head))
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=ys,
            text=text,
            mode="markers",
            hovertemplate="%{text}<br>B %{x:.4g}<br>A %{y:.4g}<extra></extra>",
        )
    )
    if xs:
        low, high = min(xs + ys), max(xs + ys)
        fig.add_trace(
            go.Scatter(
                x=[low, high],
                y=[low, high],
                mode="lines",
                showlegend=False,
                line={"dash": "dot", "color": "grey"},
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title="Std per head, run A against run B",
        xaxis={"title": f"B: {name_b}", **log_axis(xs + ys)},
        yaxis={"title": f"A: {name_a}", **log_axis(xs + ys)},
        showlegend=False,
        height=380,
    )
    return fig
