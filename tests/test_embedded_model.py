"""The embedded model (``tl_noise/data/induction-2l.*``) is an induction circuit, as labelled.

Checked on fresh data drawn here (not the training script's), in both TransformerLens majors
(``tl3`` marker): the model copies repeated segments, its labelled heads are the previous-token /
induction heads by attention score, and mean-ablating one of them breaks copying while ablating any
other head barely matters. The logits also match a plain-torch forward pass over the stored
canonical weights, so the 3.x and 4.x models built from the file compute the same function.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tl_noise.io import read_tensors
from tl_noise.models import DATA_DIR, EMBEDDED_MODEL, load_embedded_model

pytestmark = pytest.mark.tl3

SCORE_THRESHOLD = 0.3  # attention mass a labelled head puts on its target token
LABELLED_ABLATION = 1.0  # nats: ablating one labelled head must raise the repeat loss this much
UNLABELLED_ABLATION = 0.1  # nats: ablating one unlabelled head may raise it at most this much


def repeated_batch(n: int, n_ctx: int, d_vocab: int, seed: int):
    """``[BOS=0, segment, segment, ...]`` with a random period per row; tokens, repeat, period."""
    gen = torch.Generator().manual_seed(seed)
    period = torch.randint(4, 21, (n,), generator=gen)
    segment = torch.randint(1, d_vocab, (n, 20), generator=gen)
    content = segment.gather(1, torch.arange(n_ctx - 1)[None, :] % period[:, None])
    tokens = torch.cat([torch.zeros(n, 1, dtype=torch.long), content], dim=1)
    repeat = torch.arange(n_ctx)[None, :] > period[:, None]  # token t equals token t - period
    return tokens, repeat, period


@pytest.fixture(scope="module")
def model():
    return load_embedded_model()


@pytest.fixture(scope="module")
def batch(model):
    return repeated_batch(128, model.cfg.n_ctx, model.cfg.d_vocab, seed=12345)


@pytest.fixture(scope="module")
def cache(model, batch):
    with torch.no_grad():
        _, cache = model.run_with_cache(batch[0])
    return cache


def repeat_loss(model, tokens, repeat, fwd_hooks=()) -> float:
    """Mean next-token loss at query positions whose own token is a repeat."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return losses[repeat[:, :-1]].mean().item()


def labelled(model, role: str) -> set[tuple[int, int]]:
    return {(int(layer), int(head)) for layer, head in model.ground_truth[role]}


def test_ground_truth_labels_one_role_per_layer(model):
    prev, ind = labelled(model, "previous_token"), labelled(model, "induction")
    assert prev and ind
    assert {layer for layer, _ in prev} == {0}
    assert {layer for layer, _ in ind} == {1}
    assert all(0 <= head < model.cfg.n_heads for _, head in prev | ind)


def test_repeats_are_predicted_and_fresh_tokens_are_not(model, batch):
    tokens, repeat, _ = batch
    with torch.no_grad():
        logits = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    rep = losses[repeat[:, :-1]].mean().item()
    fresh = losses[~repeat[:, :-1]].mean().item()
    chance = math.log(model.cfg.d_vocab)
    assert rep < chance / 3, (rep, chance)
    assert fresh > 0.9 * chance, fresh  # the first segment is random: no way to beat chance
    assert rep < fresh / 3


def test_previous_token_heads_have_the_top_layer0_scores(model):
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(1, model.cfg.d_vocab, (128, model.cfg.n_ctx), generator=gen)
    tokens[:, 0] = 0
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.0.attn.hook_pattern"]  # [batch, head, q, k]
    score = pattern.diagonal(-1, -2, -1)[..., 1:].mean((0, 2))  # attention from t to t - 1
    heads = {h for _, h in labelled(model, "previous_token")}
    others = set(range(model.cfg.n_heads)) - heads
    assert min(score[h] for h in heads) > SCORE_THRESHOLD, score
    assert not others or min(score[h] for h in heads) > max(score[h] for h in others), score


def test_induction_heads_have_the_top_layer1_scores(model, batch, cache):
    tokens, repeat, _ = batch
    # Keys right after an earlier occurrence of the query's token (there may be several).
    after = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)
    target = (tokens[:, :, None] == after[:, None, :]).tril() & repeat[:, :, None]
    pattern = cache["blocks.1.attn.hook_pattern"]  # [batch, head, q, k]
    score = (pattern * target[:, None]).sum(-1).sum((0, 2)) / repeat.sum()
    heads = {h for _, h in labelled(model, "induction")}
    others = set(range(model.cfg.n_heads)) - heads
    assert min(score[h] for h in heads) > SCORE_THRESHOLD, score
    assert not others or min(score[h] for h in heads) > max(score[h] for h in others), score


def test_mean_ablation_hurts_only_labelled_heads(model, batch, cache):
    tokens, repeat, _ = batch
    base = repeat_loss(model, tokens, repeat)
    important = labelled(model, "previous_token") | labelled(model, "induction")
    increase = {}
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        mean = cache[name].mean((0, 1))  # [head, d_head]
        for head in range(model.cfg.n_heads):

            def ablate(z, hook, head=head, mean=mean):
                z = z.clone()
                z[:, :, head] = mean[head]
                return z

            increase[layer, head] = repeat_loss(model, tokens, repeat, [(name, ablate)]) - base
    for key, delta in increase.items():
        if key in important:
            assert delta > LABELLED_ABLATION, (key, increase)
        else:
            assert delta < UNLABELLED_ABLATION, (key, increase)


def test_logits_match_a_plain_forward_over_the_stored_weights(model, batch):
    """The canonical (TransformerLens 3.x) layout, read by hand: both majors must agree with it."""
    w = {k: v.float() for k, v in read_tensors(DATA_DIR / f"{EMBEDDED_MODEL}.safetensors").items()}
    tokens = batch[0][:8]
    n_ctx, d_head = tokens.shape[1], model.cfg.d_head
    causal = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
    x = w["embed.W_E"][tokens] + w["pos_embed.W_pos"][:n_ctx]
    for layer in range(model.cfg.n_layers):
        p = f"blocks.{layer}.attn"
        q, k, v = (
            torch.einsum("bpm,hmd->bphd", x, w[f"{p}.W_{c}"]) + w[f"{p}.b_{c}"] for c in "QKV"
        )
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d_head)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        x = x + torch.einsum("bqhd,hdm->bqm", z, w[f"{p}.W_O"]) + w[f"{p}.b_O"]
    expected = x @ w["unembed.W_U"] + w["unembed.b_U"]
    with torch.no_grad():
        logits = model(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
