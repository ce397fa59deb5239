"""Bounded history growth (issue 12, item 7): full records (every std, per-head gradients) one in
``detail_every``, summaries between them, numbers written short, a cadence chosen so a step writes
at most 16 KiB on average, and readers (the run reader, the dashboard) that follow both kinds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BAD_INPUT_FIT, attach
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_noise as tn
from tl_noise.fitting import fit
from tl_noise.fitting.records import (
    DETAIL_BYTES_PER_STEP,
    SUMMARY_BYTES,
    detail_interval,
    full_record_numbers,
    round_numbers,
)
from tl_noise.io import MAX_HISTORY_BYTES
from tl_noise.runs import Run, read_history
from tl_noise.runs.writer import last_history_record

pytestmark = pytest.mark.tl3

FIT = {k: v for k, v in BAD_INPUT_FIT.items() if k != "checkpoint_every"}


def fitted_run(model, data, run: Path, steps: int = 10, **kw) -> Path:
    tokens, mask = data
    with attach(model, tokens) as noise:
        fit(model, noise, tokens, loss_mask=mask, steps=steps, run_dir=run,
            checkpoint_every=4, stable_window=0, refine_window=0, **FIT, **kw)  # fmt: skip
    return run


def test_summaries_between_full_records(tiny_model, data, tmp_path, intact):
    run = fitted_run(tiny_model, data, tmp_path / "run", steps=10, detail_every=3)
    records = read_history(run)
    assert [r["step"] for r in records] == list(range(10))
    full = [r["step"] for r in records if "std" in r]
    assert full == [0, 3, 6, 9]  # one in three, and the last
    for r in records:
        assert ("grad" in r) == ("std" in r)
        assert {"loss", "mean_std", "equivalent"} <= set(r)
        size = len(json.dumps(r, separators=(",", ":")))
        assert size <= SUMMARY_BYTES or "std" in r
    reader = Run(run)
    assert reader.full_steps() == full and reader.steps() == list(range(10))
    assert len(reader.loss_frame()) == 10  # losses at every step
    assert sorted(reader.history_frame()["step"].unique()) == full
    assert reader.grad_hook_kinds() == ["attn.hook_z"]  # from the last full record
    # the final stds come from final/, equal to the last full record to 7 digits
    last = reader.stds_at(9)
    for name, std in reader.final_stds().items():
        assert torch.allclose(std, last[name], rtol=1e-6)


def test_resume_keeps_the_cadence(tiny_model, data, tmp_path, intact):
    """A killed-and-resumed run writes the same full/summary pattern as an uninterrupted one."""
    whole = fitted_run(tiny_model, data, tmp_path / "whole", steps=10, detail_every=3)
    part = fitted_run(tiny_model, data, tmp_path / "part", steps=4, detail_every=3)
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=10, run_dir=part, resume=True,
            checkpoint_every=4, stable_window=0, refine_window=0, detail_every=3,
            **FIT)  # fmt: skip
    pattern = [[r["step"], "std" in r] for r in read_history(whole)]
    # the short run's last step (3) was full because it was last; extended, it is full anyway
    assert [[r["step"], "std" in r] for r in read_history(part)] == pattern


def test_automatic_cadence_bounds_bytes_per_step(make_model, tmp_path):
    """Per-feature noise on a wide residual stream: a full record is ~10x the per-step budget,
    so the automatic cadence writes summaries and stays inside the budget."""
    model = make_model(d_model=1024, n_layers=2, n_heads=4, d_head=256, d_mlp=64, n_ctx=12)
    tokens = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_resid_pre"]
    with tn.attach_noise(model, hooks, calibration_tokens=tokens, granularity="feature") as noise:
        numbers = full_record_numbers(noise)
        every = detail_interval(noise, 40, 1, 0)
        assert numbers * 8 > DETAIL_BYTES_PER_STEP and every > 1
        fit(model, noise, tokens, steps=40, run_dir=tmp_path / "run", batch_size=8,
            stable_window=0, refine_window=0, quiet=True)  # fmt: skip
    size = (tmp_path / "run" / "history.jsonl").stat().st_size
    assert size / 40 <= DETAIL_BYTES_PER_STEP
    records = read_history(tmp_path / "run")
    assert sum("std" in r for r in records) == len(range(0, 40, every)) + (39 % every != 0)


def test_cadence_keeps_a_long_fit_under_the_readers_limit(tiny_model, tokens):
    with attach(tiny_model, tokens) as noise:
        numbers = full_record_numbers(noise)
        assert detail_interval(noise, 500, 1, 0) == 1  # small: every record full
        steps = 2_000_000  # room per record < a full record: widen the cadence
        every = detail_interval(noise, steps, 1, 0)
        full = numbers * 16 + SUMMARY_BYTES
        projected = (steps + 1) * SUMMARY_BYTES + (steps // every + 1) * full
        assert every > 1 and projected <= MAX_HISTORY_BYTES
        assert detail_interval(noise, steps, 1, 7) == 7  # given: taken as is
        with pytest.raises(ValueError, match=r"steps=100000000 with log_every=1 .* log_every"):
            detail_interval(noise, 100_000_000, 1, 0)


def test_impossible_history_fails_before_anything_is_written(tiny_model, data, tmp_path, intact):
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        with pytest.raises(ValueError, match="log_every"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=100_000_000,
                run_dir=tmp_path / "run", quiet=True)  # fmt: skip
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_detail_every_is_validated(tiny_model, data, tmp_path):
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        with pytest.raises(ValueError, match=r"detail_every=-1; expected an int >= 0"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, detail_every=-1, quiet=True)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_rounded_numbers_are_short_and_close(x):
    (y,) = round_numbers(np.array([x], dtype=np.float32)).tolist()
    assert math.isclose(y, x, rel_tol=5e-7)
    if x == 0 or not 1e-15 <= abs(x) < 1e15:  # near the exact powers of ten's end: not shorter
        return
    mantissa = repr(y).lstrip("-").split("e")[0].replace(".", "").strip("0")
    assert len(mantissa) <= 7, repr(y)


def test_rounding_keeps_non_finite_values():
    out = round_numbers(np.array([np.inf, -np.inf, np.nan, 0.0], dtype=np.float32))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2]) and out[3] == 0


def test_last_record_is_read_from_the_end(tmp_path):
    file = tmp_path / "history.jsonl"
    assert last_history_record(file) == []
    lines = [json.dumps({"step": i, "pad": "x" * 300}) for i in range(1000)]
    file.write_text("\n".join(lines) + "\n" + '{"step": 1000, "lo')  # a partial last line
    assert last_history_record(file, chunk=512) == [json.loads(lines[-1])]
    file.write_text("not json\n")
    assert last_history_record(file) == []


def test_resume_of_a_run_written_before_detail_every(tiny_model, data, tmp_path, intact):
    run = fitted_run(tiny_model, data, tmp_path / "run", steps=4)
    config = json.loads((run / "config.json").read_text())
    del config["fit"]["detail_every"]  # as an older tl-noise wrote it
    (run / "config.json").write_text(json.dumps(config))
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=6, run_dir=run, resume=True,
            checkpoint_every=4, stable_window=0, refine_window=0, **FIT)  # fmt: skip
    assert [r["step"] for r in read_history(run)] == list(range(6))
