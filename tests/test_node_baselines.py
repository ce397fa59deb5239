"""Node-level baselines (heads and MLPs): every method scores every node and counts its cost,
mean ablation is the evaluator's, activation patching is the explicit hooked computation, the
private attribution patching agrees with TransformerLens 4.3's tool, and greedy elimination,
subnetwork probing and IBCircuit find structure planted in small random models."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, freeze, tiny_data

from tl_noise.errors import TLNoiseValueError
from tl_noise.evaluation.node_baselines import (
    BASELINES,
    NodeScores,
    activation_patching_scores,
    attribution_patching_scores,
    private_attribution_patching,
    tl_attribution_patching,
    tl_tool_available,
)
from tl_noise.evaluation.nodes import CircuitEvaluator, circuit_nodes
from tl_noise.models import build_native_model, transformer_lens_major
from tl_noise.names import parse_node

METHODS = (
    "mean ablation",
    "activation patching",
    "attribution patching (TL)",
    "subnetwork probing",
    "ibcircuit",
    "acdc greedy",
)
FAST = {"subnetwork probing": {"steps": 8}, "ibcircuit": {"steps": 8}}
N = 10  # nodes of TINY: 2 layers x (4 heads + 1 MLP)
COST = {  # the documented forward counts on TINY's 24 rows (8 steps on batches of 24 rows)
    "mean ablation": 3 + N,
    "activation patching": 2 + N,
    "attribution patching (TL)": 4,
    "subnetwork probing": 2 + 8 * 3 * 24 / 24,
    "ibcircuit": 2 + 8 * 3 * 24 / 24,
    "acdc greedy": 3 + N * (N + 1) // 2 - 1,
}


def corrupted(tokens: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """Counterfactual inputs of the same shape: fresh random tokens."""
    return torch.randint(0, TINY["d_vocab"], tokens.shape,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


def output_weight(model, node: str) -> torch.Tensor:
    """The slice of the output weights through which ``node`` writes to the residual stream
    (a view: scaling it scales the node's output, biases excepted), on TL 3.x and 4.x."""
    layer, head = parse_node(node)
    if transformer_lens_major() < 4:
        return model.blocks[layer].attn.W_O[head] if head is not None else (
            model.blocks[layer].mlp.W_out)  # fmt: skip
    part = "attn._original_component.o" if head is not None else "mlp._original_component.fc_out"
    name = f"layers.{layer}._original_component.{part}._original_component.weight"
    weight = dict(model.named_parameters())[name]  # [d_model, n_heads * d_head] / [d_model, d_mlp]
    d_head = int(model.cfg.d_head)
    return weight[:, head * d_head : (head + 1) * d_head] if head is not None else weight


def planted_model(factors: dict[str, float], default: float = 1.0, **overrides):
    """A fresh TINY model (2 layers x 4 heads + 2 MLPs) with every node's output weights scaled by
    ``factors.get(node, default)``."""
    model = freeze(build_native_model({**TINY, **overrides}))
    with torch.no_grad():
        for node in circuit_nodes(model):
            output_weight(model, node).mul_(factors.get(node, default))
    return model


@pytest.fixture(scope="module")
def model():
    return freeze(build_native_model(TINY))


# ------------------------------------------------------------------------ every method
@pytest.mark.tl3
def test_registry_lists_the_methods_in_order():
    assert BASELINES.names() == METHODS
    with pytest.raises(TLNoiseValueError, match="accepted: mean ablation"):
        BASELINES.get("edge pruning")


@pytest.mark.tl3
@pytest.mark.parametrize("name", METHODS)
def test_every_method_scores_every_node_and_counts_forwards_as_documented(model, name):
    tokens, mask = tiny_data()
    grads = [p.requires_grad for p in model.parameters()]
    result = BASELINES.get(name)(model, tokens, mask, corrupted(tokens), **FAST.get(name, {}))
    assert isinstance(result, NodeScores)
    assert list(result.scores) == circuit_nodes(model)  # 8 heads and 2 MLPs, in node order
    assert all(math.isfinite(s) for s in result.scores.values())
    assert result.forwards == COST[name] and result.seconds > 0
    assert sorted(result.ranking()) == sorted(circuit_nodes(model))
    assert [p.requires_grad for p in model.parameters()] == grads  # left as it was
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.tl3
def test_attention_only_models_have_head_nodes_only():
    model = freeze(build_native_model({**TINY, "attn_only": True}))
    tokens, mask = tiny_data()
    for name in ("mean ablation", "attribution patching (TL)"):
        result = BASELINES.get(name)(model, tokens, mask, corrupted(tokens))
        assert list(result.scores) == [f"a{layer}.h{h}" for layer in range(2) for h in range(4)]
    assert result.details["backend"] == "private"  # TL's node graph requires hook_mlp_out


@pytest.mark.tl3
def test_bad_inputs_are_refused(model):
    tokens, mask = tiny_data()
    with pytest.raises(TLNoiseValueError, match="loss_mask"):
        BASELINES.get("mean ablation")(model, tokens, mask[:, :5])
    with pytest.raises(TLNoiseValueError, match="corrupted_tokens"):
        activation_patching_scores(model, tokens, mask, tokens[:3])
    with pytest.raises(TLNoiseValueError, match="objective"):
        BASELINES.get("ibcircuit")(model, tokens, mask, objective="ce", steps=1)


# ------------------------------------------------------------------------- exact methods
@pytest.mark.tl3
def test_mean_ablation_is_the_evaluators_single_node_drop(model):
    tokens, mask = tiny_data()
    result = BASELINES.get("mean ablation")(model, tokens, mask)
    evaluator = CircuitEvaluator(model, tokens, mask)
    nodes = evaluator.nodes
    for v in nodes:
        drop = evaluator.clean_metric - evaluator.metric([u for u in nodes if u != v])
        assert result.scores[v] == pytest.approx(drop, abs=1e-6)
    absolute = BASELINES.get("mean ablation")(model, tokens, mask, absolute=True).scores
    assert absolute == pytest.approx({v: abs(s) for v, s in result.scores.items()}, abs=1e-6)


def explicit_patch(model, tokens, mask, bad, node: str) -> float:
    """``m(x~ with node <- its clean activation) - m(x~)``, written out with TL's own API."""
    layer, head = parse_node(node)
    hook = f"blocks.{layer}.attn.hook_z" if head is not None else f"blocks.{layer}.hook_mlp_out"
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    clean = cache[hook]

    def patch(act, hook):
        act = act.clone()
        if head is None:
            return clean.clone()
        act[:, :, head] = clean[:, :, head]
        return act

    def metric(logits):
        logp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        keep = mask[:, :-1]  # mask never covers the last position here
        return float(logp[keep].mean())

    with torch.no_grad():
        return metric(model.run_with_hooks(bad, fwd_hooks=[(hook, patch)])) - metric(model(bad))


@pytest.mark.tl3
def test_activation_patching_matches_an_explicit_hooked_run(model):
    tokens, mask = tiny_data()
    mask[:, -1] = False
    bad = corrupted(tokens)
    result = activation_patching_scores(model, tokens, mask, bad, absolute=False, batch_size=10)
    for node in ("a1.h2", "m0"):
        expected = explicit_patch(model, tokens, mask, bad, node)
        assert result.scores[node] == pytest.approx(expected, abs=1e-5)
    assert result.details["clean_metric"] == pytest.approx(
        CircuitEvaluator(model, tokens, mask).clean_metric, abs=1e-6)  # fmt: skip
    assert activation_patching_scores(model, tokens, mask, bad).scores == pytest.approx(
        {v: abs(s) for v, s in result.scores.items()}, abs=1e-5)  # fmt: skip


@pytest.mark.tl3
def test_patching_a_run_with_itself_changes_nothing(model):
    tokens, mask = tiny_data()
    methods = (activation_patching_scores, private_attribution_patching,
               attribution_patching_scores)  # fmt: skip
    for method in methods:
        scores = method(model, tokens, mask, tokens).scores
        assert max(scores.values()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.tl3
def test_attribution_patching_falls_back_to_the_private_one_without_the_tool(model, monkeypatch):
    tokens, mask = tiny_data()
    bad = corrupted(tokens)
    result = attribution_patching_scores(model, tokens, mask, bad)
    assert result.details["backend"] == ("tl" if tl_tool_available() else "private")
    module = sys.modules["tl_noise.evaluation.node_baselines.attribution_patching"]
    monkeypatch.setattr(module, "tl_tool_available", lambda: False)  # TL 3.x before 3.9
    fallback = attribution_patching_scores(model, tokens, mask, bad)
    assert fallback.details["backend"] == "private"
    assert fallback.scores == pytest.approx(result.scores, abs=1e-6)


@pytest.mark.tl3
@pytest.mark.skipif(not tl_tool_available(), reason="this TransformerLens has no such tool")
def test_private_attribution_patching_agrees_with_transformer_lens(model):
    """Same estimate (denoising, gradient at the corrupted run, clean next token), computed by
    TL per row with backward hooks and by ours batched through zero offsets: equal up to float
    rounding (signed scores). TL 4.3 ships the tool; 3.9 an earlier node-only version."""
    tokens, mask = tiny_data()
    bad = corrupted(tokens)
    ours = private_attribution_patching(model, tokens, mask, bad, absolute=False, batch_size=7)
    theirs = tl_attribution_patching(model, tokens, mask, bad, absolute=False)
    assert theirs.details["backend"] == "tl" and theirs.forwards == ours.forwards == 4
    scale = max(abs(s) for s in theirs.scores.values())
    assert scale > 1e-4
    for v in circuit_nodes(model):
        assert ours.scores[v] == pytest.approx(theirs.scores[v], abs=1e-5 * scale, rel=1e-4)


# --------------------------------------------------------------- planted structure
@pytest.mark.tl3
def test_greedy_removes_dead_nodes_first():
    """A head with W_O = 0 and an MLP with W_out = 0 leave the metric exactly unchanged when
    removed: they go first, in node order."""
    model = planted_model({"a0.h2": 0.0, "m1": 0.0})
    tokens, mask = tiny_data()
    result = BASELINES.get("acdc greedy")(model, tokens, mask)
    path = result.details["path"]
    assert [v for v, _ in path[:2]] == ["a0.h2", "m1"]
    assert [f for _, f in path[:2]] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert result.scores["a0.h2"] == 0 and result.scores["m1"] == 1
    assert sorted(result.scores.values()) == list(range(10))


@pytest.mark.tl3
@pytest.mark.parametrize("name", ["subnetwork probing", "ibcircuit"])
@pytest.mark.parametrize("planted", ["a1.h2", "m0"])
def test_learned_masks_rank_a_planted_node_top(name, planted):
    """One node writes 5x louder, every other one 2x quieter: keeping the output distribution
    (KL objective) needs that node most."""
    model = planted_model({planted: 5.0}, default=0.5)
    tokens, mask = tiny_data()
    result = BASELINES.get(name)(model, tokens, mask, steps=40, batch_size=24)
    assert result.ranking()[0] == planted
    assert result.forwards == 2 + 40 * 3
