"""Edge noise resampled from counterfactuals (``tn.fit(..., corrupted_tokens=...)``): an ablated
edge then carries the writer's contribution on the example's counterfactual, the fit's circuit
curve resamples too, and bad counterfactuals are refused before anything runs."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, freeze

import tl_noise as tn
from tl_noise.hooks.noise_hooks import CORRUPTED_KEY
from tl_noise.models import build_native_model

pytestmark = pytest.mark.tl3

GEN = torch.Generator().manual_seed(7)
TOKENS = torch.randint(0, TINY["d_vocab"], (6, 10), generator=GEN)
CORRUPTED = torch.randint(0, TINY["d_vocab"], (6, 10), generator=GEN)


@pytest.fixture(scope="module")
def model():
    return freeze(build_native_model(TINY))


def test_every_edge_resampled_is_the_model_on_the_counterfactual(model):
    """sigma = 1 on every edge with the counterfactual's contributions: each reader reads what
    it reads on the counterfactual, so the logits are the counterfactual's."""
    with torch.no_grad():
        want = model(CORRUPTED)
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        ones = {b: torch.ones(s) for b, s in noise.graph.block_shapes().items()}
        with torch.no_grad(), noise.fixed(ones), noise.batch_context({CORRUPTED_KEY: CORRUPTED}):
            got = model(TOKENS)
        with torch.no_grad(), noise.fixed(ones):  # without it: the writers' means
            mean_ablated = model(TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mean_ablated, want, rtol=1e-3, atol=1e-3)


def test_a_resample_fit_resamples_its_curve_and_counts_the_extra_forward(model):
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        result = tn.fit(model, noise, TOKENS, steps=4, batch_size=3, quiet=True,
                        corrupted_tokens=CORRUPTED, refine_window=0)  # fmt: skip
        info = noise.ranking_info
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        plain = tn.fit(model, noise, TOKENS, steps=4, batch_size=3, quiet=True, refine_window=0)
        plain_info = noise.ranking_info
    assert info["ablation"] == "resample" and plain_info["ablation"] == "mean"
    curve_forwards = info["forwards"] * min(info["examples"], 6) / 6
    plain_curve = plain_info["forwards"] * min(plain_info["examples"], 6) / 6
    assert result.forwards - curve_forwards == pytest.approx(4 * 4 * 3 / 6)  # 4 a step
    assert plain.forwards - plain_curve == pytest.approx(3 * 4 * 3 / 6)
    assert result.stds.keys() == plain.stds.keys()
    assert any(not torch.equal(result.stds[k], plain.stds[k]) for k in result.stds)


def test_bad_counterfactuals_are_refused_before_the_fit(model):
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        with pytest.raises(ValueError, match=r"shaped like the tokens \[6, 10\].*\[6, 9\]"):
            tn.fit(model, noise, TOKENS, steps=1, quiet=True, corrupted_tokens=CORRUPTED[:, 1:])
        with pytest.raises(ValueError, match="corrupted_tokens"):
            tn.fit(model, noise, TOKENS, steps=1, quiet=True,
                   corrupted_tokens=CORRUPTED + TINY["d_vocab"])  # fmt: skip
    with tn.attach_noise(model, "blocks.*.attn.hook_z") as nodes:
        with pytest.raises(ValueError, match="needs edge noise"):
            tn.fit(model, nodes, TOKENS, steps=1, quiet=True, corrupted_tokens=CORRUPTED)
