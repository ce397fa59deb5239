"""Activation patching per node, denoising: the clean activation patched into the corrupted run.

With ``x`` the clean tokens, ``x~`` the counterfactual ones (``corrupted_tokens``, same shape;
resampled rows when None) and ``m(run)`` the evaluator's metric, which always scores the *clean*
next token,

    s_v = m(x~ with a_v <- a_v(x)) - m(x~)

the metric the clean activation of node ``v`` alone restores in the corrupted run (``a_v``: the
node's ``hook_z`` slice or ``hook_mlp_out``, per example and position). Denoising is the
direction of TransformerLens' attribution patching (``(a_clean - a_corrupt) . dm/da`` at the
corrupted run), so :mod:`.attribution_patching` is this method's first-order estimate and the two
are directly comparable. ``absolute=True`` (default) scores ``|s_v|``, as TL and MIB rank
attribution scores; ``details["signed"]`` keeps ``s_v``.

Cost: per batch one clean pass (caching every site), one corrupted pass and one patched pass per
node: ``2 + N`` forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.evaluation.ablation import eval_batches
from tl_noise.evaluation.node_baselines.common import (
    NodeScores,
    Site,
    Stopwatch,
    capture,
    check_data,
    counterfactual,
    n_targets,
    node_sites,
    target_log_probs,
)


def patch_hook(site: Site, node: str, clean: Tensor) -> Callable[..., Tensor]:
    """A forward hook replacing ``node``'s part of ``site`` by ``clean`` (that site's clean
    activation for the same rows)."""
    if not site.per_head:
        return lambda act, hook: clean.to(act.dtype)
    mask = torch.zeros(len(site.nodes), 1, dtype=torch.bool, device=clean.device)
    mask[site.nodes.index(node)] = True
    return lambda z, hook: torch.where(mask, clean.to(z.dtype), z)


@torch.no_grad()
def activation_patching_scores(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    loss_mask: Bool[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    *,
    absolute: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    targets: Int[Tensor, "n pos"] | None = None,
) -> NodeScores:
    """``s_v = m(x~, a_v <- a_v(x)) - m(x~)`` for every node (module doc)."""
    watch = Stopwatch()
    targets = check_data(model, tokens, loss_mask, targets)
    corrupt, source = counterfactual(tokens, corrupted_tokens, seed)
    sites = node_sites(model)
    nodes = [v for s in sites for v in s.nodes]
    device, count = model_device(model), n_targets(loss_mask, targets)
    clean_sum, corrupt_sum = 0.0, 0.0
    patched = dict.fromkeys(nodes, 0.0)
    for index in eval_batches(tokens.shape[0], batch_size):
        x, x_bad, mask, y = (t[index].to(device) for t in (tokens, corrupt, loss_mask, targets))
        logits, acts = capture(model, x, sites)
        clean_sum += float(target_log_probs(logits, y, mask).sum())
        corrupt_sum += float(target_log_probs(model(x_bad), y, mask).sum())
        for site in sites:
            for node in site.nodes:
                hooks = [(site.hook, patch_hook(site, node, acts[site.hook]))]
                logits = model.run_with_hooks(x_bad, fwd_hooks=hooks)
                patched[node] += float(target_log_probs(logits, y, mask).sum())
    corrupt_metric = corrupt_sum / count
    signed = {v: patched[v] / count - corrupt_metric for v in nodes}
    scores = {v: abs(s) for v, s in signed.items()} if absolute else dict(signed)
    details = {"signed": signed, "clean_metric": clean_sum / count,
               "corrupted_metric": corrupt_metric, "corruption": source}  # fmt: skip
    return NodeScores(scores, watch.seconds(), float(2 + len(nodes)), details)
