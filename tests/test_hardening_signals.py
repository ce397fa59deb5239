"""Hardening against signals (issue 12): SIGTERM stops a fit like Ctrl-C (status "interrupted"),
a second interrupt during a write leaves neither a stale status nor a stray temporary file, and
``tl-noise app`` takes its Streamlit server down on SIGTERM/SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BAD_INPUT_FIT as FIT
from conftest import attach

import tl_noise.io as tio
from tl_noise.fitting import Callback, fit
from tl_noise.runs import latest_checkpoint

pytestmark = pytest.mark.tl3

HELPER = Path(__file__).parent / "helpers" / "kill_fit.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def stray_temporaries(run: Path) -> list[str]:
    return [str(p) for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------ 7b. SIGTERM, fits
@pytest.mark.slow
def test_sigterm_during_a_fit_says_interrupted_and_resumes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), str(run), "40", "--delay", "0.05"],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: latest_checkpoint(run) is not None, 300, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted", (status, err)
    assert "SIGTERM" in status["message"]
    assert not stray_temporaries(run)
    assert not (run / ".lock").exists()
    done = subprocess.run(
        [sys.executable, str(HELPER), str(run), "40", "--resume"], env=ENV, timeout=600
    )
    assert done.returncode == 0
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


class InterruptAt(Callback):
    """Ctrl-C at the end of step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step, record):
        if step == self.step:
            raise KeyboardInterrupt


def test_a_second_ctrl_c_while_the_status_is_written(
    tiny_model, data, intact, tmp_path, monkeypatch
):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as usual
    real = tio._write_all
    fired = []

    def write(fd, data, path):
        if Path(path).name == "status.json" and b"interrupted" in data and not fired:
            fired.append(1)
            real(fd, data[: len(data) // 2], path)
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, half-way through
            time.sleep(0.05)
            real(fd, data[len(data) // 2 :], path)
            return
        real(fd, data, path)

    monkeypatch.setattr(tio, "_write_all", write)
    tokens, mask = data
    run = tmp_path / "run"
    try:
        with attach(tiny_model, tokens) as noise:
            with pytest.raises(KeyboardInterrupt):
                fit(tiny_model, noise, tokens, loss_mask=mask, steps=6, run_dir=run,
                    callbacks=[InterruptAt(2)], **FIT)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fired
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 2
    assert not stray_temporaries(run)
    assert not (run / ".lock").exists()


def test_sigterm_handler_is_restored_after_a_fit(tiny_model, data, intact):
    before = signal.getsignal(signal.SIGTERM)
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=1, quiet=True, refine_window=0)
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------- 7a. tl-noise app
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_app_stops_its_server_on(sig, tmp_path):
    pytest.importorskip("streamlit")
    port = free_port()
    exe = Path(sys.executable).parent / "tl-noise"
    proc = subprocess.Popen([str(exe), "app", str(tmp_path), "--port", str(port)], env=ENV)
    servers: list[int] = []
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 180, "the dashboard")
        assert proc.poll() is None
        servers.extend(children(proc.pid))
        assert servers
        proc.send_signal(getattr(signal, sig))
        wait_for(lambda: not port_open(port), 10, "the port to close")
        proc.wait(timeout=10)
        assert proc.returncode == 0
        wait_for(lambda: not any(alive(p) for p in servers), 10, "the server to exit")
    finally:
        for pid in [*servers, *children(proc.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)  # a server left behind (the bug) goes too
        proc.kill()
