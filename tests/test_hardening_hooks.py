"""Hardening of noise hooks (issue 12): one noise per hook point, clean targets with every noise
off, the per-position check on the hot path, seeded initialisation, the noise's own settings
kept by a fit, ``reset_hooks``, and the metric/objective warning.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HOOKS, assert_model_intact, attach, logits_of

import tl_noise as tn
from tl_noise.fitting import fit
from tl_noise.fitting.objectives import clean_distribution
from tl_noise.fitting.task_losses import CleanTargets, masked_rows
from tl_noise.hooks import NoiseHooks
from tl_noise.noise.covariance import LowRankCovariance

pytestmark = pytest.mark.tl3


# ----------------------------------------------------------- 4. two noises on one hook point
def test_a_second_noise_on_the_same_hook_points_is_refused(tiny_model, data, intact):
    tokens = data[0]
    with attach(tiny_model, tokens) as first:
        noised = logits_of(tiny_model, tokens)
        with pytest.raises(ValueError, match=r"\['blocks.1.attn.hook_z'\] already carry tl-noise"):
            attach(tiny_model, tokens, "blocks.1.attn.hook_z").remove()
        first.manual_seed(0)
        assert torch.equal(logits_of(tiny_model, tokens), noised)  # the first is unchanged
        with attach(tiny_model, tokens, "blocks.0.hook_resid_pre"):  # other hooks: fine
            pass
        second = NoiseHooks.from_config(first.config(), tiny_model)
        with pytest.raises(ValueError, match="already carry tl-noise noise"):
            second.attach().remove()
        assert not second.attached
    with attach(tiny_model, tokens, "blocks.1.attn.hook_z"):  # the first is gone: fine
        pass


def test_clean_targets_switch_off_every_noise_on_the_model(tiny_model, data, intact):
    tokens, mask = data
    clean = clean_distribution(masked_rows(logits_of(tiny_model, tokens), mask))
    with (
        attach(tiny_model, tokens) as noise,
        attach(tiny_model, tokens, "blocks.*.hook_resid_pre", init_std=1.0) as other,
    ):
        assert not torch.equal(logits_of(tiny_model, tokens), logits_of(tiny_model, tokens))
        targets = CleanTargets(tiny_model, noise, tokens, mask, cache_mb=0)
        probs, neg_entropy = targets(torch.arange(len(tokens)))
        assert other.mode == "sample" and noise.mode == "sample"  # modes restored
    torch.testing.assert_close(probs[0], clean[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(neg_entropy, clean[1], rtol=0, atol=1e-6)


# ------------------------------------------------- 6. per-position noise, longer sequences
def test_per_position_noise_on_a_longer_sequence_names_the_problem(tiny_model, data, intact):
    tokens = data[0]
    with attach(tiny_model, tokens[:, :8], per_position=True):
        with pytest.raises(ValueError, match="has 12 positions; .*n_positions=8"):
            tiny_model(tokens)
        tiny_model(tokens[:, :5])  # shorter is fine


# ----------------------------------------------------------------- 8. smaller items
def _seeded_state(model, tokens, global_seed):
    torch.manual_seed(global_seed)
    rng = torch.get_rng_state()
    with tn.attach_noise(model, "blocks.*.hook_resid_pre", calibration_tokens=tokens,
                         estimator=True, seed=0) as noise:  # fmt: skip
        with tn.attach_noise(model, HOOKS, calibration_tokens=tokens, seed=0,
                             covariance=lambda: LowRankCovariance(4)) as cov:  # fmt: skip
            state = {**noise.state_dict(), **{f"cov.{k}": v for k, v in cov.state_dict().items()}}
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    return {k: v.clone() for k, v in state.items()}


def test_attach_seed_seeds_estimator_and_covariance_initialisation(tiny_model, data, intact):
    a = _seeded_state(tiny_model, data[0], 1)
    b = _seeded_state(tiny_model, data[0], 2)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fit_keeps_the_noise_seed_and_modes(tiny_model, data, intact):
    tokens, mask = data
    with attach(tiny_model, tokens, seed=7) as noise:
        noise.layer("blocks.0.attn.hook_z").mode = "off"
        noise.layer("blocks.1.attn.hook_z").mode = "mean"
        logits_of(tiny_model, tokens)  # the generator moves on
        states = noise.generator_states()
        noise.eval()
        noise.layer("blocks.1.attn.hook_z").mode = "mean"
        fit(tiny_model, noise, tokens, loss_mask=mask, steps=2, quiet=True, refine_window=0)
        assert noise.seed == 7
        assert [layer.mode for _, layer in noise.items()] == ["off", "mean"]
        assert not noise.training
        for key, state in noise.generator_states().items():
            assert torch.equal(state, states[key])


def test_reset_hooks_including_permanent_detaches_the_noise(tiny_model, data, intact):
    tokens = data[0]
    clean = logits_of(tiny_model, tokens)
    noise = attach(tiny_model, tokens)
    assert noise.attached
    tiny_model.reset_hooks(including_permanent=True)
    assert not noise.attached
    assert torch.equal(logits_of(tiny_model, tokens), clean)
    noise.attach()  # puts the hooks back
    assert noise.attached and not torch.equal(logits_of(tiny_model, tokens), clean)
    noise.remove()
    assert_model_intact(tiny_model, tokens, clean)


def test_metric_with_the_kl_objective_warns_that_it_is_ignored(tiny_model, data, intact):
    tokens, mask = data
    with attach(tiny_model, tokens) as noise:
        with pytest.warns(UserWarning, match="metric= is ignored with objective='kl'"):
            fit(tiny_model, noise, tokens, loss_mask=mask, steps=1, quiet=True, refine_window=0,
                metric=lambda lg, b: lg.mean())  # fmt: skip
