"""Attribution patching per node (Nanda 2023; Syed et al. 2023), denoising, with counterfactuals.

The first-order estimate of :mod:`.activation_patching`'s ``s_v``: with ``a_v`` node ``v``'s
activation (a head's ``hook_z`` slice ``[pos, d_head]``, an MLP's ``hook_mlp_out``
``[pos, d_model]``), ``x`` the clean and ``x~`` the counterfactual tokens,

    s_v = sum_{i, t, d} (a_v(x) - a_v(x~))[i, t, d] * dm/da_v[i, t, d] |_{x~}

with the gradient of the evaluator's metric ``m`` (clean next token, mean over the target
positions) taken at the *corrupted* run. ``absolute=True`` (default) scores ``|s_v|``.

**TransformerLens 4.3** ships this as (3.9 ships an earlier, node-only version of the same
module, with the same node API and result; it works on ``HookedTransformer`` too)
``transformer_lens.tools.analysis.attribution_patching.attribution_patch(model, clean, corrupt,
metric_fn, EdgeAttributionConfig(granularity="node"))``: per clean/corrupt *pair* (row) one
clean forward (activations only) and one corrupted forward + backward (backward hooks on
``hook_embed``, ``blocks.{l}.attn.hook_z``, ``blocks.{l}.hook_mlp_out``); ``metric_fn`` maps
that row's logits ``[1, pos, vocab]`` to a scalar. It returns an ``AttributionResult`` whose
``node_scores`` are keyed by ``Node(kind, position, layer, head)`` (kinds ``"embed"``,
``"attn_head_out"``, ``"mlp_out"``; one node per position) with the signed
``(a_clean - a_corrupt) . g`` averaged over the rows. :func:`tl_attribution_patching` calls it
once per row with ``metric_fn`` = that row's share of ``m`` (its target log-probs summed, over
``|T|``), sums the scores over rows and positions and drops the embedding nodes, which gives
exactly ``s_v`` above. The tool needs autograd to reach the hook points and this package's
models are frozen, so every parameter's ``requires_grad`` is switched on for the call and
restored after (the tool uses ``torch.autograd.grad``: no ``.grad`` is written).

:func:`private_attribution_patching` computes the same batched, on TransformerLens 3.x and 4.x:
the gradient reaches each site through a zero offset ``delta`` added by its hook
(``a + delta``), which needs no weight to require grad. ``"attribution patching (TL)"`` uses the
TL tool where it exists (4.3, 3.9) and falls back to the private one (older 3.x;
``details["backend"]`` says which ran); it also
uses the private one on attention-only models, which TL's node graph refuses (it requires
``blocks.{l}.hook_mlp_out`` in every layer).

The two agree to float rounding (``tests/test_node_baselines.py``; on a 15-node random model the
largest relative difference of the signed scores is ~1e-6): TL differentiates per row through
backward hooks on the hook points, ours per batch through the offsets, and the sum of TL's
per-row scores equals our pooled sum because ``metric_fn`` already carries the ``1 / |T|``.
TL's tool also requires the model in eval mode (it raises otherwise).

Cost either way: one clean forward, one corrupted forward and one backward: 4 forwards.
"""

from __future__ import annotations

import importlib.util
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
    target_mask,
)
from tl_noise.evaluation.nodes import has_mlps
from tl_noise.names import head_node, mlp_node

TL_TOOL = "transformer_lens.tools.analysis.attribution_patching"
FORWARDS = 4.0  # clean forward + corrupted forward + backward (2)


def tl_tool_available() -> bool:
    """True where TransformerLens ships node-level attribution patching (4.3; 3.9 too)."""
    try:
        return importlib.util.find_spec(TL_TOOL) is not None
    except ModuleNotFoundError:
        return False


def _result(signed: dict[str, float], absolute: bool, watch: Stopwatch, forwards: float,
            **details: Any) -> NodeScores:  # fmt: skip
    scores = {v: abs(s) for v, s in signed.items()} if absolute else dict(signed)
    return NodeScores(scores, watch.seconds(), forwards, {"signed": signed, **details})


def _batch_attribution(model: Any, sites: list[Site], x: Tensor, x_bad: Tensor, mask: Tensor,
                       y: Tensor, count: int) -> dict[str, Tensor]:  # fmt: skip
    """Per site, ``sum (a(x) - a(x~)) * dm_B/da |x~`` per node (float64, ``[n_nodes]``), with
    ``m_B`` the batch's share of the metric."""
    _, clean = capture(model, x, sites)
    acts: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}

    def offset(name: str) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            acts[name] = act.detach()
            deltas[name] = torch.zeros_like(act, requires_grad=True)
            return act + deltas[name]

        return hook

    with torch.enable_grad():
        logits = model.run_with_hooks(x_bad, fwd_hooks=[(s.hook, offset(s.hook)) for s in sites])
        metric = target_log_probs(logits, y, mask).sum() / count
        grads = torch.autograd.grad(metric, [deltas[s.hook] for s in sites], allow_unused=True)
    out = {}
    for site, grad in zip(sites, grads, strict=True):
        if grad is None:  # the metric does not depend on this site at all
            out[site.hook] = torch.zeros(len(site.nodes), dtype=torch.float64)
            continue
        prod = (clean[site.hook].double() - acts[site.hook].double()) * grad.double()
        out[site.hook] = (prod.sum((0, 1, 3)) if site.per_head else prod.sum()[None]).cpu()
    return out


