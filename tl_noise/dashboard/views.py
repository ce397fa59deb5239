"""The dashboard's sections, one function each; every one reads the run through
:class:`tl_noise.runs.Run` and shows a message, never a traceback, when the run's data is not
what it should be. Text from the run's files is shown as plain text (:mod:`.safe`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import streamlit as st
import torch
from torch import Tensor

from tl_noise.dashboard import charts, ranges, safe
from tl_noise.dashboard.safe import plain
from tl_noise.runs import Run, hook_kind

STATE_BANNERS = {"completed": st.success, "running": st.info, "failed": st.error}
DATA_ERRORS = (ValueError, KeyError, TypeError, IndexError, OSError, RuntimeError)
MAX_MESSAGE = 4000  # characters of a status message shown
COSINE_MIN_NORM = 1e-6
"""A head's cosine is undefined (blank) where the smaller of its two gradient norms is below this
fraction of the largest norm at that step: rounding decides its sign there."""
SCALE_CLIP = ranges.SCALE_CLIP  # the scaling factor's colours end at this quantile of |values|
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
        safe.error(f"Cannot show {what}: {err}")


def step_text(done: Any, total: Any, steps: list[int]) -> str:
    """The progress after the state, e.g. ``", at step 299 (300 of 300 steps done)"``: the newest
    record's step (records count from 0, as the slider and the titles do) and the steps done."""
    parts = [f"at step {steps[-1]}"] if steps else []
    if isinstance(done, int):
        parts.append(f"({done} of {total} steps done)" if total else f"({done} steps done)")
    return ", " + " ".join(parts) if parts else ""


def status_banner(run: Run, steps: list[int]) -> dict[str, Any]:
    """The run's state and progress; its message below as plain text."""
    status = run.status()
    total = (run.config.get("fit") or {}).get("steps")
    text = f"**{plain(status['state'])}**" + step_text(status["step"], total, steps)
    STATE_BANNERS.get(status["state"], st.warning)(text)
    if status["message"]:
        st.text(status["message"][:MAX_MESSAGE])
    return status


def history_notes(run: Run) -> None:
    """Warnings for history lines skipped and records whose fields failed the schema."""
    skipped, problems = run.history_problems()
    if skipped:
        safe.warning(
            f"{skipped} line(s) of history.jsonl skipped: not a well-formed record (damaged, "
            "nested too deep, or holding a number too large)."
        )
    if problems:
        step, fields = next(iter(problems.items()))
        safe.warning(
            f"{len(problems)} history record(s) have malformed fields, left out of the views "
            f"(first: step {step}: {'; '.join(fields.values())[:300]})."
        )


def config_panel(run: Run) -> None:
    cfg = run.config
    fit, task, model = (cfg.get(k) or {} for k in ("fit", "task", "model"))
    kinds = ", ".join(sorted({hook_kind(h) for h in run.hook_names()}))
    st.markdown(
        f"**model** {plain(model.get('name'))} ({run.n_layers} layers x {run.n_heads} heads)  \n"
        f"**task** {plain(task.get('name', '-'))}  \n"
        f"**mode** {plain(fit.get('mode'))}, objective {plain(fit.get('objective'))}, "
        f"{plain(fit.get('steps'))} steps at lr {plain(fit.get('lr'))}  \n"
        f"**hooks** {len(run.hook_names())} ({plain(kinds)})"
    )
    with st.expander("config.json"):
        st.json(cfg, expanded=1)


def _per_head(run: Run) -> Any:
    """step, layer, head, log_std, std: a head's std over training (geometric mean over the
    per-head hooks of its layer)."""
    frame = run.history_frame()
    per_head = (
        frame.assign(log_std=np.log10(frame["std"]))
        .groupby(["step", "layer", "head"], as_index=False)["log_std"]
        .mean()
    )
    per_head["std"] = per_head["log_std"].map(lambda v: 10.0**v)
    return per_head


