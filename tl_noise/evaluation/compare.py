"""tl-noise beside the baselines: one table of AUC, faithfulness and wall time per method."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.evaluation.ablation import ABLATIONS, check_head_tensor, model_heads
from tl_noise.evaluation.baselines import (
    HeadScores,
    activation_patching_scores,
    attribution_patching_scores,
    mean_ablation_scores,
)
from tl_noise.evaluation.metrics import faithfulness_curve, ground_truth_mask, roc_auc
from tl_noise.hooks import NoiseHooks, head_importance
from tl_noise.tasks.base import Task

BASELINES = ("mean ablation", "activation patching", "attribution patching")


def _noise_scores(noise_importance: Any) -> HeadScores:
    if isinstance(noise_importance, HeadScores):
        return noise_importance
    if isinstance(noise_importance, NoiseHooks):
        return HeadScores(head_importance(noise_importance), math.nan)
    if isinstance(noise_importance, Tensor):
        return HeadScores(noise_importance, math.nan)
    if isinstance(getattr(noise_importance, "importance", None), Tensor):  # a train.FitResult
        return HeadScores(noise_importance.importance, float(getattr(noise_importance, "seconds",
                                                                     math.nan)))  # fmt: skip
    raise TypeError(
        f"noise_importance must be a [n_layers, n_heads] tensor, HeadScores, NoiseHooks or a fit "
        f"result with .importance, got {type(noise_importance).__name__}"
    )


def compare_methods(
    model: Any,
    task: Task,
    noise_importance: Any,
    ground_truth: Mapping[str, Sequence[Sequence[int]]] | Bool[Tensor, "n_layers n_heads"],
    k: int | None = None,
    *,
    noise_seconds: float | None = None,
    method: str = "mean",
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    baselines: Sequence[str] = BASELINES,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """tl-noise and the baselines side by side, one row per method.

    Row: ``{"method", "auc", "faithfulness_at_k", "circuit_size", "seconds", "scores"}``: ROC
    AUC of the scores against the ground-truth heads, :func:`faithfulness_curve` at ``k``
    (default: the number of ground-truth heads) with ``method`` ablation, ``k``, wall time
    (tl-noise: ``noise_seconds``, else the fit result's ``seconds``, else NaN) and the scores.

    ``noise_importance``: a ``[n_layers, n_heads]`` importance, :class:`HeadScores`, attached
    :class:`NoiseHooks` (switched off while the baselines run) or a ``tl_noise.fit`` result.
    Any other noise still attached to ``model`` must be removed first.
    """
    n_layers, n_heads = model_heads(model)
    if isinstance(ground_truth, Tensor):
        check_head_tensor(model, ground_truth, "ground_truth")
        truth = ground_truth.bool().cpu()
    else:
        truth = ground_truth_mask(ground_truth, n_layers, n_heads)
    k = int(truth.sum()) if k is None else k
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or method not in ABLATIONS:
        raise ValueError(f"baselines {unknown} / method={method!r}; accepted baselines: "
                         f"{', '.join(BASELINES)}; methods: {', '.join(ABLATIONS)}")  # fmt: skip
    noise = _noise_scores(noise_importance)
    if noise_seconds is not None:
        noise = HeadScores(noise.scores, float(noise_seconds))
    runners: dict[str, Callable[[], HeadScores]] = {
        "tl-noise": lambda: noise,
        "mean ablation": lambda: mean_ablation_scores(model, task, batch_size),
        "activation patching": lambda: activation_patching_scores(
            model, task, corrupted_tokens, batch_size, seed),
        "attribution patching": lambda: attribution_patching_scores(
            model, task, corrupted_tokens, batch_size, seed),
    }  # fmt: skip
    rows = []
    silenced = isinstance(noise_importance, NoiseHooks)
    off = noise_importance.switched_off() if silenced else nullcontext()
    with off:  # the baselines see the clean model
        for name in ["tl-noise", *baselines]:
            scores, seconds = runners[name]()
            check_head_tensor(model, scores, f"{name} scores")
            curve = faithfulness_curve(model, task, scores, [k], method, batch_size, seed)
            rows.append({
                "method": name,
                "auc": roc_auc(scores, truth),
                "faithfulness_at_k": curve["faithfulness"][0],
                "circuit_size": k,
                "seconds": seconds,
                "scores": scores.detach().float().cpu().tolist(),
            })  # fmt: skip
    return rows
