"""TransformerLens' edge attribution patching against tl-noise's own, on the same clean/corrupted
pairs (the models where TL's tool runs).

TL's estimate is denoising, ``(c_w(x) - c_w(x~)) . dm/dx_r`` at the corrupted run ``x~``;
tl-noise's ``EdgeCircuitEvaluator.attribution`` (resample) noising, ``(c_w(x~) - c_w(x)) .
dm/dx_r`` at the clean run: the same first-order quantity expanded around different runs, so
they agree where the metric is close to linear between the two runs and differ where it is not.
Run with the roles swapped (the evaluator on ``x~``, patched from ``x``, its metric the clean
tokens' log-probabilities as TL's ``metric_fn``), tl-noise's computation is TL's definition:
``swapped_max_abs_diff`` is then float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tl_noise.edges import EdgeCircuitEvaluator
from tl_noise.evaluation.node_baselines.common import n_targets, target_log_probs
from tl_noise.hooks.targets import next_token_targets


def _ranks(x: Tensor) -> Tensor:
    return x.argsort().argsort().double()


def correlations(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Pearson and Spearman (no tie correction) correlations of two edge scorings."""
    edges = sorted(a)
    x = torch.tensor([a[e] for e in edges], dtype=torch.float64)
    y = torch.tensor([b[e] for e in edges], dtype=torch.float64)
    pearson = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([_ranks(x), _ranks(y)]))[0, 1])
    return {"pearson": pearson, "spearman": spearman}


def swapped_attribution(
    model: Any, clean: Tensor, corrupted: Tensor, mask: Tensor
) -> dict[str, float]:
    """tl-noise's edge attribution with the roles swapped: TL's definition (module doc)."""
    n, count = clean.shape[0], n_targets(mask, next_token_targets(clean))

    def metric(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        logp = target_log_probs(logits, next_token_targets(batch["clean"]), batch["loss_mask"])
        return -logp.sum() * n / (count * len(batch["index"]))

    with EdgeCircuitEvaluator(model, corrupted, mask, "resample", corrupted_tokens=clean,
                              metric=metric, extras={"clean": clean}) as evaluator:  # fmt: skip
        return evaluator.attribution()


def cross_check(
    model: Any,
    clean: Tensor,
    corrupted: Tensor,
    mask: Tensor,
    tl_scores: Mapping[str, float],
    ours: Mapping[str, float],
) -> dict[str, Any]:
    """Correlations in their own orientations and with the roles swapped (see the module doc)."""
    swapped = swapped_attribution(model, clean, corrupted, mask)
    scale = max(abs(v) for v in tl_scores.values())
    diff = max(abs(swapped[e] - abs(tl_scores[e])) for e in tl_scores)
    return {"own_orientations": correlations(tl_scores, ours),
            "swapped_max_abs_diff": diff, "tl_max_score": scale,
            "swapped": correlations(tl_scores, swapped)}  # fmt: skip
