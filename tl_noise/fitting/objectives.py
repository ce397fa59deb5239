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
:mod:`tl_noise.fitting.trainer`, which needs the two gradients separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def _acc(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _row_blocks(probs: Sequence[Tensor], width: int, device: torch.device):
    """``(row slice, probs block)`` over the concatenated rows of ``probs``, in blocks small
    enough to stay in cache on the CPU (one block per piece on an accelerator)."""
    rows_per_block = max(1, 2**18 // max(1, width)) if device.type == "cpu" else 2**62
    row = 0
    for piece in probs:
        for start in range(0, piece.shape[0], rows_per_block):
            block = piece[start : start + rows_per_block]
            yield slice(row + start, row + start + block.shape[0]), block
        row += piece.shape[0]


class _KLFromProbs(torch.autograd.Function):
    """Mean ``KL(p || softmax(z))`` from cached ``p`` and ``sum p log p``, one big buffer.

    Forward: ``lsm = log_softmax(z)`` (float32) and the row sums ``sum_v p lsm`` (accumulated in
    float64, block by block); backward turns the saved ``lsm`` into ``(softmax(z) - p) * g / m``
    in place. Nothing the size of the logits is allocated besides ``lsm``, the logits are not
    kept (the caller may free them before the backward), and ``p`` may come as several row
    blocks (the per-example pieces of a cache), which are never concatenated.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, neg_entropy: Tensor, *probs: Tensor) -> Tensor:
        lsm = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        if sum(p.shape[0] for p in probs) != lsm.shape[0]:
            raise ValueError(
                f"the clean distributions have {sum(p.shape[0] for p in probs)} rows, the "
                f"logits {lsm.shape[0]}"
            )
        cross = torch.cat(
            [
                (block * lsm[rows]).sum(-1, dtype=_acc(lsm.device))
                for rows, block in _row_blocks(probs, lsm.shape[-1], lsm.device)
            ]
        )
        ctx.lsm, ctx.dtype = lsm, logits.dtype
        ctx.save_for_backward(*probs)
        return (neg_entropy.to(cross.dtype) - cross).mean().float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        lsm = ctx.lsm
        if lsm is None:
            raise RuntimeError(
                "kl_divergence_from_probs: its graph was already backpropagated once (the "
                "buffer is reused for the gradient); compute the loss again"
            )
        ctx.lsm = None
        scale = grad / lsm.shape[0]
        for rows, block in _row_blocks(ctx.saved_tensors, lsm.shape[-1], lsm.device):
            lsm[rows].exp_().sub_(block).mul_(scale)  # (softmax(z) - p) * g / m, in place
        return (lsm.to(ctx.dtype), None, *([None] * len(ctx.saved_tensors)))


def kl_divergence_from_probs(
    clean_probs: Tensor | Sequence[Tensor],
    clean_neg_entropy: Float[Tensor, " m"],
    noised_logits: Float[Tensor, "m vocab"],
) -> Float[Tensor, ""]:
    """:func:`kl_divergence` from the clean *probabilities* and ``sum_v p_c log p_c`` per row.

    ``KL = sum_v p_c log p_c - sum_v p_c log p_n``: the first term is fixed by the clean run, so
    a training step pays for one ``log_softmax`` of the noised logits and one dot per row (no
    ``exp`` of the clean distribution, no elementwise difference tensor), and its backward reuses
    the ``log_softmax`` buffer for the gradient ``(p_n - p_c) / m``. ``clean_probs`` may be a list
    of row blocks (concatenated along rows, never copied). The graph can be backpropagated once.
    """
    pieces = [clean_probs] if isinstance(clean_probs, Tensor) else list(clean_probs)
    pieces = [p.to(device=noised_logits.device, dtype=torch.float32) for p in pieces]
    return _KLFromProbs.apply(noised_logits, clean_neg_entropy.to(noised_logits.device), *pieces)


@torch.no_grad()
def clean_distribution(logits: Float[Tensor, "m vocab"]) -> tuple[Tensor, Tensor]:
    """``(p, sum_v p log p)`` of clean logits: float32 probabilities and float64 row sums
    (float32 on MPS), the inputs of :func:`kl_divergence_from_probs`."""
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    low = torch.finfo(torch.float32).min  # where p underflows to 0, 0 * -inf would be nan
    neg_entropy = torch.cat(
        [
            (block.exp() * block.clamp_min(low)).sum(-1, dtype=_acc(block.device))
            for _, block in _row_blocks([log_probs], log_probs.shape[-1], log_probs.device)
        ]
    )
    return log_probs.exp_(), neg_entropy  # p in the buffer of log p: no second full tensor


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
    "clean_distribution",
    "cross_entropy",
    "kl_divergence",
    "kl_divergence_from_probs",
    "next_token_mask",
    "noise_loss",
    "resolve_objective",
]
