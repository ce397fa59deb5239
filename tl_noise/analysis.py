"""Turning learned noise into answers, and judging the answers against other methods.

* :func:`head_importance`: ``-log(std)`` per head from fitted noise;
* :func:`roc_auc` / :func:`ground_truth_mask`: how well an importance ranks known circuit heads;
* :func:`faithfulness_curve`: how much of the behaviour the top-``k`` heads keep when all other
  heads are ablated (:mod:`tl_noise.ablation`);
* :func:`compare_methods`: tl-noise next to the baselines of :mod:`tl_noise.baselines` (mean
  ablation, activation patching, attribution patching): AUC, faithfulness, wall time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.ablation import (
    ABLATIONS,
    HeadPatch,
    ablate_heads,
    ablation_values,
    check_head_tensor,
    model_heads,
    task_loss,
)
from tl_noise.baselines import (
    HeadScores,
    activation_patching_scores,
    attribution_patching_scores,
    mean_ablation_scores,
)
from tl_noise.hooks import NoiseHooks
from tl_noise.tasks.base import Task

_LAYER = re.compile(r"blocks\.(\d+)\.")
HEAD_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_result")


def hook_layer(name: str) -> int | None:
    """Layer index of a hook name (``"blocks.3.attn.hook_z"`` -> 3), None outside the blocks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def head_stds(
    stds: dict[str, Tensor], n_layers: int, n_heads: int
) -> Float[Tensor, "n_layers n_heads"]:
    """Per-(layer, head) std: the geometric mean over every per-head hook of that layer.

    Hooks whose std has a leading head axis of size ``n_heads`` (granularity ``head`` or
    ``head_feature`` on ``hook_z``/``hook_q``/...) count; other features of a head are pooled
    geometrically. Layers with no per-head noise are NaN.
    """
    log_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    count = torch.zeros(n_layers, 1, dtype=torch.float64)
    for name, std in stds.items():
        layer = hook_layer(name)
        if layer is None or not name.endswith(HEAD_HOOKS) or std.ndim == 0:
            continue
        if std.shape[0] != n_heads:
            raise ValueError(f"std at {name!r} has shape {list(std.shape)}; expected n_heads first")
        log_sum[layer] += std.double().log().reshape(n_heads, -1).mean(-1)
        count[layer] += 1
    out = (log_sum / count).exp().float()
    out[(count == 0).expand_as(out)] = float("nan")
    return out


def head_importance(
    noise: NoiseHooks | dict[str, Tensor], n_layers: int | None = None, n_heads: int | None = None
) -> Float[Tensor, "n_layers n_heads"]:
    """Importance of each attention head: ``-log(std)`` (higher = more important).

    A head that tolerates only tiny noise (std near the parameterization's minimum) is one the
    behaviour depends on. Accepts attached :class:`NoiseHooks` or a ``stds()`` dict (then give
    ``n_layers`` and ``n_heads``). Heads without per-head noise are NaN.
    """
    if isinstance(noise, NoiseHooks):
        stds = noise.stds()
        n_layers = n_layers or int(noise.model.cfg.n_layers)
        n_heads = n_heads or int(noise.model.cfg.n_heads)
    else:
        stds = noise
        if n_layers is None or n_heads is None:
            raise ValueError("head_importance(stds_dict) needs n_layers and n_heads")
    return -head_stds(stds, n_layers, n_heads).log()