def private_attribution_patching(
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
    """``s_v`` of the module doc, batched, gradients through zero offsets (3.x and 4.x)."""
    watch = Stopwatch()
    targets = check_data(model, tokens, loss_mask, targets)
    corrupt, source = counterfactual(tokens, corrupted_tokens, seed)
    sites = node_sites(model)
    device, count = model_device(model), n_targets(loss_mask, targets)
    totals = {s.hook: torch.zeros(len(s.nodes), dtype=torch.float64) for s in sites}
    for index in eval_batches(tokens.shape[0], batch_size):
        x, x_bad, mask, y = (t[index].to(device) for t in (tokens, corrupt, loss_mask, targets))
        for hook, value in _batch_attribution(model, sites, x, x_bad, mask, y, count).items():
            totals[hook] += value
    signed = {v: float(totals[s.hook][j]) for s in sites for j, v in enumerate(s.nodes)}
    return _result(signed, absolute, watch, FORWARDS, backend="private", corruption=source)


def _node_name(node: Any) -> str | None:
    """Our name of a TL ``Node`` (None for the embedding)."""
    if node.kind == "attn_head_out":
        return head_node(int(node.layer), int(node.head))
    if node.kind == "mlp_out":
        return mlp_node(int(node.layer))
    return None


def _tl_signed(model: Any, tokens: Tensor, loss_mask: Tensor, corrupt: Tensor,
               targets: Tensor) -> tuple[dict[str, float], float]:  # fmt: skip
    """Signed scores from TL's ``attribution_patch`` (one call per row) and the forwards."""
    tool = importlib.import_module(TL_TOOL)
    config = tool.EdgeAttributionConfig(granularity="node")
    nodes = [v for s in node_sites(model) for v in s.nodes]
    signed = dict.fromkeys(nodes, 0.0)
    device, count, n = model_device(model), n_targets(loss_mask, targets), tokens.shape[0]
    counted = target_mask(loss_mask, targets)
    rows = [i for i in range(n) if bool(counted[i].any())]  # a row without targets adds 0
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in rows:
                x, mask = tokens[i : i + 1].to(device), loss_mask[i : i + 1].to(device)
                y = targets[i : i + 1].to(device)

                def metric_fn(logits: Tensor, y: Tensor = y, mask: Tensor = mask) -> Tensor:
                    return target_log_probs(logits, y, mask).sum() / count

                result = tool.attribution_patch(model, x, corrupt[i : i + 1].to(device),
                                                metric_fn, config)  # fmt: skip
                for node, score in result.node_scores.items():
                    name = _node_name(node)
                    if name is not None:
                        signed[name] += float(score)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return signed, FORWARDS * len(rows) / n


def tl_attribution_patching(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    loss_mask: Bool[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
    *,
    absolute: bool = True,
    seed: int = 0,
    targets: Int[Tensor, "n pos"] | None = None,
) -> NodeScores:
    """``s_v`` of the module doc from TransformerLens' own tool (ImportError where it is
    missing: use :func:`attribution_patching` to fall back)."""
    watch = Stopwatch()
    targets = check_data(model, tokens, loss_mask, targets)
    if not tl_tool_available():
        raise ImportError(f"{TL_TOOL} is not available in this TransformerLens")
    corrupt, source = counterfactual(tokens, corrupted_tokens, seed)
    signed, forwards = _tl_signed(model, tokens, loss_mask, corrupt, targets)
    return _result(signed, absolute, watch, forwards, backend="tl", corruption=source)


def attribution_patching_scores(
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
    """TL's attribution patching where it exists (4.3, 3.9) and applies (its node graph requires
    every layer's ``hook_mlp_out``: attention-only models get the private one too), the private
    one otherwise."""
    if tl_tool_available() and has_mlps(model):
        return tl_attribution_patching(model, tokens, loss_mask, corrupted_tokens,
                                       absolute=absolute, seed=seed, targets=targets)  # fmt: skip
    return private_attribution_patching(model, tokens, loss_mask, corrupted_tokens,
                                        absolute=absolute, batch_size=batch_size,
                                        seed=seed, targets=targets)  # fmt: skip
