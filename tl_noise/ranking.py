"""From stds to rankings: the one ranking function of the package.

A head's importance is ``-log(std)``: a head that tolerates only tiny noise is one the behaviour
depends on. Rankings sort by importance, most important first; NaN (no noise there) counts as
least important, and ties keep node order (layer, then head), so every view of a run (the
terminal, the dashboard, ``summary.json``) lists tied heads identically.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.names import hook_layer, is_head_hook


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
        if layer is None or not is_head_hook(name) or std.ndim == 0:
            continue
        if std.shape[0] != n_heads:
            raise TLNoiseValueError(
                f"std at {name!r} has shape {list(std.shape)}; expected n_heads first"
            )
        log_sum[layer] += std.double().log().reshape(n_heads, -1).mean(-1)
        count[layer] += 1
    out = (log_sum / count).exp().float()
    out[(count == 0).expand_as(out)] = float("nan")
    return out


def head_ranking(scores: Float[Tensor, "n_layers n_heads"]) -> Int[Tensor, " n"]:
    """Flat head indices ``[n_layers * n_heads]``, most important first; NaN scores count as
    least important and ties keep the order ``layer * n_heads + head``.

    >>> head_ranking(torch.tensor([[1.0, 2.0], [2.0, float("nan")]])).tolist()
    [1, 2, 0, 3]
    """
    flat = scores.detach().reshape(-1).float().cpu().nan_to_num(nan=-math.inf)
    return torch.argsort(flat, descending=True, stable=True)


def rank_heads(importance: Float[Tensor, "n_layers n_heads"] | None) -> list[dict[str, Any]]:
    """Heads in :func:`head_ranking` order (NaN left out): layer, head, importance, std."""
    if importance is None:
        return []
    n_heads = importance.shape[1]
    flat = importance.detach().reshape(-1).float().cpu()
    return [
        {
            "layer": i // n_heads,
            "head": i % n_heads,
            "importance": float(flat[i]),
            "std": math.exp(-float(flat[i])),
        }
        for i in head_ranking(importance).tolist()
        if not math.isnan(flat[i])
    ]
