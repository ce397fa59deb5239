"""IBCircuit per node (Bian et al., ICML 2025): an information bottleneck on every node.

Each node ``v`` has one parameter ``w_v`` (initialised at 5), ``lam_v = sigmoid(w_v)``, and its
activation is replaced by a draw that keeps a fraction ``lam_v`` of it:

    a_v' = lam_v a_v + (1 - lam_v) mu_v + (1 - lam_v) sd_v eps,     eps ~ N(0, I)

with ``mu_v`` the evaluator's per-feature mean (:func:`~tl_noise.evaluation.nodes.node_means`)
and ``sd_v`` the per-feature standard deviation over every example and position (FORMULAS
section 7: ``lam_v = 0`` is a Gaussian resample-ablation of the node). In standardised units
``(a_v' - mu_v) / sd_v ~ N(m, v)`` with ``m = lam_v (a_v - mu_v) / sd_v`` and
``v = (1 - lam_v)^2``, and the information the node passes on is bounded by the capacity

    C_v = mean_{examples, positions, features} KL(N(m, v) || N(0, 1))
        = mean 0.5 (m^2 + v - 1 - log v)

(IBA, Schulz et al. 2020). Features that never vary (``sd = 0``) carry nothing: their ``m`` is 0
and their noise 0. The loss is

    L = beta * KL(full model || noised model) + capacity * mean_v C_v

(the KL at the target positions, :mod:`.learned`; ``objective="logprob"`` uses ``-metric``), Adam
for ``steps`` steps. A node the behaviour needs keeps ``lam_v`` near 1 against the capacity
pressure. The score is ``w_v = logit(lam_v)``: the same order as ``-(1 - lam_v)`` without the
float ties of a saturated sigmoid; ``details["lam"]`` has ``lam_v``.

Cost: the means pass and one pass for the standard deviations and the reference distributions
(2 forwards), then ``3 b / n`` per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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

DEAD_SD = 1e-6
"""Relative to the feature's mean magnitude (at least 1): below it a feature counts as constant."""


def variance_hooks(means: dict[str, Tensor], sums: dict[str, Tensor]) -> list[tuple[str, Any]]:
    """Hooks adding ``sum (a - mu)^2`` (float64) into ``sums`` per hook."""

    def add(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            dev = (act.detach().double() - means[name].to(act.device).double()) ** 2
            sums[name] = sums[name] + dev.sum((0, 1)) if name in sums else dev.sum((0, 1))

        return hook

    return [(name, add(name)) for name in means]


def bottleneck_hook(
    site: Site, lam: Tensor, log_v: Tensor, mean: Tensor, sd: Tensor,
    capacity: list[Tensor], generator: torch.Generator,
) -> Callable[..., Tensor]:  # fmt: skip
    """``a' = lam a + (1 - lam)(mu + sd eps)``; appends the site's per-node ``C_v`` to
    ``capacity`` (``lam``, ``log_v = log (1 - lam)^2``: ``[1, N]``)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        mu, s = mean.to(act.device, act.dtype), sd.to(act.device, act.dtype)
        g = site.gate(lam, act)
        eps = torch.randn(act.shape, generator=generator, device=act.device, dtype=act.dtype)
        live = s > DEAD_SD * mu.abs().clamp_min(1.0)
        m = torch.where(live, g * (act - mu) / torch.where(live, s, 1.0), 0.0)
        lv = site.gate(log_v, act)
        kl = 0.5 * (m**2 + lv.exp() - 1 - lv)  # [b, pos, n_heads, d] or [b, pos, d]
        capacity.append(kl.mean((0, 1, 3)) if site.per_head else kl.mean()[None])
        return g * act + (1 - g) * (mu + torch.where(live, s, 0.0) * eps)

    return hook


def ibcircuit_scores(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    loss_mask: Bool[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    *,
    objective: str = "kl",
    steps: int = 300,
    lr: float = 0.1,
    beta: float = 10.0,
    capacity: float = 1.0,
    init: float = 5.0,
    batch_size: int = 32,
    seed: int = 0,
    targets: Int[Tensor, "n pos"] | None = None,
) -> NodeScores:
    """Scores = ``w_v = logit(lam_v)`` after fitting the bottleneck (module doc);
    ``corrupted_tokens`` is not used (the noise is drawn from each node's own marginal)."""
    watch = Stopwatch()
    targets = check_data(model, tokens, loss_mask, targets)
    check_objective(objective)
    sites = node_sites(model)
    nodes = [v for s in sites for v in s.nodes]
    means = node_means(model, tokens, batch_size)
    sums: dict[str, Tensor] = {}
    reference = Reference(
        model, tokens, loss_mask, targets, batch_size, variance_hooks(means, sums)
    )
    count = tokens.shape[0] * tokens.shape[1]
    sds = {name: (sums[name] / count).sqrt().float() for name in means}
    device = model_device(model)
    w = torch.full((len(nodes),), float(init), device=device, requires_grad=True)
    generator = torch.Generator(device=device).manual_seed(seed)  # noise on the model's device

    def loss_fn(index: Tensor) -> Tensor:
        lam, log_v = torch.sigmoid(w)[None], 2 * F.logsigmoid(-w)[None]
        caps: list[Tensor] = []
        hooks = [(s.hook, bottleneck_hook(s, lam, log_v, means[s.hook], sds[s.hook], caps,
                                          generator)) for s in sites]  # fmt: skip
        x, m, y = (t[index].to(device) for t in (tokens, loss_mask, targets))
        logits = model.run_with_hooks(x, fwd_hooks=hooks)
        fit = task_loss(objective, logits, y, m, reference.rows(index))
        return beta * fit + capacity * torch.cat(caps).mean()

    batches = minibatches(tokens.shape[0], batch_size, steps, seed)
    losses = optimise(w, loss_fn, batches, lr)
    final = w.detach().cpu()
    scores = {v: float(x) for v, x in zip(nodes, final, strict=True)}
    lam = {v: float(x) for v, x in zip(nodes, torch.sigmoid(final), strict=True)}
    forwards = 2.0 + sum(3.0 * len(b) / tokens.shape[0] for b in batches)
    return NodeScores(scores, watch.seconds(), forwards, {"lam": lam, "losses": losses})
