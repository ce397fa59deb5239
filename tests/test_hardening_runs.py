"""Hardening of run directories (issue 12): one writer per directory, resuming only with the data
the run was fitted on, resuming with fewer or the same steps, extending a completed run, and a
run that failed before its first checkpoint started over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BAD_INPUT_FIT as FIT
from conftest import (
    INF,
    assert_same_state,
    attach,
    bits,
    noise_state,
    snapshot,
)

from tl_noise.fitting import fit
from tl_noise.hooks import NoiseHooks
from tl_noise.io import read_json, read_tensors, write_json
from tl_noise.runs import latest_checkpoint, read_history

pytestmark = pytest.mark.tl3

HELPER = Path(__file__).parent / "helpers" / "kill_fit.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def status_of(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


# --------------------------------------------------------------- 1. one writer per directory
@pytest.mark.slow
def test_two_processes_starting_a_fit_into_one_new_directory(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(HELPER), str(run), "30", "--delay", "0.05"]
    procs = [subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], errors
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    message = re.search(r"ValueError: (.*)", errors[loser])
    assert message, errors[loser]
    assert f"run_dir {str(run)!r} is in use by another fit (PID {procs[winner].pid})" in (
        message.group(1)
    )
    # the directory is the winner's run, whole
    assert [r["step"] for r in read_history(run)] == list(range(30))
    assert status_of(run)["state"] == "completed"
    assert not (run / ".lock").exists()


def test_a_held_lock_refuses_a_second_writer_naming_the_pid(tiny_model, data, intact, tmp_path):
    from tl_noise.runs.lock import RunLock

    tokens, mask = data
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with attach(tiny_model, tokens) as noise:
            with pytest.raises(ValueError, match=rf"in use by another fit \(PID {os.getpid()}\)"):
                fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, run_dir=run, **FIT)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    assert not (run / ".lock").exists()
    with attach(tiny_model, tokens) as noise:  # released: the next fit goes ahead
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, run_dir=run, **FIT)
    assert status_of(run)["state"] == "completed" and not (run / ".lock").exists()


# ------------------------------------------------------------ 2. resuming with other data
def _resume(model, tokens, mask, run, steps=8, **kw):
    with attach(model, tokens) as noise:
        return fit(model, noise, tokens, loss_mask=mask, steps=steps, run_dir=run, resume=True,
                   **{**FIT, **kw})  # fmt: skip


def _other_tokens(tokens):
    other = tokens.clone()
    other[3, 4] = (other[3, 4] + 1) % 50
    return other


def _other_mask(mask):
    other = mask.clone()
    other[2, 3] = True
    return other


@pytest.mark.parametrize(
    ("change", "match"),
    [("tokens", "tokens changed"), ("loss_mask", "loss_mask changed")],
)
def test_resume_with_other_data_is_refused(change, match, tiny_model, data, intact, run_copy):
    tokens, mask = data
    if change == "tokens":
        tokens = _other_tokens(tokens)
    else:
        mask = _other_mask(mask)
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match=f"cannot resume .* with other data: {match}"):
        _resume(tiny_model, tokens, mask, run_copy)
    assert snapshot(run_copy) == before


def test_the_run_config_records_the_data(run_copy, data):
    config = read_json(run_copy / "config.json")
    assert set(config["data"]) == {"tokens", "loss_mask", "extras", "metric"}
    assert config["data"]["metric"] is None  # the KL objective uses no metric


def metric_a(logits, batch):
    return logits[:, -1, 3].mean()


def metric_b(logits, batch):
    return logits[:, -1, 4].mean()


def test_resume_with_another_metric_is_refused(tiny_model, data, intact, tmp_path):
    tokens, mask = data
    run = tmp_path / "run"
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, objective=metric_a, steps=2, run_dir=run,
            **FIT)  # fmt: skip
    before = snapshot(run)
    metric_b.__name__ = metric_b.__qualname__ = "metric_a"  # the same name, other source
    try:
        with pytest.raises(ValueError, match="metric changed .*source of .*metric_a.* differs"):
            _resume(tiny_model, tokens, mask, run, steps=4, objective=metric_b)
    finally:
        metric_b.__name__ = metric_b.__qualname__ = "metric_b"
    assert snapshot(run) == before
    _resume(tiny_model, tokens, mask, run, steps=4, objective=metric_a)  # the same one: fine
    assert status_of(run) == {"state": "completed", "step": 4, "message": ""}


def test_a_lambda_metric_resumes_from_another_line(tiny_model, data, intact, tmp_path):
    tokens, mask = data
    run = tmp_path / "run"
    # the lambda's line holds other arguments (steps) that differ between the calls
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, run_dir=run, **FIT,
            objective=lambda lg, b: lg[:, -1, 3].mean(), steps=2)  # fmt: skip
    _resume(tiny_model, tokens, mask, run, objective=lambda lg, b: lg[:, -1, 3].mean(), steps=4)
    with pytest.raises(ValueError, match="metric changed"):
        _resume(tiny_model, tokens, mask, run, objective=lambda lg, b: lg[:, -1, 4].mean(), steps=6)


def test_a_metric_without_source_resumes_with_a_warning(tiny_model, data, intact, tmp_path):
    namespace: dict = {}
    exec("def metric(lg, b):\n    return lg[:, -1, 3].mean()\n", namespace)  # no source file
    tokens, mask = data
    run = tmp_path / "run"
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, objective=namespace["metric"], steps=2,
            run_dir=run, **FIT)  # fmt: skip
    assert read_json(run / "config.json")["data"]["metric"]["source_sha256"] is None
    with pytest.warns(UserWarning, match="source of the metric .* is not available"):
        _resume(tiny_model, tokens, mask, run, steps=4, objective=namespace["metric"])
    assert status_of(run)["state"] == "completed"


def test_a_run_written_before_the_data_hash_resumes_with_a_warning(
    tiny_model, data, intact, run_copy
):
    config = read_json(run_copy / "config.json")
    del config["data"]
    write_json(run_copy / "config.json", config)
    tokens, mask = data
    with pytest.warns(UserWarning, match="written before tl-noise recorded its data"):
        _resume(tiny_model, tokens, mask, run_copy, steps=6)
    assert status_of(run_copy)["state"] == "completed"
    assert "data" in read_json(run_copy / "config.json")  # checked from now on


# -------------------------------------------------- 3. fewer steps, completed runs, extending
def test_resume_with_fewer_steps_than_done_is_refused(tiny_model, data, intact, run_copy):
    tokens, mask = data
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="steps=3 is fewer than the 4 steps the run"):
        _resume(tiny_model, tokens, mask, run_copy, steps=3)
    assert snapshot(run_copy) == before


def test_resuming_a_completed_run_with_its_steps_does_nothing(tiny_model, data, intact, run_copy):
    tokens, mask = data
    before = snapshot(run_copy)
    final = read_tensors(run_copy / "final" / "noise_state.safetensors")
    with attach(tiny_model, tokens) as noise:
        with pytest.warns(UserWarning, match="already completed its 4 steps"):
            result = fit(tiny_model, noise, tokens, loss_mask=mask, steps=4, run_dir=run_copy,
                         resume=True, **FIT)  # fmt: skip
        state = noise.state_dict()
        for key, value in final.items():  # the noise is the run's final noise
            assert torch.equal(bits(state[key]), bits(value)), key
    assert snapshot(run_copy) == before
    assert [r["step"] for r in result.history] == [0, 1, 2, 3]
    assert result.run_dir == run_copy and result.extra["already_completed"]
    loaded = NoiseHooks.load(run_copy / "final", tiny_model, attach=False)
    for name, std in loaded.stds().items():
        assert torch.equal(result.stds[name], std)


def test_extending_a_completed_run_keeps_its_files_consistent(tiny_model, data, intact, tmp_path):
    tokens, mask = data
    kw = {**FIT, "log_every": 3}
    short, extended, straight = tmp_path / "short", tmp_path / "extended", tmp_path / "straight"
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=5, run_dir=short, **kw)
    assert [r["step"] for r in read_history(short)] == [0, 3, 4]  # 4: the last step
    extended.mkdir()
    for name in os.listdir(short):
        os.rename(short / name, extended / name)
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=8, run_dir=extended, resume=True,
            **kw)  # fmt: skip
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=8, run_dir=straight, **kw)
    history = read_history(extended)
    assert history == read_history(straight)  # no extra record of the old last step
    assert [r["step"] for r in history] == [0, 3, 6, 7]
    summary = read_json(extended / "summary.json")
    assert summary["steps_done"] == 8 and summary["final_loss"] == history[-1]["loss"]
    assert status_of(extended) == {"state": "completed", "step": 8, "message": ""}
    final = read_tensors(extended / "final" / "noise_state.safetensors")
    expected = read_tensors(straight / "final" / "noise_state.safetensors")
    for key in expected:
        assert torch.equal(bits(final[key]), bits(expected[key])), key


def test_resume_after_the_last_checkpoint_writes_final_and_summary(
    tiny_model, data, intact, run_copy
):
    # killed between the last checkpoint and final/: nothing left to step, the summary is
    # still that of the whole run (its final loss is not null)
    shutil.rmtree(run_copy / "final")
    (run_copy / "summary.json").unlink()
    write_json(run_copy / "status.json", {"state": "running", "step": 4, "message": ""})
    tokens, mask = data
    _resume(tiny_model, tokens, mask, run_copy, steps=4)
    summary = read_json(run_copy / "summary.json")
    assert summary["final_loss"] == read_history(run_copy)[-1]["loss"]
    assert summary["steps_done"] == 4 and (run_copy / "final" / "noise_state.safetensors").exists()
    assert status_of(run_copy)["state"] == "completed"


# ------------------------------------------------ 5. a run that failed before its checkpoint
def _inf_metric(logits, batch):
    return logits[:, -1, 3].mean() * INF


def test_a_run_that_failed_before_its_first_checkpoint_starts_over(
    tiny_model, data, intact, tmp_path
):
    tokens, mask = data
    run = tmp_path / "run"
    kw = {**FIT, "checkpoint_every": 50}
    with attach(tiny_model, tokens) as noise:
        with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
            fit(tiny_model, noise, tokens, loss_mask=mask, objective=_inf_metric, steps=4,
                run_dir=run, **kw)  # fmt: skip
    assert status_of(run)["state"] == "failed" and latest_checkpoint(run) is None
    with attach(tiny_model, tokens) as noise:
        with pytest.warns(UserWarning, match="starting the run in .* over .*status failed"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=4, run_dir=run, **kw)
    assert status_of(run)["state"] == "completed"
    assert read_json(run / "config.json")["fit"]["objective"] == "kl"
    assert [r["step"] for r in read_history(run)] == [0, 1, 2, 3]


def test_overwrite_replaces_a_completed_run(tiny_model, data, intact, run_copy):
    tokens, mask = data
    (run_copy / "notes.txt").write_text("mine\n")
    with attach(tiny_model, tokens) as noise:
        with pytest.raises(ValueError, match="already holds a run; .*overwrite=True"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, run_dir=run_copy, **FIT)
        with pytest.warns(UserWarning, match="over \\(overwrite=True\\)"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, run_dir=run_copy,
                overwrite=True, **FIT)  # fmt: skip
    assert read_json(run_copy / "config.json")["fit"]["steps"] == 2
    assert [r["step"] for r in read_history(run_copy)] == [0, 1]
    assert latest_checkpoint(run_copy)[0] == 2
    assert not (run_copy / "checkpoints" / "step_0000004").exists()
    assert (run_copy / "notes.txt").read_text() == "mine\n"  # not a file of the run: kept
    with attach(tiny_model, tokens) as noise:
        state = noise_state(noise)
        with pytest.raises(ValueError, match="contradict"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, run_dir=run_copy,
                overwrite=True, resume=True, **FIT)  # fmt: skip
        assert_same_state(noise_state(noise), state)


def test_empty_run_dir_is_refused(tiny_model, data, intact, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        with pytest.raises(ValueError, match="run_dir=''"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, run_dir="", **FIT)
    assert list(tmp_path.iterdir()) == []
