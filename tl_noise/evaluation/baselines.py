"""Baseline head attributions to compare tl-noise with; higher score = more important head.

With ``L`` the task loss (:func:`tl_noise.ablation.task_loss`, lower is better), ``z`` a head's
``hook_z`` on the clean input and ``z~`` on the corrupted input:

* mean ablation: ``s_lh = L(z_lh <- mean z_lh) - L`` (one forward pass over the data per head);
* activation patching (denoising): ``s_lh = (L~ - L~(z~_lh <- z_lh)) / (L~ - L)``, the fraction
  of the clean loss restored by patching the clean head into the corrupted run (one pass per head);
* attribution patching (Nanda, 2023, https://www.neelnanda.io/mechanistic-interpretability/
  attribution-patching): ``s_lh = |sum_{b, p, d} dL/dz_lh * (z_lh - z~_lh)|``, the first-order
  estimate of the change of ``L`` when the head is corrupted (one forward and backward pass).

Without ``corrupted_tokens`` the corruption is resampling: example ``i`` is run on the tokens of
example ``perm[i] != i`` (:func:`tl_noise.ablation.resampled_index`) while the metric still scores
example ``i``. For IOI pass the name-swapped prompts (same shape as the task's tokens).
Each function returns :class:`HeadScores` with the wall time it took, measured inside.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_noise.evaluation.ablation import (
    HeadPatch,
    ablation_values,
    batch_loss,
    eval_batches,
    head_activations,
    model_heads,
    resampled_index,
    task_loss,
    z_hook_name,
)
from tl_noise.tasks.base import Task


class HeadScores(NamedTuple):
    """Per-head importance ``[n_layers, n_heads]`` (higher = more important) and seconds taken."""

    scores: Float[Tensor, "n_layers n_heads"]
    seconds: float


def corrupted_input(
    task: Task, corrupted_tokens: Int[Tensor, "n pos"] | None = None, seed: int = 0
) -> Int[Tensor, "n pos"]:
    """``corrupted_tokens`` checked against the task, or the resampled ``task.tokens[perm]``."""
    if corrupted_tokens is None:
        return task.tokens[resampled_index(len(task), seed)]
    if corrupted_tokens.shape != task.tokens.shape or corrupted_tokens.is_floating_point():
        raise ValueError(
            f"corrupted_tokens must be integer token ids shaped like the task's tokens "
            f"{list(task.tokens.shape)}, got {corrupted_tokens.dtype} "
            f"{list(corrupted_tokens.shape)}"
        )
    return corrupted_tokens


def single_head_losses(
    model: Any,
    task: Task,
    values: dict[int, Tensor],
    tokens: Int[Tensor, "n pos"] | None = None,
    batch_size: int = 32,
) -> Float[Tensor, "n_layers n_heads"]:
    """``L`` with one head at a time replaced by ``values`` (model run on ``tokens``)."""
    n_layers, n_heads = model_heads(model)
    out = torch.empty(n_layers, n_heads)
    for layer in range(n_layers):
        for head in range(n_heads):
            mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
            mask[layer, head] = True
            patch = HeadPatch(model, mask, values)
            out[layer, head] = task_loss(model, task, batch_size, tokens=tokens, patch=patch)
    return out


def mean_ablation_scores(model: Any, task: Task, batch_size: int = 32) -> HeadScores:
    """``s_lh = L(head lh mean-ablated) - L(clean)``; means over the task's examples and
    positions."""
    start = time.perf_counter()
    values = ablation_values(model, task.tokens, "mean", batch_size)
    clean = task_loss(model, task, batch_size)
    scores = single_head_losses(model, task, values, batch_size=batch_size) - clean
    return HeadScores(scores, time.perf_counter() - start)


def activation_patching_scores(
    model: Any,
    task: Task,
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> HeadScores:
    """``s_lh = (L~ - L~(clean z_lh patched in)) / (L~ - L)``: 1 = the head alone restores the
    clean loss, 0 = no effect. ValueError when the corruption does not change ``L``."""
    start = time.perf_counter()
    corrupted = corrupted_input(task, corrupted_tokens, seed)
    clean = task_loss(model, task, batch_size)
    corrupt = task_loss(model, task, batch_size, tokens=corrupted)
    if not abs(corrupt - clean) > 1e-6 * max(1.0, abs(clean)):
        raise ValueError(
            f"the corruption does not change the task loss (clean {clean:.6g}, corrupted "
            f"{corrupt:.6g}); activation patching needs inputs that break the behaviour"
        )
    values = head_activations(model, task.tokens, batch_size=batch_size)
    patched = single_head_losses(model, task, values, tokens=corrupted, batch_size=batch_size)
    return HeadScores((corrupt - patched) / (corrupt - clean), time.perf_counter() - start)


def attribution_patching_scores(
    model: Any,
    task: Task,
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> HeadScores:
    """``s_lh = |sum_{b, p, d} dL/dz_lh * (z_lh - z~_lh)|`` with the gradient of the clean run.

    The gradient reaches every ``hook_z`` through a zero offset ``delta`` added by the hook
    (``z + delta``, ``delta`` requiring grad), so it counts every downstream path (detaching
    ``z`` instead would cut the paths through later heads) and needs no weight to require grad;
    ``torch.autograd.grad`` leaves the weights' ``.grad`` untouched.
    """
    start = time.perf_counter()
    n_layers, n_heads = model_heads(model)
    corrupt = head_activations(model, corrupted_input(task, corrupted_tokens, seed),
                               batch_size=batch_size)  # fmt: skip
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for index in eval_batches(len(task), batch_size):
        zs: dict[int, Tensor] = {}
        deltas: dict[int, Tensor] = {}

        def make(layer: int, zs: dict = zs, deltas: dict = deltas) -> Callable:
            def offset_hook(z: Tensor, hook: Any) -> Tensor:
                zs[layer] = z.detach()
                deltas[layer] = torch.zeros_like(z, requires_grad=True)
                return z + deltas[layer]

            return offset_hook

        hooks = [(z_hook_name(layer), make(layer)) for layer in range(n_layers)]
        with torch.enable_grad():
            loss = batch_loss(model, task, index, fwd_hooks=hooks)
            grads = torch.autograd.grad(loss, [deltas[layer] for layer in range(n_layers)])
        for layer, grad in enumerate(grads):
            diff = zs[layer].double() - corrupt[layer][index].to(grad.device).double()
            total[layer] += (grad.double() * diff).sum((0, 1, 3)).cpu() * len(index)
    scores = (total / len(task)).abs().float()
    return HeadScores(scores, time.perf_counter() - start)
