"""The tl-noise command line, run as a user runs it (the installed console script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "tl-noise")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TL_NOISE_NO_APP": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("command", ["demo", "fit", "show", "app"])
def test_help(command):
    out = run(command, "--help").stdout
    assert "usage: tl-noise " + command in out


@pytest.mark.slow
def test_demo_ranks_the_embedded_circuit(tmp_path):
    proc = run("demo", "--model", "induction", "--no-app", "--steps", "150", "--run-dir",
               str(tmp_path / "demo"), "--quiet")  # fmt: skip
    out = proc.stdout
    assert "tl-noise" in out and "mean ablation" in out and "attribution patching (TL)" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    truth = {tuple(h) for heads in config["model"]["ground_truth"].values() for h in heads}
    top = {(r["layer"], r["head"]) for r in summary["ranking"][: len(truth)]}
    assert top == truth  # the fitted and refined ranking puts exactly the circuit heads on top
    show = run("show", str(tmp_path / "demo")).stdout
    assert "L" in show and "std" in show


@pytest.mark.slow
def test_demo_on_the_backup_model_prints_the_exact_comparison(tmp_path):
    proc = run("demo", "--no-app", "--steps", "60", "--run-dir", str(tmp_path / "demo"),
               "--quiet")  # fmt: skip
    assert "best ranking (exact)" in proc.stdout and "k90*" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert len(summary["node_importance"]) == 15  # 3 layers x (4 heads + MLP)


@pytest.mark.slow
def test_fit_on_a_local_checkpoint_with_ioi(gpt2_checkpoint, tmp_path):
    run(
        "fit",
        gpt2_checkpoint,
        "--task",
        "ioi",
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--n-examples",
        "16",
        "--run-dir",
        str(tmp_path / "ioi"),
        "--quiet",
    )
    status = json.loads((tmp_path / "ioi" / "status.json").read_text())
    assert status["state"] == "completed"


def test_errors_are_messages_not_tracebacks(tmp_path):
    proc = run("show", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("fit", "induction-2l", "--steps", "0", "--run-dir", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "steps=0" in proc.stderr
