"""The exact optimum (tl_noise.evaluation.exact): the prefix-sharing computation of f(C) for all
2^N circuits against plain hooked forwards (CircuitEvaluator), and the optimum, ranking ceiling
and ranking metrics on small hand-made tables."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tl_noise.evaluation import exact
from tl_noise.evaluation.exact import (
    ExactTable,
    compute_and_save,
    exhaustive_faithfulness,
    judge_ranking,
    k90_star,
    mib_areas,
    minimal_circuit,
    optimum_curve,
    ranking_ceiling,
    ranking_curve,
)
from tl_noise.evaluation.nodes import CircuitEvaluator
from tl_noise.models import build_native_model

pytestmark = pytest.mark.tl3

BASE = dict(d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=24)
CONFIGS = {  # 3 x (4 heads + MLP) = 15 nodes; 2 x 4 heads = 8 nodes
    "mlp": dict(BASE, n_layers=3, d_mlp=64, act_fn="gelu", seed=3),
    "attn_only": dict(BASE, n_layers=2, attn_only=True, seed=2),
    # a compiled program's shape: bidirectional, ReLU, its own output vocabulary (the metric's
    # targets are then the clean model's argmax: tl_noise.hooks.targets)
    "bidirectional": dict(
        BASE,
        n_layers=2,
        d_mlp=32,
        act_fn="relu",
        seed=4,
        attention_dir="bidirectional",
        d_vocab_out=7,
    ),
}
SCALE = 2.0  # random weights x 2 (and these seeds): |m(N) - m(empty)| > 1 on TL 3.x and 4.x,
# so f is well conditioned against the float32 log-softmax of the hooked forwards


def random_model(config: dict):
    model = build_native_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.mul_(SCALE)
    return model


def data(n: int = 8, pos: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, BASE["d_vocab"], (n, pos), generator=gen)
    mask = torch.rand(n, pos, generator=gen) < 0.5
    mask[:, -2] = True  # every row has a target
    return tokens, mask


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    """``(model, tokens, mask, table)`` with every node varied."""
    model = random_model(CONFIGS[request.param])
    tokens, mask = data()
    return model, tokens, mask, exhaustive_faithfulness(model, tokens, mask, progress=False)


def sample(nodes: list[str], count: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[n for n in nodes if rng.random() < p] for p in (0.2, 0.5, 0.8) for _ in range(count)]


# ---------------------------------------------------------------- against hooked forwards
def test_matches_hooked_forwards(case):
    model, tokens, mask, table = case
    ev = CircuitEvaluator(model, tokens, mask)
    assert table.nodes == ev.nodes and len(table.f) == 2 ** len(ev.nodes)
    assert abs(table.clean_metric - ev.clean_metric) < 1e-5 * (1 + abs(ev.clean_metric))
    for subset in sample(table.nodes, 4) + [table.nodes[:1], table.nodes[-1:]]:
        assert abs(table.f_of(subset) - ev.faithfulness(subset)) < 1e-5, subset
        m = float(table.metric[table.mask_of(subset)])
        assert abs(m - ev.metric(subset)) < 1e-5 * (1 + abs(m)), subset


def test_full_and_empty_are_one_and_zero(case):
    *_, table = case
    assert float(table.f[-1]) == 1.0 and float(table.f[0]) == 0.0
    assert table.f_of(table.nodes) == 1.0 and table.f_of([]) == 0.0
    assert table.f.dtype == torch.float64 and bool(table.f.isfinite().all())


def test_node_subset_in_any_order_others_never_ablated():
    model = random_model(CONFIGS["mlp"])
    tokens, mask = data(6, 10)
    nodes = ["m2", "a0.h1", "a2.h3", "m0", "a1.h0", "a2.h0"]  # few heads per layer, shuffled
    table = exhaustive_faithfulness(model, tokens, mask, nodes=nodes, progress=False)
    ev = CircuitEvaluator(model, tokens, mask, nodes=nodes)
    assert table.nodes == nodes
    for mask_bits in range(1 << len(nodes)):  # m: f(C) is ill-conditioned on these few nodes
        subset = [n for i, n in enumerate(nodes) if mask_bits >> i & 1]
        m = float(table.metric[mask_bits])
        assert abs(m - ev.metric(subset)) < 1e-5 * (1 + abs(m)), subset


def test_batching_does_not_change_the_table(monkeypatch):
    model = random_model(CONFIGS["attn_only"])
    tokens, mask = data(6, 10)
    mask[2] = False  # an example without targets
    reference = exhaustive_faithfulness(model, tokens, mask, progress=False)
    explicit = exhaustive_faithfulness(model, tokens, mask, batch_size=5, progress=False)
    monkeypatch.setattr(exact, "ACTIVATION_FLOATS", 2**12)  # many example chunks
    chunked = exhaustive_faithfulness(model, tokens, mask, progress=False)
    for other in (explicit, chunked):
        torch.testing.assert_close(other.metric, reference.metric, rtol=1e-6, atol=1e-6)


def test_bad_nodes_and_the_node_limit(monkeypatch):
    model = random_model(CONFIGS["attn_only"])
    tokens, mask = data(4, 8)
    with pytest.raises(ValueError, match="a5.h0"):
        exhaustive_faithfulness(model, tokens, mask, nodes=["a0.h0", "a5.h0"], progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        exhaustive_faithfulness(model, tokens, mask, nodes=["a0.h0", "a0.h0"], progress=False)
    monkeypatch.setattr(exact, "MAX_EXACT_NODES", 6)
    with pytest.raises(ValueError, match="MAX_EXACT_NODES = 6"):
        exhaustive_faithfulness(model, tokens, mask, progress=False)


def test_save_load_round_trip(tmp_path):
    model = random_model(CONFIGS["attn_only"])
    tokens, mask = data(4, 8)
    table = compute_and_save(model, tokens, mask, tmp_path / "exact", progress=False)
    assert sorted(p.name for p in (tmp_path / "exact").iterdir()) == [
        "exact_table.json", "exact_table.safetensors"]  # fmt: skip
    loaded = ExactTable.load(tmp_path / "exact")
    assert loaded.nodes == table.nodes and loaded.info == table.info
    assert (loaded.clean_metric, loaded.empty_metric) == (table.clean_metric, table.empty_metric)
    assert torch.equal(loaded.f, table.f) and torch.equal(loaded.metric, table.metric)
    (tmp_path / "exact" / "exact_table.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="exact_table.safetensors"):
        ExactTable.load(tmp_path / "exact")


# ------------------------------------------------------------------- optimum and rankings
def synthetic(n: int, seed: int) -> ExactTable:
    """Random f in [-0.2, 1.2] with f({}) = 0, f(N) = 1."""
    f = torch.rand(1 << n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = f * 1.4 - 0.2
    f[0], f[-1] = 0.0, 1.0
    return ExactTable([f"a0.h{i}" for i in range(n)], f, f.clone(), 1.0, 0.0)


def greedy_chain(table: ExactTable) -> list[str]:
    chain: list[str] = []
    while len(chain) < len(table.nodes):
        rest = [n for n in table.nodes if n not in chain]
        chain.append(max(rest, key=lambda n: table.f_of(chain + [n])))
    return chain


@pytest.mark.parametrize("n, seed", [(1, 0), (3, 1), (5, 2), (6, 3), (6, 4)])
def test_ceiling_is_the_best_ranking(n, seed):
    table = synthetic(n, seed)
    chain, curve = ranking_ceiling(table)
    best = max(float(ranking_curve(table, order).sum())
               for order in itertools.permutations(table.nodes))  # fmt: skip
    assert sorted(chain) == sorted(table.nodes)
    assert float(curve.sum()) == pytest.approx(best, abs=1e-12)
    assert torch.equal(curve, ranking_curve(table, chain))
    assert float(curve.sum()) >= float(ranking_curve(table, greedy_chain(table)).sum()) - 1e-12
    optimum, sets = optimum_curve(table)
    assert bool((curve <= optimum + 1e-12).all())  # no chain beats the best set of a size
    assert [len(s) for s in sets] == list(range(n + 1))
    assert [table.f_of(s) for s in sets] == optimum.tolist()


def test_ceiling_beats_greedy_on_a_larger_table():
    table = synthetic(10, 5)
    chain, curve = ranking_ceiling(table)
    assert float(curve.sum()) >= float(ranking_curve(table, greedy_chain(table)).sum())
    rng = random.Random(0)
    for _ in range(50):
        order = rng.sample(table.nodes, len(table.nodes))
        assert float(curve.sum()) >= float(ranking_curve(table, order).sum())


def test_additive_table_ceiling_is_the_optimum():
    weights = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.25], dtype=torch.float64)
    bits = (torch.arange(32)[:, None] >> torch.arange(5)) & 1
    f = (bits.double() @ weights) / weights.sum()
    table = ExactTable([f"a0.h{i}" for i in range(5)], f, f.clone(), 1.0, 0.0)
    chain, curve = ranking_ceiling(table)
    assert chain == ["a0.h1", "a0.h3", "a0.h2", "a0.h0", "a0.h4"]
    torch.testing.assert_close(curve, optimum_curve(table)[0])


HAND = ExactTable(  # bits: a0.h0 = 1, a0.h1 = 2, m0 = 4
    ["a0.h0", "a0.h1", "m0"],
    torch.tensor([0.0, 0.1, 0.5, 0.6, 0.2, 0.95, 0.7, 1.0], dtype=torch.float64),
    torch.zeros(8, dtype=torch.float64), 1.0, 0.0,
)  # fmt: skip


def test_hand_table_optimum_ceiling_and_k90():
    optimum, sets = optimum_curve(HAND)
    assert optimum.tolist() == [0.0, 0.5, 0.95, 1.0]
    assert sets == [[], ["a0.h1"], ["a0.h0", "m0"], ["a0.h0", "a0.h1", "m0"]]
    chain, curve = ranking_ceiling(HAND)  # sums of f(top_1) + f(top_2): h1, m0 -> 1.2 is best
    assert chain == ["a0.h1", "m0", "a0.h0"] and curve.tolist() == [0.0, 0.5, 0.7, 1.0]
    assert k90_star(HAND) == 2 and minimal_circuit(HAND) == ["a0.h0", "m0"]
    assert k90_star(HAND, 0.4) == 1 and k90_star(HAND, 1.5) is None


def test_mib_areas_by_hand():
    # N = 2, x = 0, 1/2, 1: CPR = ((0 + .5) + (.5 + 1)) / 4, CMD = ((1 + .5) + (.5 + 0)) / 4
    assert mib_areas(torch.tensor([0.0, 0.5, 1.0])) == pytest.approx((0.5, 0.5))
    assert mib_areas(torch.tensor([0.0, 0.25, 1.0])) == pytest.approx((0.375, 0.625))
    cpr, cmd = mib_areas(torch.tensor([0.0, 1.2, 1.0]))  # overshoot counts in CMD
    assert (cpr, cmd) == pytest.approx(((1.2 + 2.2) / 4, (1 + 0.2 + 0.2) / 4))


def test_judge_ranking_by_hand():
    out = judge_ranking(HAND, ["m0", "a0.h0", "a0.h1"])
    assert out["curve"] == [0.0, 0.2, 0.95, 1.0]
    assert out["area_ratio"] == pytest.approx(2.15 / 2.45)
    assert out["ceiling_ratio"] == pytest.approx(2.15 / 2.2)
    assert out["ceiling_ranking"] == ["a0.h1", "m0", "a0.h0"]
    assert (out["cpr"], out["cmd"]) == pytest.approx((3.3 / 6, 2.7 / 6))
    assert (out["ceiling_cpr"], out["ceiling_cmd"]) == pytest.approx(mib_areas(
        torch.tensor([0.0, 0.5, 0.7, 1.0])))  # fmt: skip
    assert (out["k90"], out["k90_star"], out["minimal_circuit"]) == (2, 2, ["a0.h0", "m0"])
    assert out["roc_auc"] == 1.0  # default scores N - rank: m0, a0.h0 above a0.h1
    scores = {"a0.h0": 0.1, "a0.h1": 0.9, "m0": 0.5}
    assert judge_ranking(HAND, ["a0.h1", "m0", "a0.h0"], scores)["roc_auc"] == 0.0
    assert judge_ranking(HAND, ["a0.h1", "m0", "a0.h0"], [0.1, 0.9, 0.5])["roc_auc"] == 0.0
    assert judge_ranking(HAND, ["a0.h1", "a0.h0", "m0"], threshold=1.0)["roc_auc"] is None
    with pytest.raises(ValueError, match="each of the table's nodes"):
        judge_ranking(HAND, ["m0", "a0.h0"])


def test_judge_a_real_table(case):
    *_, table = case
    out = judge_ranking(table, greedy_chain(table))
    assert out["area_ratio"] <= out["ceiling_ratio"] <= 1.0 + 1e-12
    assert out["k90_star"] <= out["k90"] and out["curve"][-1] == 1.0
