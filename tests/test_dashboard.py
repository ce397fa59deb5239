"""The run reader (tl_noise.runs.Run) and the Streamlit dashboard, on real run directories.

A session fixture fits noise on the embedded induction model (twice, so two runs can be compared)
and on a small model with MLP and residual-stream noise, then adds a run that is still being
written and two broken ones. Streamlit's AppTest drives the real page over that root.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import tl_noise as tn
from tl_noise.evaluation import faithfulness_curve
from tl_noise.fitting import fit
from tl_noise.io import write_json
from tl_noise.runs import GRAD_KEYS, Run, list_runs, load_run, read_history

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = streamlit_testing.AppTest

APP = Path(__file__).resolve().parent.parent / "apps" / "dashboard.py"
STEPS = 24
LIVE_RECORDS = 10


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory, embedded_fit, make_model) -> Path:
    root = tmp_path_factory.mktemp("runs")
    path = root / "induction"
    model, task = embedded_fit(path, steps=STEPS, checkpoint_every=8, seed=0)
    # a faithfulness curve in the summary, as computed by tl_noise.evaluation
    run = load_run(path)
    importance = -run.head_std_matrix().log()
    curve = faithfulness_curve(model, task, importance, ks=[0, 2, 4, importance.numel()])
    summary = json.loads((path / "summary.json").read_text())
    summary["faithfulness"] = {"k": curve["ks"], "faithfulness": curve["faithfulness"]}
    write_json(path / "summary.json", summary)
    embedded_fit(
        root / "sweep/budget", steps=STEPS, checkpoint_every=8, mode="budget", seed=1, budget=0.5
    )

    small = make_model(n_layers=1, d_model=16, n_heads=2, d_vocab=30, n_ctx=12, d_mlp=32)
    tokens = torch.randint(0, 30, (16, 10), generator=torch.Generator().manual_seed(0))
    noise = tn.attach_noise(
        small, ["blocks.*.attn.hook_z", "blocks.*.mlp.hook_pre"], calibration_tokens=tokens
    )  # hook_pre: per feature under "auto" (an MLP's output gets one std per node)
    fit(small, noise, tokens, steps=6, batch_size=8, run_dir=root / "small", quiet=True)

    # a run still being written: no final noise yet, a half-written last history line
    live = root / "live"
    shutil.copytree(path, live)
    shutil.rmtree(live / "final")
    (live / "summary.json").unlink()
    lines = (live / "history.jsonl").read_bytes().splitlines(keepends=True)
    (live / "history.jsonl").write_bytes(b"".join(lines[:LIVE_RECORDS]) + lines[LIVE_RECORDS][:40])
    write_json(live / "status.json", {"state": "running", "step": LIVE_RECORDS, "message": ""})

    # a completed run whose last history record was damaged on disk
    damaged = root / "damaged"
    shutil.copytree(root / "small", damaged)
    lines = (damaged / "history.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    record["std"]["blocks.0.attn.hook_z"] = "oops"
    (damaged / "history.jsonl").write_text("\n".join([*lines[:-1], json.dumps(record)]) + "\n")

    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text('{"format": "tl-noise/run", "hooks": [')
    (root / "partial").mkdir()
    (root / "partial" / "history.jsonl").write_text('{"step": 0, "loss": {"ta')
    return root


# --------------------------------------------------------------------------- the reader


def test_run_reader_views_agree_with_the_history(runs_root):
    run = Run(runs_root / "induction")
    model = tn.load_embedded_model()
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    records = read_history(run.path)
    assert run.name == "induction" and run.status()["state"] == "completed"
    assert run.steps() == list(range(STEPS)) and run.hook_names() == run.config["hooks"]
    assert run.head_hooks() == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert run.feature_hooks() == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]

    final = run.final_stds()  # read from final/ (safetensors), equal to the last record
    last = records[-1]["std"]
    assert set(final) == set(last)
    for name, std in final.items():
        assert torch.allclose(std, torch.tensor(last[name]), rtol=1e-6)
    matrix = run.head_std_matrix()
    assert matrix.shape == (n_layers, n_heads)
    assert torch.allclose(matrix[1], torch.tensor(last["blocks.1.attn.hook_z"]), rtol=1e-5)
    assert torch.allclose(
        run.head_std_matrix(3)[0], torch.tensor(records[3]["std"]["blocks.0.attn.hook_z"])
    )

    grad = run.grad_matrix(5, "cosine")
    assert grad.shape == (n_layers, n_heads)
    assert grad[0].tolist() == pytest.approx(records[5]["grad"]["blocks.0.attn.hook_z"]["cosine"])
    with pytest.raises(ValueError, match="gradient key 'nope'"):
        run.grad_matrix(5, "nope")
    with pytest.raises(ValueError, match=f"no history record for step {STEPS + 5}"):
        run.stds_at(STEPS + 5)

    losses = run.loss_frame()
    assert list(losses.columns) == [
        "step",
        "task",
        "noise",
        "total",
        "mean_std",
        "lambda",
        "alpha",
        "scale",
    ]
    assert len(losses) == STEPS and losses["task"].iloc[-1] == records[-1]["loss"]["task"]
    frame = run.history_frame()
    assert len(frame) == STEPS * n_layers * n_heads
    assert set(GRAD_KEYS) <= set(frame.columns)
    row = frame[(frame["step"] == 7) & (frame["layer"] == 1) & (frame["head"] == 2)].iloc[0]
    assert row["std"] == pytest.approx(records[7]["std"]["blocks.1.attn.hook_z"][2], rel=1e-6)

    truth = run.ground_truth()
    assert truth == model.ground_truth
    ranking = run.ranking_frame()
    assert len(ranking) == n_layers * n_heads and ranking["rank"].tolist()[0] == 1
    assert ranking["importance"].is_monotonic_decreasing
    labelled = {(r.layer, r.head) for r in ranking.itertuples() if r.ground_truth}
    assert labelled == {tuple(p) for heads in truth.values() for p in heads}
    curve = run.faithfulness()
    assert curve["k"] == [0, 2, 4, n_layers * n_heads] and len(curve["faithfulness"]) == 4


def test_run_reader_refuses_broken_directories_by_name(runs_root, tmp_path):
    for name, match in [
        ("corrupt", "not valid JSON"),
        ("partial", "does not exist"),
        ("nowhere", "does not exist"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            Run(runs_root / name)
        assert str(runs_root / name) in str(err.value)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"format": "tl-noise/run", "hooks": [], "model": {"fingerprint": {}}})
    )
    with pytest.raises(ValueError, match="n_layers=None"):
        Run(other)


def test_history_of_a_growing_run_skips_the_partial_line(runs_root, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(runs_root / "live", live)
    run = Run(live)
    assert run.steps() == list(range(LIVE_RECORDS)) and run.status()["state"] == "running"
    assert torch.equal(
        run.final_stds()["blocks.0.attn.hook_z"],
        run.stds_at(LIVE_RECORDS - 1)["blocks.0.attn.hook_z"],
    )
    full = (runs_root / "induction" / "history.jsonl").read_bytes().splitlines(keepends=True)
    text = live / "history.jsonl"
    text.write_bytes(b"".join(full[: LIVE_RECORDS + 2]))  # the partial line completed, one more
    assert run.steps() == list(range(LIVE_RECORDS + 2))
    assert len(run.loss_frame()) == LIVE_RECORDS + 2


def test_list_runs_stays_inside_the_root(runs_root, tmp_path):
    names = [p.relative_to(runs_root.resolve()).as_posix() for p in list_runs(runs_root)]
    assert names == ["corrupt", "damaged", "induction", "live", "partial", "small", "sweep/budget"]
    assert list_runs(runs_root / "induction") == [(runs_root / "induction").resolve()]
    jail = tmp_path / "jail"
    jail.mkdir()
    (jail / "escape").symlink_to(runs_root / "induction", target_is_directory=True)
    (jail / "up").symlink_to(runs_root, target_is_directory=True)
    (jail / "own").mkdir()
    (jail / "own" / "config.json").symlink_to(runs_root / "induction" / "config.json")
    assert list_runs(jail) == []
    with pytest.raises(ValueError, match="is not a directory"):
        list_runs(tmp_path / "missing")


# -------------------------------------------------------------------------- the app


def open_app(monkeypatch, root: Path, run: str | None = "induction", **query) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["dashboard.py", str(root)])
    at = AppTest.from_file(str(APP), default_timeout=120)
    if run is not None:
        at.query_params["run"] = run
    at.query_params.update(query)
    return at.run()


def charts(at: AppTest) -> dict[str, dict]:
    """Rendered plotly figures by title."""
    out = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        out[spec["layout"].get("title", {}).get("text", "")] = spec
    return out


def values(data) -> torch.Tensor:
    """A plotly array (a list, nested lists with None for gaps, or base64 binary) as a tensor."""
    if isinstance(data, dict):  # plotly's binary encoding of numpy/pandas arrays
        import base64

        import numpy as np

        array = np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"])
        return torch.from_numpy(array.copy()).double()
    return torch.tensor(json.loads(json.dumps(data).replace("null", "NaN")), dtype=torch.float64)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_dashboard_shows_every_view_of_a_completed_run(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root)
    assert_clean(at)
    assert at.title[0].value == "tl-noise dashboard"
    assert [s.value for s in at.subheader] == [
        "Learned std per head",
        "Other hook points",
        "Projected gradients per head",
        "Loss curves",
        "Ranked head importance",
        "Circuit graph",
        "Compare two runs",
    ]
    assert "completed" in at.success[0].value and at.selectbox(key="run").value == "induction"
    figures = charts(at)
    last = STEPS - 1
    heat = figures[f"Std per head at step {last} (log colour scale)"]
    run = Run(runs_root / "induction")
    std = run.head_std_matrix(last)
    assert torch.allclose(values(heat["data"][0]["customdata"]), std.double(), rtol=1e-6)
    assert "Std per head over training" in figures
    assert f"hook_resid_pre: std per feature at step {last}" in figures
    for title in (
        "Noise-loss gradient norm",
        "Task-loss gradient norm",
        "Cosine(noise, task)",
        "Projected (alphaless) gradient",
        "Equivalent alpha",
        "Equivalent scaling factor",
    ):
        assert f"{title} (step {last})" in figures
    assert {
        "Losses",
        "Mean std and alphaless equivalents",
        "Faithfulness of the top-k heads",
        "Head L0H0: gradients and their projection",
    } <= set(figures)
    graph = figures[f"Circuit graph: node importance ({std.numel()} nodes scored)"]
    nodes = next(t for t in graph["data"] if t["name"] == "nodes")  # heads only: attention-only
    assert {row[0] for row in nodes["customdata"]} == {
        f"a{i}.h{j}" for i in (0, 1) for j in range(4)
    }
    assert not [t for t in graph["data"] if t["mode"] == "lines"]
    table = at.dataframe[0].value
    assert len(table) == std.numel() and table["rank"].tolist()[:3] == [1, 2, 3]
    assert at.get("download_button")
    assert "ROC AUC" in at.metric[0].label


def test_step_slider_scrubs_the_history(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root)
    at.select_slider(key="step").set_value(2).run()
    assert_clean(at)
    figures = charts(at)
    heat = figures["Std per head at step 2 (log colour scale)"]
    expected = Run(runs_root / "induction").head_std_matrix(2)
    assert torch.allclose(values(heat["data"][0]["customdata"]), expected.double(), rtol=1e-6)
    assert "Cosine(noise, task) (step 2)" in figures


def test_drill_down_follows_the_chosen_head(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root)
    at.selectbox(key="induction-layer").set_value(1)
    at.selectbox(key="induction-head").set_value(2).run()
    assert_clean(at)
    fig = charts(at)["Head L1H2: gradients and their projection"]
    names = {trace["name"] for trace in fig["data"]}
    assert {
        "std",
        "noise-loss gradient",
        "task-loss gradient",
        "projected gradient",
        "cosine(noise, task)",
        "equivalent alpha",
        "equivalent scale",
    } == names
    frame = Run(runs_root / "induction").history_frame()
    expected = frame[(frame["layer"] == 1) & (frame["head"] == 2)]["projected"].tolist()
    signed = [t for t in fig["data"] if t["name"] == "projected gradient" and t["yaxis"] == "y3"]
    assert len(signed) == 1
    signed = signed[0]
    assert values(signed["y"]).tolist() == pytest.approx(expected)


def test_ground_truth_overlay_can_be_switched_off(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root)
    truth = Run(runs_root / "induction").ground_truth()
    heat = charts(at)[f"Std per head at step {STEPS - 1} (log colour scale)"]
    overlay = {t["name"]: list(zip(t["y"], t["x"], strict=True)) for t in heat["data"][1:]}
    assert overlay == {k: [tuple(p) for p in v] for k, v in truth.items()}
    at.toggle(key="truth").set_value(False).run()
    heat = charts(at)[f"Std per head at step {STEPS - 1} (log colour scale)"]
    assert len(heat["data"]) == 1


def test_switching_runs_shows_their_hooks(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root)
    at.selectbox(key="run").set_value("small").run()
    assert_clean(at)
    figures = charts(at)
    assert "mlp.hook_pre: std per feature at step 5" in figures
    assert "hook_resid_pre: std per feature at step 5" not in figures
    assert at.query_params["run"] in ("small", ["small"])
    assert len(at.dataframe[0].value) == 2  # 1 layer x 2 heads
    at = open_app(monkeypatch, runs_root, run="sweep/budget")
    assert_clean(at)
    assert at.selectbox(key="run").value == "sweep/budget"
    assert (
        charts(at)["Mean std and alphaless equivalents"]["layout"]["annotations"][-1]["text"]
        == "lambda"
    )


def test_unknown_run_in_the_url_is_refused(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root, run="../../etc")
    assert "not under the runs root" in at.sidebar.warning[0].value
    assert at.selectbox(key="run").value == "corrupt"  # the first listed run


def test_comparing_two_runs(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root)
    at.selectbox(key="induction-compare-with").set_value("sweep/budget").run()
    assert_clean(at)
    figures = charts(at)
    diff = figures["log10 std(A) - log10 std(B), A = induction, B = sweep/budget"]
    a = Run(runs_root / "induction").head_std_matrix().double()
    b = Run(runs_root / "sweep" / "budget").head_std_matrix().double()
    assert torch.allclose(values(diff["data"][0]["customdata"]), a.log10() - b.log10())
    assert "Std per head, run A against run B" in figures
    at.selectbox(key="induction-compare-with").set_value("small").run()
    assert any("different shapes" in e.value for e in at.error)
    assert not at.exception


@pytest.mark.parametrize(
    ("name", "message"), [("corrupt", "not valid JSON"), ("partial", "does not exist")]
)
def test_broken_run_directory_shows_a_message(runs_root, monkeypatch, name, message):
    at = open_app(monkeypatch, runs_root, run=name)
    assert not at.exception
    assert len(at.error) == 1
    assert message in at.error[0].value and str((runs_root / name).resolve()) in at.error[0].value
    assert not at.get("plotly_chart")


def test_damaged_history_is_reported_in_the_views(runs_root, monkeypatch):
    at = open_app(monkeypatch, runs_root, run="damaged")
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and all("malformed std in history step 5" in e for e in errors)
    assert "Losses" in charts(at)  # the views that do not need the damaged record still show
    at.select_slider(key="step").set_value(4).run()
    assert not at.exception and "Std per head at step 4 (log colour scale)" in charts(at)


def test_live_run_refreshes_as_it_grows(runs_root, monkeypatch, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(runs_root / "live", root / "live")
    at = open_app(monkeypatch, root, run="live")
    assert_clean(at)
    assert "running" in at.info[0].value and at.toggle(key="live").value is True
    assert at.select_slider(key="step").value == LIVE_RECORDS - 1
    full = (runs_root / "induction" / "history.jsonl").read_bytes().splitlines(keepends=True)
    grown = b"".join(full[: LIVE_RECORDS + 3]) + full[LIVE_RECORDS + 3][:25]
    (root / "live" / "history.jsonl").write_bytes(grown)
    at.run()
    assert_clean(at)
    assert at.select_slider(key="step").value == LIVE_RECORDS + 2  # follows the newest step
    assert f"Std per head at step {LIVE_RECORDS + 2} (log colour scale)" in charts(at)
    assert "latest history record" in " ".join(c.value for c in at.caption)
    # the run completes: the page shows the final state without live refresh
    shutil.rmtree(root / "live")
    shutil.copytree(runs_root / "induction", root / "live")
    at.run()
    assert_clean(at)
    assert "completed" in at.success[0].value
    assert "live" not in [t.key for t in at.toggle]


def test_missing_or_empty_root_is_explained(monkeypatch, tmp_path):
    monkeypatch.delenv("TL_NOISE_RUNS", raising=False)
    monkeypatch.setattr(sys, "argv", ["dashboard.py"])
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "No runs root given" in at.error[0].value
    monkeypatch.setenv("TL_NOISE_RUNS", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "No run directories under" in at.warning[0].value
    at = open_app(monkeypatch, tmp_path / "missing", run=None)
    assert not at.exception and "is not a directory" in at.error[0].value


def test_launch_command_and_cli_parser(runs_root):
    import argparse

    from tl_noise.cli.app import add_app_parser, dashboard_command

    cmd = dashboard_command(runs_root, port=8765)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]).is_file()
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[-2:] == ["--", str(runs_root.resolve())]
    with pytest.raises(ValueError, match="port=0"):
        dashboard_command(runs_root, port=0)
    with pytest.raises(ValueError, match="is not a directory"):
        dashboard_command(runs_root / "nowhere")
    parser = argparse.ArgumentParser()
    add_app_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app", str(runs_root), "--port", "9000"])
    assert (args.root, args.port, args.host) == (str(runs_root), 9000, "127.0.0.1")
    assert args.func.__name__ == "cmd_app"


def test_dashboard_shows_a_run_with_summary_records(tiny_model, data, tmp_path, monkeypatch):
    """History with summary records (``detail_every``): the step slider offers the full ones."""
    tokens, mask = data
    with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", calibration_tokens=tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=10, batch_size=8, quiet=True,
            detail_every=4, refine_window=0, run_dir=tmp_path / "runs" / "sparse")  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["dashboard.py", str(tmp_path / "runs")])
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = "sparse"
    at.run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.select_slider(key="step").options == ["0", "4", "8", "9"]
    at.select_slider(key="step").set_value(4).run()
    assert not at.exception and not at.error
