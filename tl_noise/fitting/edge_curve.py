"""At the end of an edge-noise fit: the faithfulness of the top-k edges at a grid of sizes.

The dashboard never loads a model, so what it shows of an edge circuit's faithfulness is measured
here, once: for each size ``k`` of :func:`curve_sizes` (MIB's edge fractions of the graph), the
top ``k`` edges of the fitted ranking are kept and every other edge is mean-ablated
(resample-ablated when the fit was given ``corrupted_tokens``) over the fit's first
``examples`` examples (:class:`~tl_noise.edges.EdgeCircuitEvaluator`), after the ranking is
refined in context (on small graphs by windowed backward elimination,
:func:`tl_noise.edges.refine.eliminate`, then at those sizes by
:func:`tl_noise.edges.refine.polish_at_sizes`; the changes are recorded as
``noise.ranking_info["swaps"]``, which ``tn.edge_importance`` and ``Run.edge_scores`` apply).
The curve is recorded with the noise (``noise.ranking_info["faithfulness"]``) and in the run's
``summary.json``.
"""

from __future__ import annotations

import time
from typing import Any

from tl_noise.edges import EdgeCircuitEvaluator
from tl_noise.edges.circuit import rank_edges
from tl_noise.edges.refine import (
    ELIMINATE_FORWARDS,
    eliminate,
    elimination_cost,
    polish_at_sizes,
    swaps_between,
)
from tl_noise.fitting.callbacks import Callback
from tl_noise.hooks.noise_hooks import CORRUPTED_KEY

EDGE_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The fractions of a graph's edges at which MIB reports faithfulness (CPR, CMD)."""


def curve_sizes(n_edges: int) -> list[int]:
    """Circuit sizes ``round(fraction * n_edges)`` (at least 1) for :data:`EDGE_FRACTIONS`."""
    return sorted({max(1, round(f * n_edges)) for f in EDGE_FRACTIONS})


class EdgeCircuitCurve(Callback):
    """Measure ``f(top_k)`` at :func:`curve_sizes` after the fit (see the module doc)."""

    def __init__(self, examples: int, refine: bool = True) -> None:
        self.examples, self.refine = examples, refine

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        noise = trainer.noise
        if noise.kind != "edges":
            return
        began = time.time()
        data = trainer.data
        n = min(self.examples, len(data))
        uses_metric = trainer.config.objective_name not in ("kl", "ce")
        scores = noise.edge_scores()  # -log std: any earlier fit's exchanges are void
        extras = {k: v[:n] for k, v in data.extras.items()}
        corrupted = extras.pop(CORRUPTED_KEY, None)  # a resample fit: its curve resamples too
        ablation = "mean" if corrupted is None else "resample"
        with EdgeCircuitEvaluator(
            trainer.model, data.tokens[:n], data.mask[:n], ablation=ablation,
            metric=data.metric if uses_metric else None, extras=extras,
            corrupted_tokens=corrupted,
        ) as evaluator:  # fmt: skip
            ranked = rank_edges(scores, evaluator.edges)
            sizes = curve_sizes(len(ranked))
            swaps: list[list[str]] = []
            measured: dict[int, float] = {}
            eliminated = self.refine and elimination_cost(len(ranked)) <= ELIMINATE_FORWARDS
            if eliminated:
                order = eliminate(evaluator.faithfulness, ranked)
                swaps, ranked = swaps_between(ranked, order), order
            if self.refine:
                ranked, exchanges, measured = polish_at_sizes(evaluator.faithfulness, ranked,
                                                              sizes)  # fmt: skip
                swaps += exchanges
            values = [measured.get(k) for k in sizes]
            values = [evaluator.faithfulness(ranked[:k]) if v is None else v
                      for k, v in zip(sizes, values, strict=True)]  # fmt: skip
            forwards = evaluator.forwards
        noise.ranking_info = {
            **(noise.ranking_info or {}),
            "method": "edge noise (-log std per edge)"
            + (", windowed backward elimination" if eliminated else "")
            + (", exchanges at the measured sizes" if self.refine else ""),
            "swaps": swaps,
            "faithfulness": {"k": sizes, "faithfulness": values, "n_edges": len(ranked)},
            "examples": n,
            "ablation": ablation,
            "forwards": forwards,
            "seconds": time.time() - began,
        }
        result.forwards += forwards * n / len(data)
