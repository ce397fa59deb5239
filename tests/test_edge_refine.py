"""The edge ranking refined at the measured circuit sizes (tl_noise.edges.refine): exchanges only
improve the measured sets and touch no other, the refined order survives every reader of it
(edge_importance, saved noise, the run directory), and a bad exchange list is a clear error."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_noise as tn
from tl_noise.edges import EdgeCircuitEvaluator
from tl_noise.edges.circuit import rank_edges
from tl_noise.edges.refine import (
    DEPTH,
    WINDOW,
    apply_swaps,
    eliminate,
    elimination_cost,
    polish_at_sizes,
    refined_scores,
    swaps_between,
)
from tl_noise.errors import RunFileError, TLNoiseValueError
from tl_noise.fitting.edge_curve import curve_sizes
from tl_noise.models import load_embedded_model
from tl_noise.runs import load_run
from tl_noise.zoo import load_benchmark

pytestmark = pytest.mark.tl3


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(12))))
def test_the_exchanges_between_two_rankings_rebuild_the_second(perm):
    ranked = [f"e{i}" for i in range(12)]
    order = [ranked[i] for i in perm]
    swaps = swaps_between(ranked, order)
    assert apply_swaps(ranked, swaps) == order and len(swaps) <= 11


def test_elimination_puts_the_needed_edges_first_wherever_the_noise_ranked_them():
    edges = [f"e{i}" for i in range(30)]
    needed = {"e27", "e28", "e29", "e3"}  # three of them ranked last by the "noise"
    calls = []

    def f(circuit):  # the share of the needed edges kept
        calls.append(1)
        return len(needed & set(circuit)) / len(needed)

    order = eliminate(f, edges, window=5)  # a window wider than the needed set
    assert set(order[:4]) == needed and sorted(order) == sorted(edges)
    assert len(calls) == elimination_cost(30, window=5)


def test_exchanges_improve_each_measured_set_and_no_other():
    rng = random.Random(0)
    edges = [f"e{i}" for i in range(60)]
    weight = {e: rng.random() for e in edges}
    calls = []

    def f(circuit):  # a made-up faithfulness: the share of the weight, capped at 1
        calls.append(list(circuit))
        return min(1.0, sum(weight[e] for e in circuit) / 12)

    start = sorted(edges, key=lambda e: rng.random())
    sizes = [1, 3, 6, 15, 30, 60]
    order, swaps, values = polish_at_sizes(f, start, sizes)
    assert swaps and sorted(order) == sorted(edges) and apply_swaps(start, swaps) == order
    assert len(calls) <= len(sizes) * (1 + DEPTH * WINDOW)
    for k in sizes[:-1]:
        assert values[k] == f(order[:k])
        assert abs(1 - values[k]) <= abs(1 - f(start[:k])) + 1e-12
    levels = [0, *sizes[:-1], len(edges)]
    replay = list(start)
    for promoted, demoted in swaps:  # each exchange crosses one measured size and no other
        i, j = replay.index(demoted), replay.index(promoted)
        crossed = [k for k in levels[1:-1] if i < k <= j]
        assert len(crossed) == 1, (i, j)
        replay[i], replay[j] = promoted, demoted
    assert replay == order


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=3, max_size=12), st.data())
def test_refined_scores_follow_the_exchanges_even_with_ties(values, data):
    edges = [f"e{i}" for i in range(len(values))]
    scores = dict(zip(edges, values, strict=True))
    pairs = st.lists(st.tuples(st.sampled_from(edges), st.sampled_from(edges)), max_size=5)
    swaps = [list(p) for p in data.draw(pairs) if p[0] != p[1]]
    refined = refined_scores(scores, swaps)
    assert list(refined) == edges
    assert rank_edges(refined, edges) == apply_swaps(rank_edges(scores, edges), swaps)
    assert sorted(refined.values(), reverse=True) == pytest.approx(sorted(values, reverse=True))


def test_a_bad_exchange_is_refused():
    with pytest.raises(TLNoiseValueError, match="two edges of the ranking"):
        refined_scores({"a": 1.0, "b": 0.0}, [["a", "nope"]])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model = load_embedded_model()
    tokens = load_benchmark("induction").task(n=32, seed=0).tokens
    folder = tmp_path_factory.mktemp("edge-refine")
    noise = tn.attach_edge_noise(model, calibration_tokens=tokens)
    tn.fit(model, noise, tokens, steps=40, quiet=True, run_dir=folder / "run")
    noise.save(folder / "noise")
    yield model, tokens, noise, folder
    noise.remove()


def test_the_recorded_curve_is_the_faithfulness_of_the_refined_ranking(fitted):
    model, tokens, noise, _ = fitted
    info = noise.ranking_info
    assert isinstance(info["swaps"], list) and "exchanges" in info["method"]
    scores = tn.edge_importance(noise)
    with EdgeCircuitEvaluator(model, tokens[: info["examples"]]) as ev:
        ranked = rank_edges(scores, ev.edges)
        for k, value in zip(info["faithfulness"]["k"], info["faithfulness"]["faithfulness"],
                            strict=True):  # fmt: skip
            assert value == pytest.approx(ev.faithfulness(ranked[:k]), abs=1e-6)
    assert info["faithfulness"]["k"] == curve_sizes(len(ranked))


def test_every_reader_sees_the_refined_order(fitted):
    model, _, noise, folder = fitted
    order = rank_edges(tn.edge_importance(noise), list(noise.graph.locate()))
    run = load_run(folder / "run")
    assert rank_edges(run.edge_scores(), list(noise.graph.locate())) == order
    loaded = tn.NoiseHooks.load(folder / "noise", load_embedded_model())
    try:
        assert rank_edges(tn.edge_importance(loaded), list(noise.graph.locate())) == order
    finally:
        loaded.remove()


def test_a_run_with_malformed_exchanges_is_a_clear_error(fitted, tmp_path):
    _, _, _, folder = fitted
    shutil.copytree(folder / "run", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary["ranking_info"]["swaps"] = [["input->a0.h0<q>", "not an edge"]]
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(RunFileError, match="swaps"):
        load_run(tmp_path / "run").edge_scores()


def test_refinement_off_keeps_the_std_order():
    model = load_embedded_model()
    tokens = load_benchmark("induction").task(n=16, seed=1).tokens
    with tn.attach_edge_noise(model, calibration_tokens=tokens) as noise:
        tn.fit(model, noise, tokens, steps=10, quiet=True, refine_window=0)
        assert noise.ranking_info["swaps"] == []
        assert tn.edge_importance(noise) == noise.edge_scores()
