"""Bad input to ``fit``: arguments, data, models, devices; NaN and inf on the way.

A failed fit names the bad value or the step, keeps the noise state it was given (or the state of
the last finite step) and leaves the model intact (contract and fixtures: ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import (
    HOOKS,
    INF,
    NAN,
    assert_model_intact,
    assert_same_state,
    attach,
    embedding_weight,
    logits_of,
    noise_state,
    snapshot,
)

import tl_noise as tn
from tl_noise.fitting import fit
from tl_noise.fitting.trainer import batch_indices
from tl_noise.runs import latest_checkpoint, read_history

pytestmark = pytest.mark.tl3


# -------------------------------------------------------------------------- fit: bad arguments
FIT_ARG_CASES = {
    "steps-zero": ({"steps": 0}, "steps=0"),
    "steps-negative": ({"steps": -3}, "steps=-3"),
    "steps-fractional": ({"steps": 2.5}, "steps=2.5"),
    "steps-bool": ({"steps": True}, "steps=True"),
    "lr-zero": ({"lr": 0}, "lr=0"),
    "lr-negative": ({"lr": -1.0}, "lr=-1.0"),
    "lr-nan": ({"lr": NAN}, "lr=nan"),
    "lr-inf": ({"lr": INF}, "lr=inf"),
    "batch-size-zero": ({"batch_size": 0}, "batch_size=0"),
    "batch-size-negative": ({"batch_size": -4}, "batch_size=-4"),
    "checkpoint-every-zero": ({"checkpoint_every": 0}, "checkpoint_every=0"),
    "alpha-above-one": ({"mode": "composite", "alpha": 1.5}, r"alpha=1.5; .*\[0, 1\]"),
    "alpha-negative": ({"mode": "composite", "alpha": -0.1}, r"alpha=-0.1; .*\[0, 1\]"),
    "alpha-nan": ({"mode": "composite", "alpha": NAN}, "alpha=nan"),
    "budget-negative": ({"mode": "budget", "budget": -1.0}, "budget=-1.0"),
    "budget-lr-nan": ({"mode": "budget", "budget": 0.1, "budget_lr": NAN}, "budget_lr=nan"),
    "unknown-mode": ({"mode": "fast"}, "mode='fast'"),
    "unknown-objective": ({"objective": "mse"}, "objective='mse'"),
    "unknown-noise-loss": ({"noise_loss_kind": "l2"}, "noise_loss_kind='l2'"),
    "resume-without-run-dir": ({"resume": True}, "resume=True needs run_dir"),
    "run-dir-empty": ({"run_dir": ""}, "run_dir=''; pass a directory path"),
}


@pytest.mark.parametrize("case", list(FIT_ARG_CASES))
def test_fit_rejects_argument(case, tiny_model, data, intact):
    kwargs, match = FIT_ARG_CASES[case]
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        before = noise_state(noise)
        with pytest.raises(ValueError, match=match):
            fit(tiny_model, noise, tokens, loss_mask=mask, quiet=True, **kwargs)
        assert_same_state(noise_state(noise), before)
        assert noise.attached


def _tokens_with(value):
    def make(tokens):
        bad = tokens.clone()
        bad[5, 7] = value
        return bad

    return make


FIT_DATA_CASES = {
    "tokens-outside-vocabulary": (
        _tokens_with(50),
        None,
        ValueError,
        re.escape("tokens must lie in [0, 49] (d_vocab=50); found [0, 50]"),
    ),
    "tokens-negative": (_tokens_with(-1), None, ValueError, re.escape("found [-1, 49]")),
    "no-examples": (lambda t: t[:0], None, ValueError, re.escape("shape [0, 12]: the dataset")),
    "no-positions": (lambda t: t[:, :0], None, ValueError, re.escape("shape [24, 0]: the data")),
    "tokens-float": (lambda t: t.float(), None, TypeError, "dtype torch.float32"),
    "tokens-int8": (lambda t: t.to(torch.int8), None, TypeError, "dtype torch.int8; use .long"),
    "tokens-int16": (lambda t: t.to(torch.int16), None, TypeError, "dtype torch.int16"),
    "tokens-uint8": (lambda t: t.to(torch.uint8), None, TypeError, "dtype torch.uint8"),
    "tokens-bool": (lambda t: t > 20, None, TypeError, "dtype torch.bool"),
    "tokens-one-dimensional": (lambda t: t[0], None, TypeError, re.escape("shape [12]")),
    "tokens-on-meta-device": (lambda t: t.to("meta"), None, ValueError, "meta device"),
    "tokens-a-list": (lambda t: t.tolist(), None, TypeError, "got list"),
    "mask-selects-nothing": (
        None,
        lambda m: torch.zeros_like(m),
        ValueError,
        "loss_mask selects no position",
    ),
    "mask-wrong-shape": (
        None,
        lambda m: m[:, :11],
        ValueError,
        re.escape("shape [24, 12], got torch.bool [24, 11]"),
    ),
    "mask-not-bool": (None, lambda m: m.long(), ValueError, "got torch.int64"),
    "mask-on-meta-device": (None, lambda m: m.to("meta"), ValueError, "loss_mask .*meta device"),
}


@pytest.mark.parametrize("case", list(FIT_DATA_CASES))
def test_fit_rejects_data(case, tiny_model, data, intact):
    make_tokens, make_mask, exc, match = FIT_DATA_CASES[case]
    tokens, mask = data
    bad_tokens = make_tokens(tokens) if make_tokens else tokens
    bad_mask = make_mask(mask) if make_mask else mask
    with attach(tiny_model, tokens) as noise:
        before = noise_state(noise)
        with pytest.raises(exc, match=match):
            fit(tiny_model, noise, bad_tokens, loss_mask=bad_mask, steps=2, quiet=True)
        assert_same_state(noise_state(noise), before)


METRIC_CASES = {
    # what the metric returns -> the error fit raises before it writes anything
    "non-scalar": (lambda lg, b: lg[:, -1, 3], ValueError, re.escape("shape [8]; expected a 0-d")),
    "no-grad": (lambda lg, b: lg[:, -1, 3].mean().detach(), ValueError, "does not require grad"),
    "a-float": (lambda lg, b: lg[:, -1, 3].mean().item(), TypeError, "returned float"),
    "none": (lambda lg, b: None, TypeError, "returned NoneType None"),
    "an-int-tensor": (lambda lg, b: lg.argmax(), TypeError, "returned a torch.int64 tensor"),
}


@pytest.mark.parametrize("case", list(METRIC_CASES))
def test_fit_rejects_a_bad_metric_before_writing(case, tiny_model, data, intact, tmp_path):
    metric, exc, match = METRIC_CASES[case]
    tokens, mask = data
    run = tmp_path / "run"
    with attach(tiny_model, tokens) as noise:
        before = noise_state(noise)
        with pytest.raises(exc, match=match):
            fit(tiny_model, noise, tokens, loss_mask=mask, objective=metric, steps=2,
                batch_size=8, run_dir=run, quiet=True)  # fmt: skip
        assert_same_state(noise_state(noise), before)
        assert noise.mode == "sample"
    assert not run.exists()  # nothing written: the same fit may run there once fixed


def test_fit_rejects_a_model_that_is_not_transformer_lens(tiny_model, data, intact):
    with attach(tiny_model, data[0]) as noise:
        with pytest.raises(TypeError, match="got Linear"):
            fit(torch.nn.Linear(2, 2), noise, data[0], quiet=True)
        with pytest.raises(TypeError, match="noise must be NoiseHooks.*got dict"):
            fit(tiny_model, {}, data[0], quiet=True)


def test_noise_on_another_device_than_its_hook(tiny_model, data, intact):
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        noise.to("meta")  # a device the activations are not on
        with pytest.raises(ValueError, match="is on meta but the activation there is on cpu"):
            tiny_model(tokens)
        with pytest.raises(ValueError, match="is on meta but the activation there is on cpu"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=1, quiet=True)


def test_float64_noise_on_a_float32_model_is_cast(tiny_model, data, intact):
    # a dtype mismatch between noise and activations is not an error: the noise is cast
    tokens = data[0]
    with attach(tiny_model, tokens, seed=1) as noise:
        expected = logits_of(tiny_model, tokens)
        noise.double()
        noise.manual_seed(1)
        out = logits_of(tiny_model, tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------ fit: NaN / inf on the way
def test_nan_embedding_stops_fit_at_the_step_and_keeps_last_good_checkpoint(
    make_model, data, tmp_path
):
    tokens, mask = data
    tokens = torch.where(tokens == 7, torch.full_like(tokens, 8), tokens)  # no token 7 yet
    first = {}  # example -> first step whose batch holds it
    for step in range(12):
        for e in batch_indices(24, 4, 0, step).tolist():
            first.setdefault(e, step)
    example = next(e for e in range(24) if 3 <= first.get(e, -1) <= 9)
    bad_step = first[example]
    poisoned_tokens = tokens.clone()
    poisoned_tokens[example, 2] = 7

    clean = make_model()
    poisoned = make_model()
    with torch.no_grad():
        embedding_weight(poisoned)[7] = NAN
    before = logits_of(poisoned, poisoned_tokens)
    kwargs = dict(loss_mask=mask, batch_size=4, seed=0, lr=0.05, checkpoint_every=2, quiet=True)

    with tn.attach_noise(poisoned, HOOKS, calibration_tokens=tokens) as noise:
        with pytest.raises(FloatingPointError, match=f"non-finite loss at step {bad_step} "):
            fit(poisoned, noise, poisoned_tokens, steps=12, run_dir=tmp_path / "bad", **kwargs)
        after_failure = noise_state(noise)
    assert_model_intact(poisoned, poisoned_tokens, before)

    # the reference: the clean model fitted for exactly the steps that succeeded
    with tn.attach_noise(clean, HOOKS, calibration_tokens=tokens) as noise:
        fit(clean, noise, poisoned_tokens, steps=bad_step, run_dir=tmp_path / "good", **kwargs)
        assert_same_state(after_failure, noise_state(noise))  # left at the last finite step

    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status["state"] == "failed" and f"step {bad_step}" in status["message"]
    assert "last good checkpoint is kept" in status["message"]
    last_good = bad_step // 2 * 2
    step, folder = latest_checkpoint(tmp_path / "bad")
    assert step == last_good
    assert snapshot(folder) == snapshot(tmp_path / "good" / "checkpoints" / folder.name)
    history = read_history(tmp_path / "bad")
    assert [r["step"] for r in history] == list(range(last_good))


def test_infinite_loss_names_the_step(tiny_model, data, intact):
    tokens, mask = data
    calls = []

    def metric(logits, batch):
        calls.append(1)  # the first call is fit's check of what the metric returns
        return logits[:, -1].mean() * 0 + (INF if len(calls) > 4 else 0.0)

    with attach(tiny_model, tokens) as noise:
        with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 \(task inf"):
            fit(tiny_model, noise, tokens, loss_mask=mask, objective=metric, steps=8, quiet=True)
        assert all(torch.isfinite(p).all() for p in noise.parameters())


def test_nan_noise_parameters_name_the_step(tiny_model, data, intact):
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        with torch.no_grad():
            noise.layer("blocks.1.attn.hook_z").rhos[2] = NAN
        with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0 .*noise nan"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=3, quiet=True)
