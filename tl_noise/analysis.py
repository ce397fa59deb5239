"""Turning learned noise into answers: head importance (more to come with the fitting issue)."""

from __future__ import annotations

import re

import torch
from jaxtyping import Float
from torch import Tensor

from tl_noise.hooks import NoiseHooks

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