def head_stds(
    run: Run, step: int, truth: dict[str, list[list[int]]] | None, fixed: bool = True
) -> None:
    """The std heatmap (``fixed``: one colour range over the whole run) and trajectories."""
    st.subheader("Learned std per head")
    if not run.head_hooks():
        st.info("This run put no per-head noise (no hook_z/hook_q/... hooks).")
        return
    try:
        per_head, failure = _per_head(run), None
    except DATA_ERRORS as err:  # shown with the trajectories; the heatmap may still work
        per_head, failure = None, err
    with section("the per-head stds"):
        matrix = run.head_std_matrix(step)
        zrange = None
        if fixed and per_head is not None:
            zrange = ranges.value_range(torch.tensor(per_head["std"].to_numpy()), "log")
        st.plotly_chart(
            charts.heatmap(
                matrix,
                f"Std per head at step {step} (log colour scale)",
                ground_truth=truth,
                zrange=zrange,
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
        if failure is not None:
            raise failure
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


def grad_frame(run: Run, kind: str) -> Any:
    """The history frame of the per-head hooks of ``kind``, the cosine left undefined (NaN)
    where a gradient norm is too small for it (:data:`COSINE_MIN_NORM`)."""
    frame = run.history_frame()
    frame = frame[frame["hook"].map(hook_kind) == kind].copy()
    norms = [c for c in ("noise_norm", "task_norm") if c in frame]
    if "cosine" in frame and len(norms) == 2:
        largest = frame.groupby("step")[norms].transform("max").max(axis=1)
        small = frame[norms].min(axis=1) < COSINE_MIN_NORM * largest
        frame.loc[small | largest.isna(), "cosine"] = np.nan
    return frame


def _grad_range(key: str, scale: str, matrix: Tensor, frame: Any) -> tuple[float, float] | None:
    """The colour range of a gradient heatmap: the cosine's [-1, 1]; the scaling factor's clipped
    at :data:`SCALE_CLIP` (spikes would wash out the rest); others over the run when ``frame``
    (fixed range) is given, else automatic."""
    if key == "cosine":
        return (-1.0, 1.0)
    source = matrix if frame is None or key not in frame else torch.tensor(frame[key].to_numpy())
    if key == "scale":
        return ranges.value_range(source, scale, clip=SCALE_CLIP)
    return None if frame is None else ranges.value_range(source, scale)


def gradients(run: Run, step: int, key_prefix: str, fixed: bool = True) -> None:
    st.subheader("Projected gradients per head")
    problem = run.record_problems(step).get("grad")
    if problem:
        safe.warning(f"The gradient record of step {step} is malformed: {problem}")
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
        "the composite alpha and step scale equivalent to it on that head alone. The cosine is "
        f"blank where a norm is below {COSINE_MIN_NORM:g} x the largest norm at that step "
        f"(undefined); the scaling factor's colours end at its {SCALE_CLIP:.0%} quantile."
    )
    try:
        frame, failure = grad_frame(run, kind), None
    except DATA_ERRORS as err:  # shown with the drill-down; the heatmaps may still work
        frame, failure = None, err
    with section("the gradient heatmaps"):
        _gradient_heatmaps(run, step, kind, frame if fixed else None)
    st.markdown("**Drill-down: one head over training**")
    left, right = st.columns(2)
    layer = left.selectbox("Layer", list(range(run.n_layers)), key=f"{key_prefix}-layer")
    head = right.selectbox("Head", list(range(run.n_heads)), key=f"{key_prefix}-head")
    with section("the drill-down"):
        if failure is not None:
            raise failure
        st.plotly_chart(charts.drill_down(frame, int(layer), int(head)), key="drill-down")


def _gradient_heatmaps(run: Run, step: int, kind: str, frame: Any) -> None:
    matrices = {key: run.grad_matrix(step, key, kind) for key, _, _ in GRAD_PANELS}
    noise, task = (run.grad_matrix(step, k, kind) for k in ("noise_norm", "task_norm"))
    matrices["cosine"] = ranges.undefined_cosine(matrices["cosine"], noise, task, COSINE_MIN_NORM)
    columns = st.columns(2)
    for i, (key, title, scale) in enumerate(GRAD_PANELS):
        zrange = _grad_range(key, scale, matrices[key], frame)
        with columns[i % 2]:
            st.plotly_chart(
                charts.heatmap(
                    matrices[key], f"{title} (step {step})", label=key, scale=scale, zrange=zrange
                ),
                key=f"grad-{key}",
            )


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
        circuit = mib_circuit_json(run)
        if circuit is not None:
            st.download_button(
                "Download circuit (MIB JSON)",
                circuit,
                file_name=f"{run.name}-circuit.json",
                mime="application/json",
                key="mib-circuit",
            )
    with section("the faithfulness curve"):
        curve = run.faithfulness()
        if curve:
            st.plotly_chart(charts.faithfulness(curve), key="faithfulness")
    if truth:
        st.markdown("**Ground truth** (from the model):")
        st.code(json.dumps(truth), language="json")


def mib_circuit_json(run: Run) -> str | None:
    """The run's node ranking as MIB's circuit JSON (every scored node in the graph), or None
    when the run recorded no node scores."""
    from tl_noise.runs.circuits import circuit_payload

    try:
        scores = (run.summary() or {}).get("node_importance")
    except ValueError:
        return None
    if not isinstance(scores, dict) or not scores:
        return None
    fingerprint = run.config["model"]["fingerprint"]
    cfg = {k: fingerprint.get(k) for k in ("n_layers", "n_heads", "d_model", "attn_only")}
    try:
        return json.dumps(circuit_payload(scores, cfg))
    except (ValueError, TypeError):
        return None
