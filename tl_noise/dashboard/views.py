"""The dashboard's sections, one function each; every one reads the run through
:class:`tl_noise.runs.Run` and shows a message, never a traceback, when the run's data is not
what it should be."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch
from torch import Tensor

from tl_noise.dashboard import charts
from tl_noise.runs import Run, hook_kind

STATE_BANNERS = {"completed": st.success, "running": st.info, "failed": st.error}
DATA_ERRORS = (ValueError, KeyError, TypeError, IndexError, OSError)
GRAD_PANELS = (
    ("noise_norm", "Noise-loss gradient norm", "log"),
    ("task_norm", "Task-loss gradient norm", "log"),
    ("cosine", "Cosine(noise, task)", "signed"),
    ("projected", "Projected (alphaless) gradient", "signed"),
    ("alpha", "Equivalent alpha", "linear"),
    ("scale", "Equivalent scaling factor", "signed"),
)


@contextmanager
def section(what: str) -> Iterator[None]:
    """Show a malformed or incomplete run as an error message inside the section."""
    try:
        yield
    except DATA_ERRORS as err:
        st.error(f"Cannot show {what}: {err}")


def status_banner(run: Run) -> dict[str, Any]:
    status = run.status()
    total = run.config.get("fit", {}).get("steps")
    text = f"**{status['state']}**, step {status['step']}" + (f" of {total}" if total else "")
    if status["message"]:
        text += f": {status['message']}"
    STATE_BANNERS.get(status["state"], st.warning)(text)
    return status


def config_panel(run: Run) -> None:
    cfg = run.config
    fit, task, model = cfg.get("fit", {}), cfg.get("task", {}), cfg.get("model", {})
    kinds = ", ".join(sorted({hook_kind(h) for h in run.hook_names()}))
    st.markdown(
        f"**model** `{model.get('name')}` ({run.n_layers} layers x {run.n_heads} heads)  \n"
        f"**task** `{task.get('name', '-')}`  \n"
        f"**mode** `{fit.get('mode')}`, objective `{fit.get('objective')}`, "
        f"{fit.get('steps')} steps at lr {fit.get('lr')}  \n"
        f"**hooks** {len(run.hook_names())} ({kinds})"
    )
    with st.expander("config.json"):
        st.json(cfg, expanded=1)


def head_stds(run: Run, step: int, truth: dict[str, list[list[int]]] | None) -> None:
    st.subheader("Learned std per head")
    if not run.head_hooks():
        st.info("This run put no per-head noise (no hook_z/hook_q/... hooks).")
        return
    with section("the per-head stds"):
        matrix = run.head_std_matrix(step)
        st.plotly_chart(
            charts.heatmap(
                matrix, f"Std per head at step {step} (log colour scale)", ground_truth=truth
            ),
            key="head_heatmap",
        )
        st.caption(
            "Large std: the head tolerates noise (unimportant); near-zero std: the behaviour "
            "needs it. Outlined cells are the model's known circuit heads."
            if truth
            else "Large std: the head tolerates noise (unimportant); near-zero std: the "
            "behaviour needs it."
        )
    with section("the std trajectories"):
        frame = run.history_frame()
        per_head = (
            frame.assign(log_std=np.log10(frame["std"]))
            .groupby(["step", "layer", "head"], as_index=False)["log_std"]
            .mean()
        )
        per_head["std"] = per_head["log_std"].map(lambda v: 10.0**v)
        st.plotly_chart(charts.trajectories(per_head, truth), key="trajectories")


def feature_stds(run: Run, step: int) -> None:
    st.subheader("Other hook points")
    names = run.feature_hooks()
    if not names:
        st.info("This run noised only per-head hooks.")
        return
    with section("the per-feature stds"):
        stds = run.stds_at(step)
        scalars, groups = _scalars_and_kinds(names, stds)
        logs = {}
        for kind, members in groups.items():
            widths = {stds[n].numel() for n in members}
            if len(widths) != 1:
                raise ValueError(f"hooks {members} of kind {kind!r} have different sizes {widths}")
            matrix = torch.stack([stds[n].reshape(-1) for n in members])
            st.plotly_chart(
                charts.heatmap(
                    matrix,
                    f"{kind}: std per feature at step {step}",
                    x_title="feature",
                    y_title="hook",
                    y_labels=members,
                ),
                key=f"features-{kind}",
            )
            logs[kind] = matrix.double().log10().reshape(-1)
        if logs:
            st.plotly_chart(
                charts.histogram(logs, f"Distribution of per-feature stds at step {step}"),
                key="feature-histogram",
            )
        if scalars:
            st.dataframe(scalars, hide_index=True)


def _scalars_and_kinds(
    names: list[str], stds: dict[str, Tensor]
) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Rows ``{"hook", "std"}`` of the hooks with one std, and the other hooks by kind."""
    scalars: list[dict[str, Any]] = []
    groups: dict[str, list[str]] = {}
    for name in names:
        if name not in stds:
            continue
        if stds[name].ndim == 0:
            scalars.append({"hook": name, "std": float(stds[name])})
        else:
            groups.setdefault(hook_kind(name), []).append(name)
    return scalars, groups


