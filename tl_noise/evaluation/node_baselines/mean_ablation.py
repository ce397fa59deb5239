"""Single-node mean ablation: how much the metric drops when only that node is mean-ablated.

With ``m`` the evaluator's metric and ``N`` every node,

    s_v = m(N) - m(N \\ {v})

(:class:`~tl_noise.evaluation.nodes.CircuitEvaluator`: node ``v``'s ``hook_z`` slice or
``hook_mlp_out`` replaced by its mean over every example and position of the evaluation set).
``absolute=True`` scores ``|s_v|`` instead (a node whose ablation *raises* the metric then also
counts as important).

Cost: the evaluator's set-up (the means pass, the full model, every node ablated: 3 forwards) and
one forward per node, ``3 + N`` in all. The means pass is not in ``CircuitEvaluator.forwards``
and is added here.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.evaluation.node_baselines.common import NodeScores, Stopwatch, check_data
from tl_noise.evaluation.nodes import CircuitEvaluator

MEANS_PASSES = 1
"""Forwards of :func:`~tl_noise.evaluation.nodes.node_means`, which the evaluator does not count."""


def evaluator_forwards(evaluator: CircuitEvaluator) -> float:
    """Every forward an evaluator has run, its means pass included."""
    return float(evaluator.forwards + MEANS_PASSES)


def mean_ablation_scores(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    loss_mask: Bool[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    *,
    absolute: bool = False,
    batch_size: int = 64,
    targets: Int[Tensor, "n pos"] | None = None,
) -> NodeScores:
    """``s_v = m(N) - m(N \\ {v})`` for every node ``v`` (module doc); ``corrupted_tokens`` is
    not used (mean ablation needs no counterfactual)."""
    watch = Stopwatch()
    targets = check_data(model, tokens, loss_mask, targets)
    evaluator = CircuitEvaluator(model, tokens, loss_mask, batch_size=batch_size, targets=targets)
    nodes = evaluator.nodes
    signed = {v: evaluator.clean_metric - evaluator.metric([u for u in nodes if u != v])
              for v in nodes}  # fmt: skip
    scores = {v: abs(s) for v, s in signed.items()} if absolute else dict(signed)
    return NodeScores(scores, watch.seconds(), evaluator_forwards(evaluator),
                      {"signed": signed, "clean_metric": evaluator.clean_metric})  # fmt: skip
