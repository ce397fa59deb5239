"""The Compare tab: run A (the page's run) against run B, one of its sibling runs.

Every sibling is opened through the page's run cache; one that cannot be read (a damaged or
foreign run directory) is skipped with a note, so it never breaks the page of a healthy run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import streamlit as st
import torch

from tl_noise.dashboard import charts, safe
from tl_noise.dashboard.safe import plain_title
from tl_noise.dashboard.views import DATA_ERRORS, section
from tl_noise.runs import Run


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two score tensors over the entries both define."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    keep = ~(a.isnan() | b.isnan())
    if int(keep.sum()) < 2:
        return float("nan")
    ra, rb = (x[keep].argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def comparable(
    run: Run, others: dict[str, Path], open_run: Callable[[str], Run]
) -> tuple[int | None, dict[str, str]]:
    """``(index, skipped)``: the index of the first other run with the same heads, per-head
    noise (not an edge run) and a history (the default run B, None if there is none), and
    ``{label: why}`` of the runs on the way that could not be read."""
    skipped: dict[str, str] = {}
    for i, (label, path) in enumerate(others.items()):
        try:
            other = open_run(str(path))
            same = (other.n_layers, other.n_heads) == (run.n_layers, run.n_heads)
            if same and not other.is_edge_run() and other.steps():
                return i, skipped
        except DATA_ERRORS as err:
            skipped[label] = str(err)
    return None, skipped


def _note_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        names = ", ".join(skipped)
        first = next(iter(skipped.values()))
        safe.caption(f"Skipped run(s) that cannot be read: {names} (first: {first[:300]})")


def compare(
    run: Run, others: dict[str, Path], open_run: Callable[[str], Run], key_prefix: str
) -> None:
    st.subheader("Compare two runs")
    if not others:
        st.info("Only one run under the root: nothing to compare with.")
        return
    index, skipped = comparable(run, others, open_run)
    _note_skipped(skipped)
    label = st.selectbox(
        "Compare with (run B)",
        list(others),
        index=index,
        placeholder="choose a run",
        key=f"{key_prefix}-compare-with",
    )
    if label is None:
        st.info("No other run has the same layers and heads; choose one to compare anyway.")
        return
    try:
        other = open_run(str(others[label]))
    except DATA_ERRORS as err:
        safe.error(f"Cannot open run B: {err}")
        return
    if (other.n_layers, other.n_heads) != (run.n_layers, run.n_heads):
        safe.error(
            f"Runs have different shapes: A has {run.n_layers}x{run.n_heads} heads, "
            f"B ({label}) has {other.n_layers}x{other.n_heads}."
        )
        return
    if other.is_edge_run():
        safe.info(f"Run B ({label}) is an edge-level run: it has no per-head stds to compare.")
        return
    with section("the comparison"):
        _comparison(run, other, label)


def _comparison(run: Run, other: Run, label: str) -> None:
    a, b = run.head_std_matrix(), other.head_std_matrix()
    diff = a.double().log10() - b.double().log10()
    name_a, name_b = plain_title(run.name), plain_title(label)
    st.plotly_chart(
        charts.heatmap(
            diff,
            f"log10 std(A) - log10 std(B), A = {name_a}, B = {name_b}",
            label="log10 A/B",
            scale="signed",
        ),
        key="compare-diff",
    )
    st.caption("Blue: A tolerates more noise than B on that head; red: less.")
    st.metric("Spearman rank correlation of head stds", f"{_rank_correlation(a, b):.3f}")
    st.plotly_chart(charts.comparison_scatter(a, b, name_a, name_b), key="compare-scatter")
