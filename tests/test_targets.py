"""What predictions are judged against (tl_noise.hooks.targets): next tokens by default, a task's
own targets when given, the clean argmax for models whose outputs are not input tokens; the same
numbers in every evaluator."""

from __future__ import annotations

import pytest
import torch

import tl_noise as tn
from tl_noise.errors import TLNoiseValueError
from tl_noise.evaluation.node_baselines import BASELINES
from tl_noise.evaluation.nodes import CircuitEvaluator
from tl_noise.hooks.targets import (
    NO_TARGET,
    next_token_targets,
    resolve_targets,
    target_log_probs,
)
from tl_noise.models import build_native_model

pytestmark = pytest.mark.tl3

BASE = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8,
            act_fn="relu", seed=5)  # fmt: skip


def frozen(config: dict):
    model = build_native_model(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def lm():
    return frozen(BASE)


@pytest.fixture(scope="module")
def program():  # a compiled program's shape: bidirectional, its own output vocabulary
    return frozen(dict(BASE, attention_dir="bidirectional", d_vocab_out=4))


def data(n: int = 6, pos: int = 8):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, BASE["d_vocab"], (n, pos), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return tokens, mask


def test_next_token_default_matches_an_explicit_shift(lm):
    tokens, mask = data()
    default = CircuitEvaluator(lm, tokens, mask)
    given = CircuitEvaluator(lm, tokens, mask, targets=next_token_targets(tokens))
    assert torch.equal(default.targets, given.targets)
    for keep in ([], ["a0.h1"], ["a1.h0", "m0"]):
        assert default.metric(keep) == given.metric(keep)
    logits = lm(tokens)  # by hand: log p(tokens[t + 1]) at masked t < pos - 1
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(target_log_probs(logits, default.targets, mask), logp[mask[:, :-1]])


def test_a_model_with_its_own_outputs_is_judged_against_its_argmax(program):
    tokens, mask = data()
    targets = resolve_targets(program, tokens, mask)
    assert torch.equal(targets, program(tokens).argmax(-1))
    ev = CircuitEvaluator(program, tokens, mask)
    full = torch.log_softmax(program(tokens), -1).max(-1).values[mask].mean()
    assert abs(ev.clean_metric - float(full)) < 1e-6  # every position, the last one included


def test_given_targets_count_where_mask_and_target_agree(program):
    tokens, mask = data()
    targets = torch.randint(0, 4, tokens.shape, generator=torch.Generator().manual_seed(2))
    targets[:, 3] = NO_TARGET
    logits = program(tokens)
    logp = target_log_probs(logits, targets, mask)
    keep = mask.clone()
    keep[:, 3] = False
    expected = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(logp, expected[keep])


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda t: t.float(), "integer tensor"),
        (lambda t: t[:, :-1], "shaped like the tokens"),
        (lambda t: t + 4, r"expected ids in \[0, 4\)"),
        (lambda t: t - 2, r"hold -2"),
    ],
)
def test_bad_targets_name_the_problem(program, bad, message):
    tokens, mask = data()
    targets = resolve_targets(program, tokens, mask)
    with pytest.raises(TLNoiseValueError, match=message):
        CircuitEvaluator(program, tokens, mask, targets=bad(targets))


def test_only_last_positions_are_judged_against_the_clean_argmax(lm):
    tokens, mask = data()
    last_only = torch.zeros_like(mask)
    last_only[:, -1] = True  # a prompt whose answer follows it (IOI): no next token in the data
    targets = resolve_targets(lm, tokens, last_only)
    assert torch.equal(targets, lm(tokens).argmax(-1))
    with pytest.raises(TLNoiseValueError, match="selects no position"):
        CircuitEvaluator(lm, tokens, torch.zeros_like(mask))


def test_baselines_and_fit_run_on_a_model_with_its_own_outputs(program):
    tokens, mask = data(16)
    corrupted = data(16)[0].flip(0)
    for name in ("mean ablation", "attribution patching (TL)", "activation patching"):
        scores = BASELINES.get(name)(program, tokens, mask, corrupted_tokens=corrupted).scores
        assert set(scores) == {"a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"}
    with tn.attach_noise(program, ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]) as noise:
        tn.fit(program, noise, tokens, loss_mask=mask, steps=20, quiet=True)
        scores = tn.node_importance(noise)
    assert noise.ranking_info["examples"] == 16 and len(scores) == 6


def test_clean_predictions_ignore_attached_noise(program):
    tokens, mask = data()
    clean = program(tokens).argmax(-1)
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    with tn.attach_noise(program, hooks, init_std=1.0, relative=False) as noise:
        assert not torch.equal(program(tokens).argmax(-1), clean)  # the noise does change it
        assert torch.equal(resolve_targets(program, tokens, mask), clean)
        assert noise.mode == "sample"
