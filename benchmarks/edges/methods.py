"""The edge methods compared: tl-noise's edge noise (defaults), tl-noise's own edge attribution
patching (mean and resample ablation) and TransformerLens 4.3's edge attribution patching.

Every method returns :class:`EdgeScores`: a score per edge (MIB names, higher = more important),
wall seconds and forward-pass equivalents over the evaluation set (a backward counts 2; one fit
step on ``b`` of ``n`` rows counts ``3 b / n``, as :class:`tl_noise.fitting.FitResult` counts).

* ``tl-noise edge noise``: ``tn.attach_edge_noise(model, calibration_tokens=tokens)`` then
  ``tn.fit(model, noise, tokens, loss_mask=mask)`` with every default; ``-log std`` per edge.
  Forwards: the fit's own count (steps, its end-of-fit curve).
* ``tl-noise edge noise (resample)``: the same fit given the evaluation set's counterfactuals,
  ``tn.fit(..., corrupted_tokens=corrupted)``: an ablated edge moves towards the writer's
  contribution on the counterfactual instead of its mean (one more forward a step).
* ``tl-noise EAP (mean)`` / ``(resample)``: :meth:`~tl_noise.edges.EdgeCircuitEvaluator.
  attribution`, ``|dm/dsigma|`` at ``sigma = 0`` (noising: the gradient at the clean run, the
  ablated value the writer's mean or its contribution on the corrupted input). Forwards: the
  calibration pass + forward + backward (4), + the corrupted pass for resample (5). The seconds
  include the evaluator's two normalisation passes (``m(all)``, ``m(empty)``).
* ``TL EAP (resample)``: :mod:`benchmarks.edges.tl_eap` (denoising: the gradient at the
  corrupted run); natively booted bridges (the zoo) are refused with ``NotImplementedError``,
  which is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

import tl_noise as tn
from benchmarks.edges.tl_eap import tl_edge_attribution
from tl_noise.edges import EdgeCircuitEvaluator


@dataclass
class EdgeScores:
    scores: dict[str, float]
    seconds: float
    forwards: float
    details: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Any, Tensor, Tensor, Tensor], EdgeScores]


def edge_noise(model: Any, tokens: Tensor, mask: Tensor, corrupted: Tensor | None) -> EdgeScores:
    began = time.perf_counter()
    noise = tn.attach_edge_noise(model, calibration_tokens=tokens)
    try:
        result = tn.fit(model, noise, tokens, loss_mask=mask, quiet=True,
                        corrupted_tokens=corrupted)  # fmt: skip
        scores = tn.edge_importance(noise)
    finally:
        noise.remove()
    return EdgeScores(scores, time.perf_counter() - began, float(result.forwards),
                      {"stopped_at": result.stopped_at, "steps": len(result.history)})  # fmt: skip


def edge_noise_mean(model: Any, tokens: Tensor, mask: Tensor, corrupted: Tensor) -> EdgeScores:
    return edge_noise(model, tokens, mask, None)


def tl_noise_eap(ablation: str) -> Method:
    def run(model: Any, tokens: Tensor, mask: Tensor, corrupted: Tensor) -> EdgeScores:
        began = time.perf_counter()
        bad = corrupted if ablation == "resample" else None
        with EdgeCircuitEvaluator(model, tokens, mask, ablation, corrupted_tokens=bad) as ev:
            scores = ev.attribution()
        forwards = 4.0 + (ablation == "resample")
        return EdgeScores(scores, time.perf_counter() - began, forwards)

    return run


def tl_eap(model: Any, tokens: Tensor, mask: Tensor, corrupted: Tensor) -> EdgeScores:
    scores, seconds, forwards = tl_edge_attribution(model, tokens, mask, corrupted)
    return EdgeScores(scores, seconds, forwards)


METHODS: dict[str, Method] = {
    "tl-noise edge noise": edge_noise_mean,
    "tl-noise edge noise (resample)": edge_noise,
    "tl-noise EAP (mean)": tl_noise_eap("mean"),
    "tl-noise EAP (resample)": tl_noise_eap("resample"),
    "TL EAP (resample)": tl_eap,
}