def gradients(run: Run, step: int, key_prefix: str) -> None:
    st.subheader("Projected gradients per head")
    kinds = run.grad_hook_kinds(step)
    if not kinds:
        st.info(f"No per-head gradient record at step {step} (per-head hooks only).")
        return
    kind = kinds[0]
    if len(kinds) > 1:
        kind = st.selectbox("Hook", kinds, key=f"{key_prefix}-grad-kind")
    st.caption(
        "Per head: norms of the noise-loss and task-loss gradients of the head's noise "
        "parameters, their cosine, the projected (alphaless) gradient the optimiser used, and "
        "the composite alpha and step scale equivalent to it on that head alone."
    )
    with section("the gradient heatmaps"):
        columns = st.columns(2)
        for i, (key, title, scale) in enumerate(GRAD_PANELS):
            matrix = run.grad_matrix(step, key, kind)
            zrange = (-1.0, 1.0) if key == "cosine" else None
            with columns[i % 2]:
                st.plotly_chart(
                    charts.heatmap(
                        matrix, f"{title} (step {step})", label=key, scale=scale, zrange=zrange
                    ),
                    key=f"grad-{key}",
                )
    st.markdown("**Drill-down: one head over training**")
    left, right = st.columns(2)
    layer = left.selectbox("Layer", list(range(run.n_layers)), key=f"{key_prefix}-layer")
    head = right.selectbox("Head", list(range(run.n_heads)), key=f"{key_prefix}-head")
    with section("the drill-down"):
        frame = run.history_frame()
        frame = frame[frame["hook"].map(hook_kind) == kind]
        st.plotly_chart(charts.drill_down(frame, int(layer), int(head)), key="drill-down")


def losses(run: Run) -> None:
    st.subheader("Loss curves")
    with section("the loss curves"):
        frame = run.loss_frame()
        st.plotly_chart(charts.loss_curves(frame), key="losses")
        st.plotly_chart(charts.global_curves(frame), key="global")


def ranking(run: Run, truth: dict[str, list[list[int]]] | None) -> None:
    from tl_noise.evaluation import ground_truth_mask, roc_auc

    st.subheader("Ranked head importance")
    if not run.head_hooks():
        st.info("This run put no per-head noise, so there is no head ranking.")
        return
    with section("the ranking"):
        frame = run.ranking_frame()
        state = run.status()["state"]
        st.caption(
            "Importance = -log(std) of the "
            + ("fitted noise." if state == "completed" else "latest history record.")
        )
        if truth:
            std = run.head_std_matrix()
            mask = ground_truth_mask(truth, run.n_layers, run.n_heads)
            known = ~std.isnan()
            if mask[known].any() and (~mask[known]).any():
                auc = roc_auc(-std[known].log(), mask[known])
                st.metric("ROC AUC against the ground-truth heads", f"{auc:.3f}")
        st.dataframe(frame, hide_index=True, key="ranking-table")
        st.download_button(
            "Download ranking (CSV)",
            frame.to_csv(index=False),
            file_name=f"{run.name}-ranking.csv",
            mime="text/csv",
        )
    curve = run.faithfulness()
    if curve:
        st.plotly_chart(charts.faithfulness(curve), key="faithfulness")
    if truth:
        st.markdown("**Ground truth** (from the model): `" + json.dumps(truth) + "`")


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two score tensors over the entries both define."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    keep = ~(a.isnan() | b.isnan())
    if int(keep.sum()) < 2:
        return float("nan")
    ra, rb = (x[keep].argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def _comparable(run: Run, others: dict[str, Path], open_run: Callable[[str], Run]) -> int | None:
    """Index of the first other run with the same heads (the default run B), else None."""
    for i, path in enumerate(others.values()):
        try:
            other = open_run(str(path))
        except ValueError:
            continue
        if (other.n_layers, other.n_heads) == (run.n_layers, run.n_heads) and other.steps():
            return i
    return None


def compare(
    run: Run, others: dict[str, Path], open_run: Callable[[str], Run], key_prefix: str
) -> None:
    st.subheader("Compare two runs")
    if not others:
        st.info("Only one run under the root: nothing to compare with.")
        return
    label = st.selectbox(
        "Compare with (run B)",
        list(others),
        index=_comparable(run, others, open_run),
        placeholder="choose a run",
        key=f"{key_prefix}-compare-with",
    )
    if label is None:
        st.info("No other run has the same layers and heads; choose one to compare anyway.")
        return
    try:
        other = open_run(str(others[label]))
    except ValueError as err:
        st.error(f"Cannot open run B: {err}")
        return
    if (other.n_layers, other.n_heads) != (run.n_layers, run.n_heads):
        st.error(
            f"Runs have different shapes: A has {run.n_layers}x{run.n_heads} heads, "
            f"B ({label}) has {other.n_layers}x{other.n_heads}."
        )
        return
    with section("the comparison"):
        a, b = run.head_std_matrix(), other.head_std_matrix()
        diff = a.double().log10() - b.double().log10()
        st.plotly_chart(
            charts.heatmap(
                diff,
                f"log10 std(A) - log10 std(B), A = {run.name}, B = {label}",
                label="log10 A/B",
                scale="signed",
            ),
            key="compare-diff",
        )
        st.caption("Blue: A tolerates more noise than B on that head; red: less.")
        st.metric("Spearman rank correlation of head stds", f"{_rank_correlation(a, b):.3f}")
        st.plotly_chart(charts.comparison_scatter(a, b, run.name, label), key="compare-scatter")
