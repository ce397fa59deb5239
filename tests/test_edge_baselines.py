"""Edge attribution patching against TransformerLens 4.3's own (``benchmarks/edges/tl_eap.py``)
on a Hugging Face-booted GPT-2, and resample ablation of every edge being the corrupted run.

TL's estimate is *denoising* (``(c_w(x) - c_w(x~)) . dm/dx_r`` with the gradient at the
corrupted run ``x~``), tl-noise's ``EdgeCircuitEvaluator.attribution`` *noising* (``(c_w(x~) -
c_w(x)) . dm/dx_r`` at the clean run). Run with the roles of the two inputs swapped (the
evaluator on ``x~``, patched from ``x``, its metric the clean tokens' log-probabilities) ours is
TL's exactly; in their own orientations they agree to first order only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, TL_MAJOR, freeze

from tl_noise.edges import EdgeCircuitEvaluator
from tl_noise.evaluation.node_baselines.common import n_targets, target_log_probs
from tl_noise.hooks.targets import next_token_targets
from tl_noise.models import build_native_model, load_model

ROOT = Path(__file__).resolve().parent.parent
needs_tl4 = pytest.mark.skipif(TL_MAJOR < 4, reason="TL 3.x ships no edge attribution patching")


def tl_eap():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.edges import tl_eap

    return tl_eap


def pair(vocab: int, n: int = 5, pos: int = 10) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(1, vocab, (n, pos), generator=gen)
    corrupted = torch.randint(1, vocab, (n, pos), generator=gen)
    mask = torch.zeros_like(clean, dtype=torch.bool)
    mask[:, 4:] = True
    return clean, corrupted, mask


@pytest.fixture(scope="module")
def hf_model(gpt2_checkpoint):
    return freeze(load_model(gpt2_checkpoint))


@needs_tl4
def test_edge_attribution_is_transformer_lens_with_the_roles_swapped(hf_model):
    clean, corrupted, mask = pair(int(hf_model.cfg.d_vocab))
    theirs, _, forwards = tl_eap().tl_edge_attribution(hf_model, clean, mask, corrupted)
    n, count = clean.shape[0], n_targets(mask, next_token_targets(clean))

    def metric(logits, batch):  # minus the clean tokens' share of TL's metric, per row
        logp = target_log_probs(logits, next_token_targets(batch["clean"]), batch["loss_mask"])
        return -logp.sum() * n / (count * len(batch["index"]))

    with EdgeCircuitEvaluator(hf_model, corrupted, mask, "resample", corrupted_tokens=clean,
                              metric=metric, extras={"clean": clean}) as evaluator:  # fmt: skip
        ours = evaluator.attribution()
        edges = evaluator.edges
    assert set(theirs) == set(edges) and len(edges) == 110 and forwards == 4
    scale = max(theirs.values())
    assert scale > 1e-3
    for edge in edges:  # input, head, MLP writers; q, k, v, MLP and logits readers alike
        assert ours[edge] == pytest.approx(theirs[edge], abs=1e-5 * scale), edge


@needs_tl4
def test_edge_attribution_agrees_with_transformer_lens_to_first_order(hf_model):
    clean, corrupted, mask = pair(int(hf_model.cfg.d_vocab))
    theirs, _, _ = tl_eap().tl_edge_attribution(hf_model, clean, mask, corrupted)
    with EdgeCircuitEvaluator(hf_model, clean, mask, "resample", corrupted_tokens=corrupted) as ev:
        ours = ev.attribution()
        edges = ev.edges
    a = torch.tensor([theirs[e] for e in edges], dtype=torch.float64)
    b = torch.tensor([ours[e] for e in edges], dtype=torch.float64)
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8  # 0.90 here
    assert not torch.allclose(a, b, rtol=1e-3)  # the gradients are taken at different runs


@needs_tl4
def test_transformer_lens_refuses_natively_booted_bridges():
    model = freeze(build_native_model(TINY))
    clean, corrupted, mask = pair(TINY["d_vocab"], n=2)
    with pytest.raises(NotImplementedError, match="use_attn_result"):
        tl_eap().tl_edge_attribution(model, clean, mask, corrupted)


@pytest.mark.tl3
@pytest.mark.parametrize("overrides", [{}, {"normalization_type": None}, {"attn_only": True}])
def test_resample_ablating_every_edge_is_the_corrupted_run(overrides):
    """Every reader then reads the corrupted input's writers (the input writer included): the
    empty circuit's metric is the corrupted run's log-probability of the clean tokens."""
    model = freeze(build_native_model({**TINY, **overrides}))
    clean, corrupted, mask = pair(TINY["d_vocab"], n=4)
    with EdgeCircuitEvaluator(model, clean, mask, "resample", corrupted_tokens=corrupted) as ev:
        empty = ev.empty_metric
    with torch.no_grad():
        expected = float(target_log_probs(model(corrupted), next_token_targets(clean), mask).mean())
    assert empty == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.tl3
def test_edge_noise_gradients_are_the_same_in_every_backward_pass():
    """The readers' gradients are accumulated per backward pass: a second pass over a retained
    graph gives the first pass's gradients again, not their sum."""
    import tl_noise as tn

    model = freeze(build_native_model(TINY))
    clean, _, _ = pair(TINY["d_vocab"], n=3)
    with tn.attach_edge_noise(model, calibration_tokens=clean) as noise:
        noise.set_mode("sample")
        loss = model(clean).log_softmax(-1)[..., 1].mean()
        params = [p for p in noise.parameters() if p.requires_grad]
        first = torch.autograd.grad(loss, params, retain_graph=True)
        second = torch.autograd.grad(loss, params)
    assert any(float(g.abs().max()) > 0 for g in first[:-1])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
