"""The exact tables shipped with the zoo are what the evaluator computes: a random sample of their
entries is recomputed with plain hooked forwards (CircuitEvaluator)."""

from __future__ import annotations

import random

import pytest

from tl_noise.evaluation.exact import ExactTable
from tl_noise.evaluation.nodes import CircuitEvaluator
from tl_noise.zoo import EVAL_N, EVAL_SEED, exact_table_path, load_benchmark

SHIPPED = [n for n in ("backup", "distractor", "mlp") if exact_table_path(n).is_dir()]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_random_sample_of_the_shipped_table_is_recomputed(name):
    table = ExactTable.load(exact_table_path(name))
    bench = load_benchmark(name)
    task = bench.task(n=EVAL_N, seed=EVAL_SEED)
    evaluator = CircuitEvaluator(bench.model, task.tokens, task.loss_mask, table.nodes)
    assert evaluator.clean_metric == pytest.approx(table.clean_metric, abs=2e-4)
    assert evaluator.empty_metric == pytest.approx(table.empty_metric, abs=2e-4)
    rng = random.Random(f"{name}-sample")
    for _ in range(6):
        subset = [n for n in table.nodes if rng.random() < 0.5]
        assert evaluator.faithfulness(subset) == pytest.approx(table.f_of(subset), abs=2e-4), subset
