"""The page: choose a run under the runs root, then show it (live while it is running).

The runs root is the first argument after ``--`` (``streamlit run apps/dashboard.py -- ROOT``)
or the environment variable ``TL_NOISE_RUNS``. Only run directories found under the root by
:func:`tl_noise.runs.list_runs` can be opened; the query parameter ``?run=NAME`` selects one of
them by name. Run by Streamlit, this file renders the page itself.

Whatever a run's files hold, the page shows a message, never a traceback: the reader checks them
(:mod:`tl_noise.runs.schema`), every section catches what is left, and :func:`main` and the live
body are :func:`~tl_noise.dashboard.safe.guarded` besides.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from tl_noise.dashboard import circuit, compare, safe, views
from tl_noise.runs import CONFIG, Run, list_runs

ENV_ROOT = "TL_NOISE_RUNS"
USAGE = (
    "No runs root given. Start the dashboard with `tl-noise app RUNS_ROOT`, "
    "`streamlit run apps/dashboard.py -- RUNS_ROOT`, or set the environment variable "
    f"`{ENV_ROOT}`."
)


def runs_root(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """The runs root from the script arguments, else ``$TL_NOISE_RUNS``, else ""."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if args:
        return args[0]
    return (os.environ if environ is None else environ).get(ENV_ROOT, "")


def run_label(root: Path, path: Path) -> str:
    """A run's name in the picker: its path relative to the root (the root's own name when the
    root is a run)."""
    return path.relative_to(root).as_posix() if path != root else path.name


def open_run(path: str) -> Run:
    """The run at ``path``, kept for this browser session while its config.json is unchanged,
    so its history is re-read only when the file changes. (Per session, not shared between
    sessions: a session's reruns never overlap, so the run's caches need no lock.)"""
    try:
        info = (Path(path) / CONFIG).stat()
        key = (path, info.st_size, info.st_mtime_ns)
    except OSError:
        key = (path, 0, 0)
    runs = st.session_state.setdefault("_open_runs", {})
    if key not in runs:
        for stale in [k for k in runs if k[0] == path]:
            del runs[stale]
        runs[key] = Run(path)
    return runs[key]


def pick_run(labels: list[str]) -> str:
    """Sidebar picker; the first choice comes from ``?run=`` when it names a listed run."""
    if "run" not in st.session_state:
        wanted = st.query_params.get("run")
        if wanted in labels:
            st.session_state["run"] = wanted
        elif wanted:
            safe.warning(f"Run {wanted!r} from the URL is not under the runs root.", st.sidebar)
    if st.session_state.get("run") not in labels:
        st.session_state["run"] = labels[0]
    label = st.sidebar.selectbox("Run", labels, key="run")
    st.query_params["run"] = label
    return label


def step_slider(steps: list[int]) -> int:
    """The training step to show; it follows the newest step while it was on the newest one."""
    last = steps[-1]
    chosen, newest_seen = st.session_state.get("step"), st.session_state.get("_newest_step")
    if chosen not in steps or (chosen == newest_seen and newest_seen != last):
        st.session_state["step"] = last
    st.session_state["_newest_step"] = last
    if len(steps) == 1:
        st.caption(f"Training step {last} (the only record so far)")
        return last
    return st.select_slider("Training step (records count from 0)", options=steps, key="step")


def no_record_yet(state: str) -> str:
    """What the page says of a run without a history record, by its state."""
    if state == "running":
        return (
            "No history record yet: the run has not logged a step. This page refreshes while "
            "the run is running."
        )
    return f"No history record: the run ({state}) logged no step."


@safe.guarded("the run")
def body(
    run: Run, label: str, others: dict[str, Path], truth: dict | None, state: str, fixed: bool
) -> None:
    try:
        steps = run.steps()
    except views.DATA_ERRORS as err:
        views.status_banner(run, [])
        safe.error(f"Cannot read the history of run {label!r}: {err}")
        return
    status = views.status_banner(run, steps)
    if state == "running" and status["state"] != "running":
        st.rerun()  # the run finished: redraw the page without live refresh
    views.history_notes(run)
    if not steps:
        st.info(no_record_yet(status["state"]))
        return
    offered = run.full_steps() or steps
    step = step_slider(offered)
    latest = step == offered[-1]
    if run.is_edge_run():  # one std per edge: the graph, no per-head views
        circuit.edge_run_tabs(run, step, latest, truth)
        return
    tabs = st.tabs(
        [
            "Stds per head",
            "Other hooks",
            "Gradients",
            "Losses",
            "Ranking",
            "Circuit graph",
            "Compare",
        ]
    )
    with tabs[0]:
        views.head_stds(run, step, truth, fixed)
    with tabs[1]:
        views.feature_stds(run, step)
    with tabs[2]:
        views.gradients(run, step, key_prefix=label, fixed=fixed)
    with tabs[3]:
        views.losses(run)
    with tabs[4]:
        views.ranking(run, truth)
    with tabs[5]:
        circuit.circuit_graph(run, step, latest, truth)
    with tabs[6]:
        compare.compare(run, others, open_run, key_prefix=label)


def main(argv: Sequence[str] | None = None) -> None:
    st.set_page_config(page_title="tl-noise dashboard", layout="wide")
    st.title("tl-noise dashboard")
    page(argv)


def sidebar_truth(run: Run) -> dict | None:
    """The run's ground truth for the overlay (a malformed one is named, not shown)."""
    try:
        truth = run.ground_truth()
    except views.DATA_ERRORS as err:
        safe.warning(f"Ground truth not shown: {err}", st.sidebar)
        return None
    if truth and not st.sidebar.toggle("Overlay ground truth", value=True, key="truth"):
        return None
    return truth


@safe.guarded("the page")
def page(argv: Sequence[str] | None = None) -> None:
    root = runs_root(argv)
    if not root:
        st.error(USAGE)
        return
    try:
        paths = list_runs(root)
    except ValueError as err:
        safe.error(f"Cannot list runs: {err}")
        return
    if not paths:
        st.warning(
            f"No run directories under {safe.plain(repr(root))} yet. Write one with "
            "`tl_noise.train.fit(..., run_dir=...)`."
        )
        return
    base = Path(root).resolve()
    by_label = {run_label(base, p): p for p in paths}
    safe.caption(f"Runs root: {base} ({len(paths)} runs)", st.sidebar)
    label = pick_run(list(by_label))
    try:
        run = open_run(str(by_label[label]))
    except views.DATA_ERRORS as err:
        safe.error(f"Run {label!r} cannot be shown: {err}")
        st.caption("A run directory needs a valid config.json; it is written when a fit starts.")
        return
    safe.caption(run.path)
    with st.sidebar:
        views.config_panel(run)
    truth = sidebar_truth(run)
    fixed = st.sidebar.toggle("Fixed colour range over the run", value=True, key="fixed_range")
    state = run.status()["state"]
    others = {k: v for k, v in by_label.items() if k != label}
    if state == "running" and st.sidebar.toggle("Live refresh", value=True, key="live"):
        every = st.sidebar.slider("Refresh every (s)", 1, 30, 2, key="every")
        st.fragment(body, run_every=every)(run, label, others, truth, state, fixed)
    else:
        body(run, label, others, truth, state, fixed)


if __name__ == "__main__":
    main()
