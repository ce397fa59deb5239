"""Insertion moves after the in-context refinement (tl_noise.fitting.refine.polish_ranking):
every accepted move raises the summed metric of the prefixes, the budget holds, and on a shipped
exact table they close the gap between greedy elimination and the best single ranking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_noise.evaluation import exact
from tl_noise.fitting.refine import POLISH_WINDOW, polish_ranking
from tl_noise.zoo import exact_table_path


class TableMetric:
    """``m(C)`` read off a table of every subset (bitmask over ``nodes``), counting forwards."""

    def __init__(self, nodes: list[str], values: list[float]) -> None:
        self.nodes, self.values, self.forwards = nodes, values, 0

    def __call__(self, keep) -> float:
        self.forwards += 1
        return self.values[sum(1 << self.nodes.index(n) for n in keep)]


def area(metric: TableMetric, ranking: list[str]) -> float:
    return sum(metric.values[sum(1 << metric.nodes.index(n) for n in ranking[:k])]
               for k in range(len(ranking) + 1))  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.floats(-5, 5), min_size=2**n, max_size=2**n),
                        st.permutations(range(n)))))  # fmt: skip
def test_moves_only_raise_the_area_and_keep_a_permutation(case):
    n, values, order = case
    nodes = [f"a0.h{i}" for i in range(n)]
    start = [nodes[i] for i in order]
    metric = TableMetric(nodes, values)
    ranking, moves, forwards = polish_ranking(metric, start)
    assert sorted(ranking) == sorted(nodes)
    assert area(metric, ranking) >= area(metric, start) - 1e-9
    assert forwards == metric.forwards
    for node, frm, to in moves:
        assert to < frm < to + POLISH_WINDOW and node in nodes


def test_a_helpful_move_is_found_and_the_budget_holds():
    nodes = ["a", "b", "c", "d"]
    # m grows with how many of {c, d} are kept: the best ranking starts with c, d
    values = [sum(bool(mask >> i & 1) for i in (2, 3)) + 0.1 * bin(mask).count("1")
              for mask in range(16)]  # fmt: skip
    ranking, moves, _ = polish_ranking(TableMetric(nodes, values), nodes)
    assert ranking[:2] == ["c", "d"] and moves
    metric = TableMetric(nodes, values)
    polish_ranking(metric, nodes, budget=3)
    assert metric.forwards <= 3 + POLISH_WINDOW * (POLISH_WINDOW - 1) // 2


@pytest.mark.parametrize("name, reaches_ceiling", [("distractor", True), ("backup", False)])
def test_on_shipped_tables_greedy_elimination_is_lifted(name, reaches_ceiling):
    """Moves are local: on distractor they lift exact greedy elimination to the best single
    ranking; on backup greedy's early removals are out of their reach (it gains little)."""
    table = exact.ExactTable.load(exact_table_path(name))
    metric = TableMetric(table.nodes, table.metric.tolist())
    # exact greedy backward elimination (what the refinement does with window N)
    kept, removed = list(table.nodes), []
    while len(kept) > 1:
        best = max(kept, key=lambda c: metric([n for n in kept if n != c]))
        kept.remove(best)
        removed.append(best)
    greedy = kept + removed[::-1]
    polished, _, _ = polish_ranking(metric, greedy)
    ceiling = exact.judge_ranking(table, exact.ranking_ceiling(table)[0])["area_ratio"]
    before = exact.judge_ranking(table, greedy)["area_ratio"]
    after = exact.judge_ranking(table, polished)["area_ratio"]
    assert after > before, (before, after)
    assert (after >= ceiling - 0.002) == reaches_ceiling, (before, after, ceiling)


def test_every_prefix_set_is_evaluated_once():
    nodes = [f"a0.h{i}" for i in range(5)]
    metric = TableMetric(nodes, [float(bin(m).count("1")) for m in range(32)])
    polish_ranking(metric, nodes, passes=3)
    sets = {frozenset(c) for k in range(6) for c in itertools.combinations(nodes, k)}
    assert metric.forwards <= len(sets)
