"""Fitting noise on real models: modes, objectives, run directory, resume, failures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import HOOKS

import tl_noise as tn
from tl_noise.fitting import fit
from tl_noise.runs import latest_checkpoint, read_history

pytestmark = pytest.mark.tl3


def fresh_noise(model, tokens, **kw):
    return tn.attach_noise(model, HOOKS, granularity="head", calibration_tokens=tokens, **kw)


def test_fit_trains_only_noise_and_leaves_model_exact(tiny_model, data):
    tokens, mask = data
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with fresh_noise(tiny_model, tokens) as noise:
        start = {k: v.clone() for k, v in noise.stds().items()}
        result = fit(
            tiny_model, noise, tokens, loss_mask=mask, steps=15, lr=0.1, batch_size=8, quiet=True
        )
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert set(result.stds) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}
    assert any(not torch.allclose(result.stds[k], start[k]) for k in start)
    assert len(result.history) == 15 and result.importance.shape == (2, 4)
    # the first step's noise loss is -log(mean std) of the initial stds
    initial = torch.cat([s.reshape(-1) for s in start.values()])
    assert result.history[0]["loss"]["noise"] == pytest.approx(-math.log(initial.mean()), rel=1e-5)


def test_alphaless_step_equals_composite_with_equivalent_alpha(tiny_model, data):
    tokens, mask = data
    with fresh_noise(tiny_model, tokens) as noise:
        init = {k: v.clone() for k, v in noise.state_dict().items()}
        r1 = fit(tiny_model, noise, tokens, loss_mask=mask, steps=1, lr=0.01, quiet=True)
        after_alphaless = {k: v.clone() for k, v in noise.state_dict().items()}
        alpha = r1.history[0]["equivalent"]["alpha"]
        assert 0 <= alpha <= 1  # typical: the gradients do not point in opposite directions
        noise.load_state_dict(init)
        fit(
            tiny_model,
            noise,
            tokens,
            loss_mask=mask,
            steps=1,
            lr=0.01,
            mode="composite",
            alpha=alpha,
            quiet=True,
        )
        # Adam's first step is invariant to the positive scale factor
        for k, v in noise.state_dict().items():
            torch.testing.assert_close(v, after_alphaless[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["kl", "ce"])
@pytest.mark.parametrize("mode", ["alphaless", "composite", "budget"])
def test_every_objective_and_mode_runs(tiny_model, data, objective, mode):
    tokens, mask = data
    with fresh_noise(tiny_model, tokens) as noise:
        r = fit(
            tiny_model,
            noise,
            tokens,
            loss_mask=mask,
            objective=objective,
            mode=mode,
            alpha=0.3,
            budget=0.05,
            steps=4,
            batch_size=8,
            quiet=True,
        )
    assert all(math.isfinite(h["loss"]["task"]) for h in r.history)
    assert r.history[-1]["mean_std"] > 0


def test_callable_metric_objective(tiny_model, data):
    tokens, mask = data
    seen = {}

    def metric(logits, batch):
        seen["keys"] = set(batch)
        return logits[:, -1, 0].mean()

    with fresh_noise(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, loss_mask=mask, objective=metric, steps=2, quiet=True)
    assert {"tokens", "loss_mask", "index"} <= seen["keys"]


def test_noise_grows_when_task_ignores_it(tiny_model, data):
    tokens, mask = data
    with fresh_noise(tiny_model, tokens, form="additive") as noise:  # stds may exceed 1
        r = fit(
            tiny_model,
            noise,
            tokens,
            loss_mask=mask,
            objective=lambda lg, b: lg.sum() * 0,
            steps=30,
            lr=0.2,
            quiet=True,
        )
    assert all((s > 1.0).all() for s in r.stds.values())


def test_run_directory_and_history(tiny_model, data, tmp_path):
    tokens, mask = data
    with fresh_noise(tiny_model, tokens) as noise:
        r = fit(
            tiny_model,
            noise,
            tokens,
            loss_mask=mask,
            steps=10,
            batch_size=8,
            quiet=True,
            run_dir=tmp_path / "run",
            checkpoint_every=4,
        )
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["mode"] == "alphaless"
    assert config["hooks"] == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert config["fit"]["seed"] == 0 and "torch" in config["versions"]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    history = read_history(run)
    assert [h["step"] for h in history] == list(range(10))
    grad = history[3]["grad"]["blocks.1.attn.hook_z"]
    for key in ("noise_norm", "task_norm", "cosine", "projected", "alpha", "scale"):
        assert len(grad[key]) == 4
    assert latest_checkpoint(run)[0] == 10
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_0000004",
        "step_0000008",
        "step_0000010",
    ]
    loaded = tn.NoiseHooks.load(run / "final", tiny_model, attach=False)
    for name, std in loaded.stds().items():
        torch.testing.assert_close(std, r.stds[name])
    with pytest.raises(ValueError, match="already holds a run"):
        with fresh_noise(tiny_model, tokens) as noise:
            fit(tiny_model, noise, tokens, steps=1, quiet=True, run_dir=run)


def test_resume_equals_uninterrupted_run(tiny_model, data, tmp_path):
    tokens, mask = data
    kwargs = dict(loss_mask=mask, batch_size=8, lr=0.05, quiet=True, checkpoint_every=5, seed=3)
    with fresh_noise(tiny_model, tokens) as noise:
        full = fit(tiny_model, noise, tokens, steps=12, run_dir=tmp_path / "a", **kwargs)
    with fresh_noise(tiny_model, tokens) as noise:
        fit(tiny_model, noise, tokens, steps=5, run_dir=tmp_path / "b", **kwargs)
    with fresh_noise(tiny_model, tokens) as noise:  # a fresh process would start like this
        resumed = fit(
            tiny_model, noise, tokens, steps=12, run_dir=tmp_path / "b", resume=True, **kwargs
        )
    for name in full.stds:
        torch.testing.assert_close(resumed.stds[name], full.stds[name], rtol=1e-6, atol=1e-7)
    steps = [h["step"] for h in read_history(tmp_path / "b")]
    assert steps == list(range(12))
    with pytest.raises(ValueError, match="different config: lr"):
        with fresh_noise(tiny_model, tokens) as noise:
            fit(
                tiny_model,
                noise,
                tokens,
                steps=12,
                run_dir=tmp_path / "b",
                resume=True,
                **{**kwargs, "lr": 0.5},
            )


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_model, data, tmp_path):
    tokens, mask = data
    calls = {"n": 0}

    def metric(logits, batch):
        calls["n"] += 1  # the first call is fit's check of what the metric returns
        return logits.mean() * (float("nan") if calls["n"] > 7 else 1.0)

    with fresh_noise(tiny_model, tokens) as noise:
        with pytest.raises(FloatingPointError, match="non-finite loss at step 6"):
            fit(
                tiny_model,
                noise,
                tokens,
                objective=metric,
                steps=20,
                quiet=True,
                run_dir=tmp_path / "r",
                checkpoint_every=5,
            )
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "failed" and "checkpoint" in status["message"]
    assert latest_checkpoint(tmp_path / "r")[0] == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"mode": "composite", "alpha": 1.5}, "alpha=1.5"),
        ({"mode": "budget"}, "budget=None"),
        ({"mode": "fast"}, "mode='fast'"),
        ({"objective": "mse"}, "objective='mse'"),
        ({"objective": "metric"}, "needs a metric"),
    ],
)
def test_bad_arguments(tiny_model, data, kwargs, match):
    tokens, mask = data
    with fresh_noise(tiny_model, tokens) as noise:
        with pytest.raises(ValueError, match=match):
            fit(tiny_model, noise, tokens, quiet=True, **kwargs)


def test_bad_data(tiny_model, data):
    tokens, mask = data
    with fresh_noise(tiny_model, tokens) as noise:
        with pytest.raises(ValueError, match=r"\[0, 49\].*found"):
            fit(tiny_model, noise, tokens + 100, quiet=True)
        with pytest.raises(ValueError, match="selects no position"):
            fit(tiny_model, noise, tokens, loss_mask=torch.zeros_like(mask), quiet=True)
        with pytest.raises(ValueError, match="empty"):
            fit(tiny_model, noise, tokens[:0], quiet=True)
        with pytest.raises(TypeError, match="int tensor"):
            fit(tiny_model, noise, tokens.float(), quiet=True)
