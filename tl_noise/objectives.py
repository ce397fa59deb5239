"""Training objectives: how large the noise is (noise loss), what behaviour it costs (task loss).

Noise losses act on the stds of every noised unit (concatenated over hooks):

* ``"neg_log_mean"`` (Cloak): ``L_noise = -log(mean(std))``
* ``"neg_mean_log"``: ``L_noise = -mean(log(std))`` (every unit counts geometrically)

Task losses compare the noised model with the clean one at the positions ``loss_mask`` selects:

* ``"kl"`` (default): ``KL(p_clean || p_noised)`` of the next-token distributions, averaged over
  masked positions. Needs no labels; it is what circuit-discovery work measures.
* ``"ce"``: cross-entropy of the true next token, ``-log p_noised(tokens[t+1])`` at masked ``t``.
* ``"metric"``: the task's own metric (e.g. negative IO-S logit difference), or any callable
  ``metric(logits, batch) -> scalar`` passed as ``objective``.

The three ways of combining them (``composite``, ``alphaless``, ``budget``) live in
:mod:`tl_noise.train`, which needs the two gradients separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

NOISE_LOSSES = ("neg_log_mean", "neg_mean_log")
OBJECTIVES = ("kl", "ce", "metric")


def _flat_stds(stds: Sequence[Tensor], masks: Sequence[Tensor | None] | None) -> Tensor:
    if not stds:
        raise ValueError("the noise loss needs at least one std tensor (no noise is attached)")
    parts = []
    for i, std in enumerate(stds):
        mask = masks[i] if masks is not None else None
        parts.append((std[mask] if mask is not None else std).reshape(-1).float())
    flat = torch.cat(parts)
    if flat.numel() == 0:
        raise ValueError("the noise-loss mask selects no unit")
    return flat


def noise_loss(
    stds: Sequence[Tensor], kind: str = "neg_log_mean", masks: Sequence[Tensor | None] | None = None
) -> Float[Tensor, ""]:
    """Noise loss over all noised units (``masks[i]``: bool, same shape as ``stds[i]``).

    ``neg_log_mean``: ``-log(mean(std))``; ``neg_mean_log``: ``-mean(log(std))``.
    """
    flat = _flat_stds(stds, masks)
    if kind == "neg_log_mean":
        return -flat.mean().log()
    if kind == "neg_mean_log":
        return -flat.clamp_min(torch.finfo(flat.dtype).tiny).log().mean()
    raise ValueError(f"noise_loss kind={kind!r}; accepted: {', '.join(NOISE_LOSSES)}")


def next_token_mask(loss_mask: Bool[Tensor, "b pos"]) -> Bool[Tensor, "b pos"]:
    """The mask without the last position, which has no next token (for cross-entropy)."""
    mask = loss_mask.clone()
    mask[:, -1] = False
    return mask


def kl_divergence(
    clean_log_probs: Float[Tensor, "m vocab"], noised_logits: Float[Tensor, "m vocab"]
) -> Float[Tensor, ""]:
    """Mean over rows of ``KL(p_clean || p_noised) = sum_v p_c (log p_c - log p_n)``."""
    noised = F.log_softmax(noised_logits.float(), dim=-1)
    clean = clean_log_probs.float()
    return (clean.exp() * (clean - noised)).sum(-1).mean()


def cross_entropy(
    logits: Float[Tensor, "b pos vocab"],
    tokens: Int[Tensor, "b pos"],
    loss_mask: Bool[Tensor, "b pos"],
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy at masked positions ``t`` (target ``tokens[:, t+1]``)."""
    mask = next_token_mask(loss_mask)[:, :-1]
    if not mask.any():
        raise ValueError("loss_mask selects no position with a next token")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return nll[mask].mean()


def resolve_objective(
    objective: str | Callable, task_metric: Callable | None
) -> tuple[str, Callable | None]:
    """Validate ``objective``; returns ``(kind, metric_fn)``."""
    if callable(objective):
        return "metric", objective
    if objective not in OBJECTIVES:
        raise ValueError(
            f"objective={objective!r}; accepted: {', '.join(OBJECTIVES)} or a callable"
        )
    if objective == "metric":
        if task_metric is None:
            raise ValueError(
                "objective='metric' needs a metric (pass metric=... or a task with one)"
            )
        return "metric", task_metric
    return objective, None


__all__ = [
    "NOISE_LOSSES",
    "OBJECTIVES",
    "cross_entropy",
    "kl_divergence",
    "next_token_mask",
    "noise_loss",
    "resolve_objective",
]
