"""Bad input from the disk: a full disk while saving noise, a checkpoint or the history.

A full disk is simulated by replacing ``tl_noise.io._write_all``, the one low-level write every
file goes through, with one that writes half of the data and raises ``OSError(ENOSPC)``.
What existed before is kept (contract and fixtures: ``tests/conftest.py``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import pytest
from conftest import BAD_INPUT_FIT as FIT
from conftest import (
    CONFIG,
    STATE,
    assert_same_state,
    attach,
    fit_bad_input_run,
    snapshot,
)

import tl_noise.io as tio
from tl_noise.fitting import fit
from tl_noise.hooks import NoiseHooks
from tl_noise.runs import latest_checkpoint, read_history

pytestmark = pytest.mark.tl3


@pytest.fixture(scope="module")
def uninterrupted_8(tiny_model, data, tmp_path_factory):
    """The run of ``base_run`` fitted for 8 steps in one go: its final noise state."""
    run = fit_bad_input_run(tiny_model, data, tmp_path_factory.mktemp("runs") / "full", 8)
    return tio.read_tensors(run / "final" / STATE)


class FullDisk:
    """Makes every write to a path containing ``match`` fail half-way with ENOSPC."""

    def __init__(self, monkeypatch):
        self.match: str | None = None
        self.skip = 0
        self.failed: list[str] = []
        real = tio._write_all

        def write(fd, data, path):
            if self.match is not None and self.match in str(path):
                if self.skip == 0:
                    self.failed.append(str(path))
                    os.write(fd, data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.skip -= 1
            real(fd, data, path)

        monkeypatch.setattr(tio, "_write_all", write)

    def fill(self, match: str, skip: int = 0) -> None:
        self.match, self.skip = match, skip

    def free(self) -> None:
        self.match = None


@pytest.fixture()
def disk(monkeypatch):
    return FullDisk(monkeypatch)


ENOSPC = re.escape(os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------ a full disk
@pytest.mark.parametrize("failing", [STATE, CONFIG])
def test_full_disk_while_saving_over_saved_noise(
    failing, tiny_model, data, intact, saved_noise, disk, tmp_path
):
    path = tmp_path / "noise"
    shutil.copytree(saved_noise, path)
    before = snapshot(path)
    disk.fill(failing)
    with attach(tiny_model, data[0]) as noise:
        with pytest.raises(OSError, match=f"{re.escape(failing)}'.*{ENOSPC}") as info:
            noise.save(path)
    assert info.value.errno == errno.ENOSPC and disk.failed
    assert snapshot(path) == before  # no temporary file left either
    disk.free()
    NoiseHooks.load(path, tiny_model).remove()


def test_full_disk_during_a_checkpoint_then_resume(
    tiny_model, data, intact, run_copy, disk, uninterrupted_8
):
    tokens, mask = data
    kept = {p: snapshot(run_copy / p) for p in ("checkpoints", "final")}
    history = (run_copy / "history.jsonl").read_bytes()
    disk.fill("step_0000006")
    with attach(tiny_model, tokens) as noise:
        with pytest.raises(OSError, match=f"step_0000006/{STATE}'.*{ENOSPC}"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy, resume=True,
                **FIT)  # fmt: skip
    assert disk.failed and all("step_0000006" in p for p in disk.failed)
    now = snapshot(run_copy / "checkpoints")
    assert {k: v for k, v in now.items() if not k.startswith(".tmp_")} == kept["checkpoints"]
    assert snapshot(run_copy / "final") == kept["final"]
    assert latest_checkpoint(run_copy)[0] == 4
    lines = (run_copy / "history.jsonl").read_bytes()
    assert lines.startswith(history)
    assert [json.loads(x)["step"] for x in lines.splitlines()] == list(range(6))

    disk.free()  # space again: the run resumes past the stray .tmp_step_0000006 folder
    with attach(tiny_model, tokens) as noise:
        fit(
            tiny_model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy, resume=True, **FIT
        )
    assert_same_state(tio.read_tensors(run_copy / "final" / STATE), uninterrupted_8)
    assert [r["step"] for r in read_history(run_copy)] == list(range(8))


def test_full_disk_while_appending_history(tiny_model, data, intact, run_copy, disk):
    tokens, mask = data
    history = (run_copy / "history.jsonl").read_bytes()
    checkpoints = snapshot(run_copy / "checkpoints")
    disk.fill("history.jsonl", skip=1)  # the resume's own rewrite succeeds; the append fails
    with attach(tiny_model, tokens) as noise:
        with pytest.raises(OSError, match=f"history.jsonl'.*{ENOSPC}"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=8, run_dir=run_copy, resume=True,
                **FIT)  # fmt: skip
    assert (run_copy / "history.jsonl").read_bytes() == history  # the half line was cut off
    assert snapshot(run_copy / "checkpoints") == checkpoints
