"""Subnetwork probing: a learned hard-concrete mask per node (Louizos et al., 2018, L0
regularisation; Cao et al., 2021; the node version of ACDC's baseline), masking by mean-ablation
interpolation.

Each node ``v`` has a logit ``log alpha_v``. Per example a mask is drawn as

    u ~ U(0, 1),   s = sigmoid((log u - log(1 - u) + log alpha_v) / beta),
    m_v = clamp(s (zeta - gamma) + gamma, 0, 1)            (beta = 2/3, gamma = -0.1, zeta = 1.1)

and the node's activation becomes ``a_v' = m_v a_v + (1 - m_v) mu_v`` with ``mu_v`` the
evaluator's mean (:func:`~tl_noise.evaluation.nodes.node_means`), so ``m_v = 0`` is exactly the
evaluator's mean ablation. The expected number of open gates is
``E[L0] = sum_v sigmoid(log alpha_v - beta log(-gamma / zeta))``; with ``rho = E[L0] / N`` the
loss is

    L = task loss (KL to the full model, or -metric; see :mod:`.learned`)
        + l0_weight * (rho - sparsity)^2

a two-sided pull of the expected density towards the sparsity target (the quadratic term of
Edge Pruning's Lagrangian, with a fixed multiplier). Adam, ``steps`` steps on random batches of
``batch_size`` rows. Gates clamped fully open or shut pass no task gradient, so the order among
the nodes that stay open is partly set by how fast their logits grew (a coarse top). The score
is the learned ``log alpha_v`` (monotone in the gate's opening probability).

Cost: the means pass and the reference pass (2 forwards), then ``3 b / n`` per step (forward +
backward on ``b`` of ``n`` rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.evaluation.node_baselines.common import (
    NodeScores,
    Site,
    Stopwatch,
    check_data,
    minibatches,
    node_sites,
)
from tl_noise.evaluation.node_baselines.learned import (
    Reference,
    check_objective,
    optimise,
    task_loss,
)
from tl_noise.evaluation.nodes import node_means

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def sample_mask(log_alpha: Tensor, rows: int, generator: torch.Generator) -> Tensor:
    """Hard-concrete masks ``m: [rows, N]`` in [0, 1] (module doc), reparameterised."""
    shape = (rows, log_alpha.shape[0])
    u = torch.rand(shape, generator=generator, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_density(log_alpha: Tensor) -> Tensor:
    """``rho = E[L0] / N = mean_v P(m_v > 0)``."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).mean()


def mask_hook(site: Site, mask: Tensor, mean: Tensor) -> Callable[..., Tensor]:
    """``a' = m a + (1 - m) mu`` for the site's nodes (``mask: [b, N]``)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        g = site.gate(mask, act)
        return g * act + (1 - g) * mean.to(act.device, act.dtype)

    return hook


def subnetwork_probing_scores(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    loss_mask: Bool[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    *,
    objective: str = "kl",
    steps: int = 300,
    lr: float = 0.1,
    l0_weight: float = 1.0,
    sparsity: float = 0.1,
    init: float = 3.0,
    batch_size: int = 32,
    seed: int = 0,
    targets: Int[Tensor, "n pos"] | None = None,
) -> NodeScores:
    """Scores = learned hard-concrete logits ``log alpha_v`` (module doc); ``corrupted_tokens``
    is not used (the masks interpolate towards the mean)."""
    watch = Stopwatch()
    targets = check_data(model, tokens, loss_mask, targets)
    check_objective(objective)
    sites = node_sites(model)
    nodes = [v for s in sites for v in s.nodes]
    means = node_means(model, tokens, batch_size)
    reference = Reference(model, tokens, loss_mask, targets, batch_size)
    device = model_device(model)
    log_alpha = torch.full((len(nodes),), float(init), device=device, requires_grad=True)
    generator = torch.Generator(device=device).manual_seed(seed)

    def loss_fn(index: Tensor) -> Tensor:
        mask = sample_mask(log_alpha, len(index), generator)
        hooks = [(s.hook, mask_hook(s, mask, means[s.hook])) for s in sites]
        x, m, y = (t[index].to(device) for t in (tokens, loss_mask, targets))
        logits = model.run_with_hooks(x, fwd_hooks=hooks)
        fit = task_loss(objective, logits, y, m, reference.rows(index))
        return fit + l0_weight * (expected_density(log_alpha) - sparsity) ** 2

    batches = minibatches(tokens.shape[0], batch_size, steps, seed)
    losses = optimise(log_alpha, loss_fn, batches, lr)
    scores = {v: float(a) for v, a in zip(nodes, log_alpha.detach().cpu(), strict=True)}
    forwards = 2.0 + sum(3.0 * len(b) / tokens.shape[0] for b in batches)
    details = {"density": float(expected_density(log_alpha.detach())), "losses": losses}
    return NodeScores(scores, watch.seconds(), forwards, details)
