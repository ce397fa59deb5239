"""The performance benchmark runs and reports every ratio; the fast paths it measures are exact.

No timing is asserted anywhere: the machines running the tests are shared and noisy.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tl_noise as tn
from tl_noise.fitting import fit
from tl_noise.fitting.objectives import clean_distribution, kl_divergence, kl_divergence_from_probs

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "benchmarks" / "perf.py"  # shim of the benchmarks.perf package
# the ratios the benchmark must always report (None only with a note saying why)
REQUIRED = {
    "noised_forward/plain_forward",
    "fit_step/plain_forward",
    "naive_step/plain_forward",
    "alphaless_step/composite_step",
    "fit_peak_memory/forward_backward_peak_memory",
    "extra_hook_point/plain_forward",
    "fit_step/plain_forward per layer",
    "tl4/tl3 fit_step",
    "time_to_answer/activation_patching",
    "time_to_answer/attribution_patching",
}


def _bench(module: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module(f"benchmarks.perf.{module}")


@pytest.mark.slow
def test_quick_benchmark_writes_every_ratio(tmp_path, monkeypatch):
    out = tmp_path / "perf.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(PERF), "--quick", "--model", "tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = _bench("settings", monkeypatch)
    assert REQUIRED <= set(settings.RATIO_KEYS)
    assert set(report["ratios"]) == set(settings.RATIO_KEYS)
    assert set(report["met"]) == set(settings.TARGETS)
    for key, value in report["ratios"].items():
        if value is None:  # only a section that could not run here (no .venv-tl3...) says why
            assert settings.RATIO_SECTIONS[key] in report["notes"], key
        else:
            assert isinstance(value, float) and math.isfinite(value), key
    for key in ("noised_forward/plain_forward", "fit_step/plain_forward",
                "alphaless_step/composite_step", "naive_step/plain_forward",
                "extra_hook_point/plain_forward", "record/fit_step"):  # fmt: skip
        assert isinstance(report["ratios"][key], float), key
    assert report["machine"]["threads"] == 1
    for key in settings.TOKENS_PER_SECOND:
        assert report["seconds"][key] > 0 and report["tokens_per_second"][key] > 0
    assert report["scaling"]["hooks"] and report["logging"]["hook_z"]["record_seconds"] > 0
    assert report["logging"]["hook_z"]["checkpoint_tensors"] > 0  # Adam moments were saved
    for line in ("fit_step/plain_forward", "tl4/tl3 fit_step", "time_to_answer/"):
        assert line in proc.stdout  # the printed table


def test_step_timer_keeps_the_steps_without_a_record(tiny_model, monkeypatch):
    timing = _bench("timing", monkeypatch)
    tokens = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    clock = timing.StepTimer("cpu")
    with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", calibration_tokens=tokens) as noise:
        fit(tiny_model, noise, tokens, steps=6, batch_size=4, quiet=True, log_every=3,
            callbacks=[clock])  # fmt: skip
    assert [step for step, _, _ in clock.steps] == list(range(6))
    assert [logged for _, _, logged in clock.steps] == [True, False, False, True, False, True]
    assert len(clock.plain_steps()) == 3 and all(s > 0 for s in clock.plain_steps())
    assert clock.ends == sorted(clock.ends) and len(clock.ends) == 6


def test_paired_ratio_and_slope(monkeypatch):
    timing = _bench("timing", monkeypatch)
    samples = {"a": [[2.0, 2.2], [4.0]], "b": [[1.0], [1.0, 3.0]]}  # round 2 ran under load
    assert timing.paired_ratio(samples, "a", "b") == pytest.approx((2.1 / 1.0 + 4.0 / 2.0) / 2)
    assert timing.slope([1.0, 2.0, 4.0], [3.0, 5.0, 9.0]) == pytest.approx(2.0)
    assert math.isnan(timing.slope([2.0, 2.0], [1.0, 3.0]))
    assert timing.time_op(lambda: None, threads=1, min_run_time=0.01) >= 0


def test_time_to_answer_needs_a_defined_stable_top_k(monkeypatch):
    answer = _bench("answer", monkeypatch)
    a, b = frozenset({0, 1}), frozenset({0, 2})
    assert answer.first_stable([a, b, b, None, b, b, b], window=3) == 6
    assert answer.first_stable([a, a, b, b], window=3) is None


@pytest.mark.parametrize("noise_scale", [0.0, 1e-3, 0.3])
def test_kl_from_probs_matches_textbook_kl(noise_scale):
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(9, 300, generator=gen, dtype=torch.float64) * 4 - 50
    noised = clean + noise_scale * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    ref_logits = noised.clone().requires_grad_(True)
    log_p = torch.log_softmax(clean, -1)
    reference = (log_p.exp() * (log_p - torch.log_softmax(ref_logits, -1))).sum(-1).mean()
    reference.backward()
    probs, neg_entropy = clean_distribution(clean.float())
    logits = noised.float().requires_grad_(True)
    fast = kl_divergence_from_probs(list(probs.split([4, 5])), neg_entropy, logits)
    fast.backward()
    torch.testing.assert_close(fast.double(), reference.detach(), rtol=1e-4, atol=1e-7)
    # float32 gradients (p_n - p_c) / m: at least as accurate as autograd through the textbook
    # float32 formula (both err by float32 rounding of p, ~1e-7 / m)
    f32_logits = noised.float().requires_grad_(True)
    textbook = kl_divergence(torch.log_softmax(clean.float(), -1), f32_logits)
    textbook.backward()
    error = (logits.grad.double() - ref_logits.grad).abs().max()
    textbook_error = (f32_logits.grad.double() - ref_logits.grad).abs().max()
    assert error <= 2 * textbook_error + 1e-9
    torch.testing.assert_close(fast, textbook.detach(), rtol=1e-4, atol=1e-7)


def test_kl_from_probs_graph_runs_backward_once():
    probs, neg_entropy = clean_distribution(torch.randn(3, 7))
    logits = torch.randn(3, 7, requires_grad=True)
    loss = kl_divergence_from_probs(probs, neg_entropy, logits)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()
    with pytest.raises(ValueError, match="rows"):
        kl_divergence_from_probs(probs[:2], neg_entropy[:2], logits)


def test_fit_restores_trainable_weights_and_computes_no_weight_grads(make_model):
    model = make_model()  # weights require grad, as a freshly loaded model's do
    tokens = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    with tn.attach_noise(model, "blocks.*.attn.hook_z", calibration_tokens=tokens) as noise:
        result = fit(model, noise, tokens, steps=3, batch_size=4, quiet=True)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert len(result.history) == 3 and math.isfinite(result.history[-1]["loss"]["task"])


def test_uncached_and_cached_clean_targets_give_the_same_fit(tiny_model):
    tokens = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 4:] = True
    results = []
    for cache_mb in (512.0, 0.0):
        with tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", calibration_tokens=tokens) as n:
            results.append(fit(tiny_model, n, tokens, loss_mask=mask, steps=4, batch_size=4,
                               quiet=True, clean_cache_mb=cache_mb))  # fmt: skip
    cached, uncached = results
    for a, b in zip(cached.history, uncached.history, strict=True):
        assert a["loss"]["task"] == pytest.approx(b["loss"]["task"], rel=1e-4, abs=1e-7)
    for name in cached.stds:
        torch.testing.assert_close(cached.stds[name], uncached.stds[name], rtol=1e-4, atol=1e-6)
