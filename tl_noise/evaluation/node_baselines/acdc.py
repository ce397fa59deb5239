"""ACDC-style greedy backward elimination over nodes (Conmy et al., 2023), exact and slow.

Start from every node, ``C_0 = N``; at step ``k`` try removing (mean-ablating, with the
evaluator's means) each remaining node and remove the one that leaves the circuit closest to the
full model,

    v_k = argmin_{v in C_k} |1 - f(C_k \\ {v})|,     C_{k+1} = C_k \\ {v_k}

(``f`` the evaluator's normalised faithfulness; ties go to the earlier node), until one node is
left. ``|1 - f|`` rather than "highest f" because in a random or over-complete model removing a
node can *raise* the metric above the full model's; ACDC's own rule ("remove any node whose
removal changes the metric by less than a threshold tau") also looks at the size of the change.
Here there is no threshold: the exact greedy order of all nodes. The score is the removal step,
``s_{v_k} = k`` (removed first = 0 = least important; the last node left gets ``N - 1``);
``details["path"]`` has ``(node, f after its removal)`` per step.

Cost: the evaluator's set-up (3 forwards) and ``N + (N - 1) + ... + 2 = N (N + 1) / 2 - 1``
circuit evaluations, one forward each (the last removal needs none: it leaves the empty circuit).
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.evaluation.node_baselines.common import NodeScores, Stopwatch, check_data
from tl_noise.evaluation.node_baselines.mean_ablation import evaluator_forwards
from tl_noise.evaluation.nodes import CircuitEvaluator


def acdc_greedy_scores(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    loss_mask: Bool[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    *,
    batch_size: int = 64,
    targets: Int[Tensor, "n pos"] | None = None,
) -> NodeScores:
    """Scores = greedy removal step (module doc); ``corrupted_tokens`` is not used (removal is
    mean ablation, as in the evaluator)."""
    watch = Stopwatch()
    targets = check_data(model, tokens, loss_mask, targets)
    evaluator = CircuitEvaluator(model, tokens, loss_mask, batch_size=batch_size, targets=targets)
    current = list(evaluator.nodes)
    path: list[tuple[str, float]] = []
    while len(current) > 1:
        best, best_f = current[0], float("nan")
        for v in current:
            f = evaluator.faithfulness([u for u in current if u != v])
            if best_f != best_f or abs(1 - f) < abs(1 - best_f):
                best, best_f = v, f
        current.remove(best)
        path.append((best, best_f))
    path.append((current[0], 0.0))  # the empty circuit: f = 0 by definition
    scores = {v: float(k) for k, (v, _) in enumerate(path)}
    scores = {v: scores[v] for v in evaluator.nodes}
    return NodeScores(scores, watch.seconds(), evaluator_forwards(evaluator), {"path": path})
