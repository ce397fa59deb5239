"""Bad input to ``attach_noise``: settings, hook names, calibration tokens and models.

Each case raises a clear error and leaves the model as it was (the contract of the bad-input
matrix, ``tests/test_bad_input_*.py``, and its shared fixtures: ``tests/conftest.py``).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    HOOKS,
    INF,
    NAN,
    assert_model_intact,
    attach,
    embedding_weight,
    logits_of,
)

import tl_noise as tn

pytestmark = pytest.mark.tl3


# ------------------------------------------------------------------ attach_noise: bad settings
def cloak(**kw):
    return tn.CloakStandardDeviationParameterization(**kw)


def direct(**kw):
    return tn.DirectStandardDeviationParameterization(**kw)


def soft(**kw):
    return tn.SoftplusStandardDeviationParameterization(**kw)


ATTACH_CASES = {
    "scale-reversed": (
        lambda m, t: attach(m, t, parameterization=cloak(scale=(2.0, 1.0))),
        ValueError,
        "min_scale=2.0 is not below max_scale=1.0",
    ),
    "scale-infinite": (
        lambda m, t: attach(m, t, parameterization=cloak(scale=(0.0, INF))),
        ValueError,
        "max_scale=inf",
    ),
    "scale-negative": (
        lambda m, t: attach(m, t, parameterization=cloak(scale=(-1.0, 1.0))),
        ValueError,
        "min_scale=-1.0 is negative",
    ),
    "scale-not-a-pair": (
        lambda m, t: attach(m, t, parameterization=cloak(scale="ab")),
        TypeError,
        "'ab'",
    ),
    "shallow-zero": (
        lambda m, t: attach(m, t, parameterization=cloak(shallow=0)),
        ValueError,
        "shallow must be a finite number > 0, got 0",
    ),
    "shallow-nan": (
        lambda m, t: attach(m, t, parameterization=cloak(shallow=NAN)),
        ValueError,
        "shallow must be a finite number > 0, got nan",
    ),
    "softplus-min-negative": (
        lambda m, t: attach(
            m, t, parameterization=tn.SoftplusStandardDeviationParameterization(min_scale=-0.5)
        ),
        ValueError,
        "got -0.5",
    ),
    "parameterization-is-a-string": (
        lambda m, t: attach(m, t, parameterization="cloak"),
        TypeError,
        "parameterization='cloak'",
    ),
    "init-std-outside-range": (
        lambda m, t: attach(m, t, init_std=5.0),
        ValueError,
        r"init_std=5.0 .*\[0.0001, 1\]",  # the replacement form caps sigma at 1
    ),
    "init-std-nan": (lambda m, t: attach(m, t, init_std=NAN), ValueError, "init_std=nan"),
    "direct-init-std-zero": (  # std 0: the noise loss -log(std) is infinite at step 0
        lambda m, t: attach(
            m, t, init_std=0.0, parameterization=direct(scale=(0.0, 2.0)), form="additive"
        ),
        ValueError,
        "init_std=0.0 at blocks.0.attn.hook_z gives an initial std of 0 with Direct.*infinite",
    ),
    "softplus-init-std-overflows": (
        lambda m, t: attach(
            m, t, "blocks.0.hook_mlp_out", init_std=1e38, parameterization=soft(), form="additive"
        ),
        ValueError,
        "init_std=1e.38 at blocks.0.hook_mlp_out with Softplus.*overflows torch.float32",
    ),
    "direct-init-std-at-the-float32-limit": (
        lambda m, t: attach(
            m, t, init_std=3e38, parameterization=direct(scale=(0.0, 3e38)), form="additive"
        ),
        ValueError,
        "init_std=3e.38 .*overflows",
    ),
    "head-granularity-on-residual": (
        lambda m, t: attach(m, t, "blocks.0.hook_resid_pre", granularity="head"),
        ValueError,
        r"granularity='head' at 'blocks.0.hook_resid_pre' .*\[batch, pos, 32\]",
    ),
    "head-feature-granularity-on-mlp": (
        lambda m, t: attach(m, t, "blocks.1.mlp.hook_post", granularity="head_feature"),
        ValueError,
        r"granularity='head_feature' at 'blocks.1.mlp.hook_post' .*\[batch, pos, 64\]",
    ),
    "unknown-granularity": (
        lambda m, t: attach(m, t, granularity="diag"),
        ValueError,
        "granularity='diag'.*accepted: hook, head, feature, head_feature",
    ),
    "unknown-hook-name": (
        lambda m, t: attach(m, t, "blocks.0.attn.hook_zz"),
        ValueError,
        r"unknown hook point 'blocks.0.attn.hook_zz'; closest: blocks\.0\.attn\.hook_z\b",
    ),
    "pattern-matches-no-hook": (
        lambda m, t: attach(m, t, "blocks.7.*"),
        ValueError,
        re.escape("unknown hook point 'blocks.7.*'"),
    ),
    "hooks-not-a-name": (lambda m, t: attach(m, t, 5), TypeError, "hooks=5"),
    "pattern-selects-only-attention-patterns": (
        lambda m, t: attach(m, t, "blocks.*.attn.hook_pattern"),
        ValueError,
        r"'blocks.\*.attn.hook_pattern' selects only attention scores/patterns; .*not supported",
    ),
    "calibration-tokens-int8": (
        lambda m, t: attach(m, t.to(torch.int8)),
        TypeError,
        "calibration_tokens .*dtype torch.int8",
    ),
    "attention-pattern-hook": (
        lambda m, t: attach(m, t, "blocks.0.attn.hook_pattern"),
        ValueError,
        "blocks.0.attn.hook_pattern",
    ),
    "calibration-tokens-outside-vocabulary": (
        lambda m, t: attach(m, torch.cat([t, torch.full((1, 12), 50)])),
        ValueError,
        re.escape("calibration_tokens must lie in [0, 49] (d_vocab=50); found [0, 50]"),
    ),
    "calibration-tokens-negative": (
        lambda m, t: attach(m, torch.cat([t, torch.full((1, 12), -3)])),
        ValueError,
        re.escape("found [-3, 49]"),
    ),
    "calibration-tokens-empty": (
        lambda m, t: attach(m, t[:0]),
        ValueError,
        re.escape("calibration_tokens has shape [0, 12]: the dataset is empty"),
    ),
    "calibration-tokens-float": (
        lambda m, t: attach(m, t.float()),
        TypeError,
        "calibration_tokens .*dtype torch.float32",
    ),
    "estimator-unknown-argument": (
        lambda m, t: attach(m, t, estimator={"d_hiden": 8}),
        TypeError,
        "d_hiden",
    ),
    "model-is-a-plain-module": (
        lambda m, t: tn.attach_noise(torch.nn.Linear(2, 2), HOOKS),
        TypeError,
        "got Linear",
    ),
    "seed-is-a-string": (
        lambda m, t: attach(m, t, seed="a"),
        TypeError,
        "seed='a'; expected an int or None",
    ),
}

# attach_edge_noise: the same settings, the same errors, and nothing left on the model
EDGE_CASES = {
    "form-unknown": (dict(form="zero"), ValueError, "form='zero'; accepted: additive"),
    "init-std-negative": (dict(init_std=-1.0), ValueError, "init_std=-1.0 at blocks.0.attn.edges"),
    "init-std-above-one": (dict(init_std=2.0), ValueError, r"init_std=2.0 .* \[0.0001, 1\]"),
    "parameterization-above-one": (
        dict(parameterization=cloak(scale=(1e-4, 2.0))),
        ValueError,
        "form='replacement' .* needs sigma <= 1",
    ),
    "parameterization-is-a-string": (
        dict(parameterization="cloak"),
        TypeError,
        "parameterization='cloak'",
    ),
    "seed-is-a-float": (dict(seed=1.5), TypeError, "seed=1.5"),
    "calibration-tokens-float": (
        dict(calibration_tokens=torch.zeros(2, 3)),
        TypeError,
        "calibration_tokens .*dtype torch.float32",
    ),
    "calibration-tokens-out-of-range": (
        dict(calibration_tokens=torch.full((2, 3), 99)),
        ValueError,
        r"calibration_tokens must lie in \[0, 49\]",
    ),
}


@pytest.mark.parametrize("case", list(ATTACH_CASES))
def test_attach_noise_rejects(case, tiny_model, data, intact):
    call, exc, match = ATTACH_CASES[case]
    with pytest.raises(exc, match=match):
        call(tiny_model, data[0])


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_attach_edge_noise_rejects(case, tiny_model, intact):
    kwargs, exc, match = EDGE_CASES[case]
    with pytest.raises(exc, match=match):
        tn.attach_edge_noise(tiny_model, **kwargs)
    assert not any(point.fwd_hooks for point in tiny_model.hook_dict.values())


def test_attach_noise_rejects_a_huggingface_model(tiny_model, data, intact):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).eval()
    with pytest.raises(TypeError, match="got GPT2LMHeadModel.*load_model"):
        tn.attach_noise(hf, HOOKS)
    assert not hf._forward_hooks and not any(m._forward_hooks for m in hf.modules())


def test_nan_activations_at_attach_name_the_hook(make_model, data):
    poisoned = make_model()
    with torch.no_grad():
        embedding_weight(poisoned)[7] = NAN
    tokens = data[0].clone()
    tokens[3, 5] = 7
    before = logits_of(poisoned, tokens)
    assert torch.isnan(before[3]).any()
    with pytest.raises(FloatingPointError, match=r"\['blocks.0.attn.hook_z', 'blocks.1.attn"):
        tn.attach_noise(poisoned, HOOKS, calibration_tokens=tokens)
    assert_model_intact(poisoned, tokens, before)