def roc_auc(scores: Float[Tensor, "*n"], labels: Bool[Tensor, "*n"]) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (rank statistic).

    ``AUC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)`` with ``R_+`` the sum of the positives' ranks
    (1-based, tied scores get their average rank), i.e. ``P(s_+ > s_-) + P(s_+ = s_-) / 2`` over
    all positive-negative pairs. Labels: bool or 0/1; both classes must occur.
    """
    s = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
    y = torch.as_tensor(labels).detach().reshape(-1).cpu()
    if s.shape != y.shape:
        raise ValueError(f"scores have {s.numel()} entries, labels {y.numel()}")
    if y.dtype != torch.bool:
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"labels must be bool or 0/1, got values {y.unique().tolist()[:5]}")
        y = y == 1
    if bool(s.isnan().any()):
        raise ValueError(f"scores contain NaN at {s.isnan().nonzero().flatten().tolist()[:8]}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes; got {n_pos} positive and {n_neg} "
                         f"negative labels")  # fmt: skip
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ground_truth_mask(
    ground_truth: Mapping[str, Sequence[Sequence[int]]] | Sequence[Sequence[int]],
    n_layers: int,
    n_heads: int,
) -> Bool[Tensor, "n_layers n_heads"]:
    """True at every ``[layer, head]`` listed in any class of ``ground_truth``.

    ``ground_truth``: ``{"previous_token": [[0, 1]], "induction": [[1, 2], [1, 3]]}`` (as
    ``model.ground_truth`` or a labels JSON) or a plain list of ``[layer, head]`` pairs.
    """
    groups = ground_truth if isinstance(ground_truth, Mapping) else {"heads": ground_truth}
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for name, heads in groups.items():
        for entry in heads:
            pair = isinstance(entry, (list, tuple)) and len(entry) == 2
            if not (pair and all(isinstance(x, int) for x in entry)
                    and 0 <= entry[0] < n_layers and 0 <= entry[1] < n_heads):  # fmt: skip
                raise ValueError(
                    f"ground truth {name!r} entry {entry!r} is not a [layer, head] pair with "
                    f"0 <= layer < {n_layers} and 0 <= head < {n_heads}"
                )
            mask[entry[0], entry[1]] = True
    return mask


def head_ranking(scores: Float[Tensor, "n_layers n_heads"]) -> Tensor:
    """Flat head indices ``[n_layers * n_heads]``, most important first; NaN scores count as
    least important and ties keep the order ``layer * n_heads + head``."""
    flat = scores.detach().reshape(-1).float().cpu().nan_to_num(nan=-math.inf)
    return torch.argsort(flat, descending=True, stable=True)


def top_k_mask(
    scores: Float[Tensor, "n_layers n_heads"], k: int
) -> Bool[Tensor, "n_layers n_heads"]:
    """True at the ``k`` highest-scoring heads (:func:`head_ranking` order)."""
    total = scores.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k={k!r}; expected an int in [0, {total}] (the number of heads)")
    mask = torch.zeros(total, dtype=torch.bool)
    mask[head_ranking(scores)[:k]] = True
    return mask.reshape(scores.shape)


def faithfulness_curve(
    model: Any,
    task: Task,
    scores: Float[Tensor, "n_layers n_heads"],
    ks: Sequence[int] | None = None,
    method: str = "mean",
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Keep the ``k`` highest-scoring heads clean, ablate all others, and measure the task loss.

    ``faithfulness(k) = (L_ablated - L_k) / (L_ablated - L_clean)``: the fraction of the
    behaviour the top-``k`` circuit recovers (1 at ``k = n_heads_total``, 0 at ``k = 0``; the
    loss is lower-is-better). Every ``L_k`` is computed through the same ablation hooks, the clean
    loss without hooks and ``L_ablated`` with every head ablated. ``method``: ``"mean"`` or
    ``"resample"`` (:func:`tl_noise.ablation.ablation_values`, on the task's tokens).

    Returns ``{"method", "ks", "loss", "faithfulness", "clean", "ablated", "ranking"}`` with
    ``ranking`` the ``[layer, head]`` pairs, most important first.
    """
    check_head_tensor(model, scores, "scores")
    total = scores.numel()
    ks = list(range(total + 1)) if ks is None else list(ks)
    masks = [top_k_mask(scores, k) for k in ks]  # validates every k before any model run
    values = ablation_values(model, task.tokens, method, batch_size, seed)

    def loss_keeping(keep: Tensor) -> float:
        return task_loss(model, task, batch_size, patch=HeadPatch(model, ~keep, values))

    clean = task_loss(model, task, batch_size)
    ablated = loss_keeping(torch.zeros(scores.shape, dtype=torch.bool))
    if not abs(ablated - clean) > 1e-9 * max(1.0, abs(clean)):
        raise ValueError(f"{method}-ablating every head leaves the task loss at {clean:.6g}; "
                         "faithfulness is undefined")  # fmt: skip
    losses = [loss_keeping(mask) for mask in masks]
    n_heads = scores.shape[1]
    return {
        "method": method,
        "ks": ks,
        "loss": losses,
        "faithfulness": [(ablated - loss) / (ablated - clean) for loss in losses],
        "clean": clean,
        "ablated": ablated,
        "ranking": [[int(i) // n_heads, int(i) % n_heads] for i in head_ranking(scores)],
    }


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


@contextmanager
def _noise_switched_off(noise: Any):
    # baselines must see the clean model: silence attached noise for the comparison
    if not isinstance(noise, NoiseHooks):
        yield
        return
    saved = {name: layer.mode for name, layer in noise.items()}
    noise.set_mode("off")
    try:
        yield
    finally:
        for name, layer in noise.items():
            layer.mode = saved[name]


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
    with _noise_switched_off(noise_importance):
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


__all__ = [
    "BASELINES",
    "HeadPatch",
    "HeadScores",
    "ablate_heads",
    "activation_patching_scores",
    "attribution_patching_scores",
    "compare_methods",
    "faithfulness_curve",
    "ground_truth_mask",
    "head_importance",
    "head_ranking",
    "head_stds",
    "hook_layer",
    "mean_ablation_scores",
    "roc_auc",
    "task_loss",
    "top_k_mask",
]
