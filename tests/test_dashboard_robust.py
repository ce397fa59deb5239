"""Issue 12, hardening round 2, on the page: a damaged run shows a message, never a traceback, and
never breaks the page of a healthy sibling; text from run files is plain text; and the polish
items (step numbers that agree, fixed colour ranges, undefined cosines, clipped scaling factors,
readable log axes, distinguishable trajectories).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")  # the app extra (absent from the 3.x environment)
pytest.importorskip("plotly")
streamlit_testing = pytest.importorskip("streamlit.testing.v1")

from tl_noise.dashboard import charts, ranges  # noqa: E402
from tl_noise.dashboard.safe import plain  # noqa: E402

AppTest = streamlit_testing.AppTest

APP = Path(__file__).resolve().parent.parent / "apps" / "dashboard.py"
STEPS = 8
LAST = STEPS - 1
HOOK = "blocks.0.attn.hook_z"


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, embedded_fit) -> Path:
    path = tmp_path_factory.mktemp("robust") / "healthy"
    embedded_fit(path, steps=STEPS, checkpoint_every=4, seed=0)
    return path


def open_app(monkeypatch, root: Path, run: str) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["dashboard.py", str(root)])
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = run
    return at.run()


def figures(at: AppTest) -> dict[str, dict]:
    out = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        out[spec["layout"].get("title", {}).get("text", "")] = spec
    return out


def values(data) -> list[float]:
    """A plotly array (a list with None for gaps, or base64 binary) as floats (NaN for gaps)."""
    if isinstance(data, dict):
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"]).tolist()
    return [float("nan") if v is None else float(v) for v in data]


def messages(at: AppTest) -> list[str]:
    return [e.value for e in [*at.error, *at.warning, *at.sidebar.warning]]


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def edit_record(run: Path, index: int, edit) -> None:
    lines = (run / "history.jsonl").read_text().splitlines()
    record = json.loads(lines[index])
    edit(record)
    lines[index] = json.dumps(record)
    (run / "history.jsonl").write_text("\n".join(lines) + "\n")


def insert_line(run: Path, line: str) -> None:
    lines = (run / "history.jsonl").read_text().splitlines()
    (run / "history.jsonl").write_text("\n".join([*lines[:3], line, *lines[3:]]) + "\n")


def deep_config(run: Path) -> None:
    text = (run / "config.json").read_text().rstrip()
    (run / "config.json").write_text(text[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}")


def bad_truth(run: Path) -> None:
    edit_json(run / "config.json", lambda c: c["model"].pop("ground_truth"))
    edit_json(run / "summary.json", lambda s: s.update(ground_truth=[["a", 1]]))


def short_std(record: dict) -> None:
    record["std"][HOOK] = record["std"][HOOK][:3]


# name -> (damage, what the damaged run's own page says); "a-" runs cannot be opened at all
DAMAGES = {
    "a-deep-config": (deep_config, "nests too deep"),
    "a-fit-list": (lambda r: edit_json(r / "config.json", lambda c: c.update(fit=[1, 2])), "fit"),
    "a-task-string": (lambda r: edit_json(r / "config.json", lambda c: c.update(task="x")), "task"),
    "a-noise-list": (lambda r: edit_json(r / "config.json", lambda c: c.update(noise=[])), "noise"),
    "b-brackets": (lambda r: insert_line(r, "[" * 200_000), "1 line(s) of history.jsonl skipped"),
    "b-big-integer": (
        lambda r: insert_line(r, '{"step": 3, "loss": {"task": ' + "7" * 5000 + "}}"),
        "1 line(s) of history.jsonl skipped",
    ),
    "b-std-shape": (lambda r: edit_record(r, LAST, short_std), "malformed std"),
    "b-truth": (bad_truth, "Ground truth not shown"),
    "b-faithfulness": (
        lambda r: edit_json(r / "summary.json", lambda s: s.update(faithfulness={"k": [{}]})),
        "faithfulness",
    ),
}


@pytest.fixture(scope="module")
def damaged_root(healthy, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged-root")
    shutil.copytree(healthy, root / "healthy")
    for name, (damage, _) in DAMAGES.items():
        shutil.copytree(healthy, root / name)
        damage(root / name)
    return root


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_a_damaged_run_shows_a_message_not_a_traceback(damaged_root, monkeypatch, name):
    at = open_app(monkeypatch, damaged_root, name)
    assert not at.exception, [e.value for e in at.exception]
    expected = DAMAGES[name][1]
    assert any(plain(expected) in m for m in messages(at)), messages(at)  # shown escaped


def test_a_damaged_siblings_are_skipped_in_compare_with_a_note(damaged_root, monkeypatch):
    at = open_app(monkeypatch, damaged_root, "healthy")
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    note = " ".join(c.value for c in at.caption)
    assert plain("Skipped run(s) that cannot be read") in note
    for name in DAMAGES:
        assert (plain(name) in note) == name.startswith("a-")
    assert at.selectbox(key="healthy-compare-with").value == "b-big-integer"  # the first readable
    assert "Std per head, run A against run B" in figures(at)


# ------------------------------------------------------------------- D: plain text


def test_d_status_messages_and_model_names_are_plain_text(healthy, tmp_path, monkeypatch):
    run = tmp_path / "root" / "run"
    shutil.copytree(healthy, run)
    image = "![x](http://127.0.0.1:9/x.png) **bold** <img src=x> $x$"
    (run / "status.json").write_text(
        json.dumps({"state": "failed", "step": 3, "message": f"stopped: {image}"})
    )
    edit_json(run / "config.json", lambda c: c["model"].update(name=f"`m` {image}"))
    at = open_app(monkeypatch, run.parent, "run")
    assert not at.exception
    rendered = [e.value for e in [*at.markdown, *at.caption, *at.error, *at.warning, *at.info]]
    rendered += [e.value for e in at.sidebar.markdown]
    leaks = [t for t in rendered if "![" in t or re.search(r"(?<!\\)<img", t)]  # unescaped
    assert not leaks, leaks
    assert f"stopped: {image}" in [t.value for t in at.text]
    assert any(plain(f"`m` {image}") in text for text in rendered)


def test_d_plain_escapes_every_markdown_construct():
    for text in ("![x](u)", "[l](u)", "`c`", "**b**", "_i_", "<b>", "$m$", ":red[x]", "# h"):
        escaped = plain(text)
        assert all(f"\\{c}" in escaped for c in text if c in "![]()`*_<>$:#")
    assert plain("- item\n1. two") == "\\- item\n1\\. two"
    assert plain("a-b.c/d") == "a-b.c/d"  # paths stay readable


# ------------------------------------------------------------------------ F: polish


def test_f_the_banner_the_slider_and_the_titles_agree_on_the_step(healthy, monkeypatch):
    at = open_app(monkeypatch, healthy.parent, "healthy")
    assert not at.exception
    banner = at.success[0].value
    assert f"at step {LAST} ({STEPS} of {STEPS} steps done)" in banner
    assert f"step {STEPS} of" not in banner
    assert at.select_slider(key="step").value == LAST
    assert f"Std per head at step {LAST} (log colour scale)" in figures(at)


def test_f_the_std_heatmap_keeps_one_colour_range_over_the_run(healthy, monkeypatch):
    at = open_app(monkeypatch, healthy.parent, "healthy")
    assert at.toggle(key="fixed_range").value is True
    last = figures(at)[f"Std per head at step {LAST} (log colour scale)"]["data"][0]
    at.select_slider(key="step").set_value(0).run()
    first = figures(at)["Std per head at step 0 (log colour scale)"]["data"][0]
    assert (first["zmin"], first["zmax"]) == (last["zmin"], last["zmax"])
    at.toggle(key="fixed_range").set_value(False).run()
    free = figures(at)["Std per head at step 0 (log colour scale)"]["data"][0]
    assert "zmin" not in free


def test_f_cosine_is_undefined_where_a_gradient_vanishes(healthy, tmp_path, monkeypatch):
    run = tmp_path / "root" / "run"
    shutil.copytree(healthy, run)

    def vanish(record):
        stats = record["grad"][HOOK]
        stats["noise_norm"] = [1.0] * 4
        stats["task_norm"] = [1.0, 1e-12, 1.0, 1.0]
        stats["cosine"] = [0.5, -1.0, 0.5, 0.5]

    edit_record(run, LAST, vanish)
    at = open_app(monkeypatch, run.parent, "run")
    assert not at.exception
    cosine = figures(at)[f"Cosine(noise, task) (step {LAST})"]["data"][0]
    assert cosine["z"][0][1] is None and cosine["z"][0][0] is not None
    at.selectbox(key="run-head").set_value(1).run()
    drill = figures(at)["Head L0H1: gradients and their projection"]
    (trace,) = [t for t in drill["data"] if t["name"] == "cosine(noise, task)"]
    cosines = values(trace["y"])
    assert pd.isna(cosines[-1]) and not pd.isna(cosines[0])


def test_f_the_scaling_factor_is_clipped_not_scaled_to_its_spikes(healthy, tmp_path, monkeypatch):
    run = tmp_path / "root" / "run"
    shutil.copytree(healthy, run)
    edit_record(run, LAST, lambda r: r["grad"][HOOK]["scale"].__setitem__(0, 1e12))
    at = open_app(monkeypatch, run.parent, "run")
    heat = figures(at)[f"Equivalent scaling factor (step {LAST})"]["data"][0]
    assert heat["zmax"] < 1e11 and heat["zmin"] == -heat["zmax"]
    drill = figures(at)["Head L0H0: gradients and their projection"]
    ranges = [
        a["range"] for k, a in drill["layout"].items() if k.startswith("yaxis") and "range" in a
    ]
    assert ranges and all(high < 1e11 for _, high in ranges)


def test_f_the_projected_line_lets_the_noise_loss_line_show(healthy, monkeypatch):
    at = open_app(monkeypatch, healthy.parent, "healthy")
    drill = figures(at)["Head L0H0: gradients and their projection"]
    projected = [t for t in drill["data"] if t["name"] == "projected gradient"]
    noise = [t for t in drill["data"] if t["name"] == "noise-loss gradient"]
    assert projected and all(t["line"]["dash"] == "dash" and t["opacity"] < 1 for t in projected)
    assert all("dash" not in t["line"] for t in noise)


def test_f_a_partial_run_promises_refreshes_only_while_running(healthy, tmp_path, monkeypatch):
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    shutil.copy(healthy / "config.json", run / "config.json")
    (run / "history.jsonl").write_text("")
    for state, promise in (("failed", False), ("running", True)):
        (run / "status.json").write_text(json.dumps({"state": state, "step": 0, "message": ""}))
        at = open_app(monkeypatch, run.parent, "run")
        assert not at.exception
        text = " ".join(i.value for i in at.info)
        assert "No history record" in text and ("refreshes" in text) == promise


def test_f_log_axes_always_show_several_ticks():
    assert ranges.log_axis([1e-5, 1.0])["dtick"] == 1  # five decades: one tick per decade
    assert ranges.log_axis([0.01, 0.5])["dtick"] == "D2"  # 1-2-5 ticks
    assert ranges.log_axis([0.04, 0.06])["dtick"] == "D1"  # every digit
    assert ranges.log_axis([])["minor"]["ticks"]
    frame = trajectories_frame()
    fig = charts.trajectories(frame)
    assert fig.layout.yaxis.dtick == "D1" and fig.layout.yaxis.type == "log"


def trajectories_frame() -> pd.DataFrame:
    rows = []
    for step in range(3):
        for layer in range(2):
            for head in range(3):
                std = (
                    0.05 + 0.001 * step * (head + 1) + 0.002 * layer
                    if (layer, head) != (1, 2)
                    else None
                )
                rows.append({"step": step, "layer": layer, "head": head, "std": std})
    frame = pd.DataFrame(rows)
    same = frame[(frame["layer"] == 0) & (frame["head"] == 2)]["std"].to_numpy()
    frame.loc[(frame["layer"] == 1) & (frame["head"] == 2), "std"] = same  # L1H2 ties L0H2
    return frame


def test_f_trajectories_tell_heads_by_colour_layers_by_dash_and_name_ties():
    fig = charts.trajectories(trajectories_frame())
    lines = {t.name.split(" ")[0]: t for t in fig.data}
    assert lines["L0H0"].line.color == lines["L1H0"].line.color  # same head, same colour
    assert lines["L0H0"].line.color != lines["L0H1"].line.color
    assert lines["L0H0"].line.dash != lines["L1H0"].line.dash  # layers differ by dash
    assert lines["L0H2"].name == "L0H2 = L1H2" and "= L0H2" in lines["L1H2"].hovertemplate
    assert "=" not in lines["L0H0"].name


def test_f_value_ranges_and_undefined_cosines():
    import torch

    assert ranges.value_range(torch.tensor([0.01, 1.0, 10.0]), "log") == pytest.approx((-2, 1))
    spikes = torch.tensor([1.0, -2.0, 3.0] * 10 + [1e12])
    low, high = ranges.value_range(spikes, "signed", clip=0.95)
    assert low == -high and high < 10
    cosine = ranges.undefined_cosine(
        torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1e-12]]), 1e-6
    )
    assert cosine[0, 0] == 0.5 and cosine[0, 1].isnan()
