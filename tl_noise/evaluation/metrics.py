"""Judging a ranking of heads: ROC AUC against known heads, and faithfulness of top-k circuits.

* :func:`roc_auc` / :func:`ground_truth_mask`: how well an importance ranks known circuit heads;
* :func:`faithfulness_curve`: how much of the behaviour the top-``k`` heads keep when all other
  heads are ablated (:mod:`tl_noise.evaluation.ablation`);
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_noise.evaluation.ablation import (
    HeadPatch,
    ablation_values,
    check_head_tensor,
    task_loss,
)
from tl_noise.ranking import head_ranking
from tl_noise.tasks.base import Task


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
