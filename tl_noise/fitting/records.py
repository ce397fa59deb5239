"""The per-step history record (format in :mod:`tl_noise.runs.format`), and the per-head gradient
statistics it carries.

Per hook and head: the norms of the noise- and task-loss gradients of the head's parameters, their
cosine, their signed sums, the sum and norm of the step actually taken, and the composite
``alpha``/``scale`` the alphaless rule amounts to on that head alone
(:func:`~tl_noise.fitting.projection.equivalent_alpha_and_scaling_factor_rows`). Every number is
computed where it lives and copied to the host once per device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tl_noise.fitting.combiners import Budget, Combiner, flatten
from tl_noise.fitting.projection import (
    equivalent_alpha_and_scaling_factor_of,
    equivalent_alpha_and_scaling_factor_rows,
)
from tl_noise.hooks import NoiseHooks
from tl_noise.runs.format import GRAD_KEYS

Grads = dict[int, Tensor]  # id(parameter) -> its gradient


def json_float(x: float) -> float | str:
    """JSON has no inf/nan: write them as the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def head_gradient_stats(noise: NoiseHooks, n: Grads, t: Grads, g: Grads) -> dict[str, Tensor]:
    """Hook -> ``[len(GRAD_KEYS), heads]`` float32 on the layer's device, without a sync.

    Hooks whose gradients have the same shape and device are stacked and computed together, so
    the number of tensor operations grows with the number of distinct shapes, not of hooks.
    """
    groups: dict[tuple[Any, ...], list[tuple[str, Tensor, Tensor, Tensor]]] = {}
    for name, layer in noise.items():
        if layer.rhos is None or layer.granularity not in ("head", "head_feature"):
            continue
        key = id(layer.rhos)
        heads = layer.unit_shape[0]
        nn_, tt, gg = (d[key].float() for d in (n, t, g))
        if layer.n_positions is not None:  # sum positions: [pos, heads, ...] -> [heads, ...]
            nn_, tt, gg = nn_.sum(0), tt.sum(0), gg.sum(0)
        nn_, tt, gg = (x.reshape(heads, -1) for x in (nn_, tt, gg))
        groups.setdefault((nn_.device, *nn_.shape), []).append((name, nn_, tt, gg))
    out: dict[str, Tensor] = {}
    for members in groups.values():
        nn_ = torch.stack([m[1] for m in members])
        tt = torch.stack([m[2] for m in members])
        gg = torch.stack([m[3] for m in members])
        n_norm, t_norm = nn_.norm(dim=-1), tt.norm(dim=-1)
        dot = (nn_ * tt).sum(-1)
        cosine = dot / (n_norm * t_norm).clamp_min(1e-30)
        alpha, scale = equivalent_alpha_and_scaling_factor_rows(n_norm, t_norm, dot)
        columns = (n_norm, t_norm, cosine, nn_.sum(-1), tt.sum(-1), gg.sum(-1), gg.norm(dim=-1))
        table = torch.stack([*columns, alpha, scale], dim=1)
        out.update((m[0], table[i]) for i, m in enumerate(members))
    return out


def _head_stats_dict(rows: list[list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = dict(zip(GRAD_KEYS, rows, strict=True))
    out["alpha"] = [json_float(x) for x in out["alpha"]]
    return out


def to_host(parts: dict[str, Tensor]) -> dict[str, Any]:
    """``tensor.tolist()`` of every part, with one copy per device (parts keep their shapes)."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in parts.items():
        by_device.setdefault(value.device, []).append(key)
    out: dict[str, Any] = {}
    for keys in by_device.values():
        flat = torch.cat([parts[k].reshape(-1).float() for k in keys]).cpu()
        for key, piece in zip(keys, flat.split([parts[k].numel() for k in keys]), strict=True):
            out[key] = piece.reshape(parts[key].shape).tolist()
    return out


def make_record(
    step: int,
    noise: NoiseHooks,
    params: list[Tensor],
    grads: tuple[list[Tensor], list[Tensor], list[Tensor]],
    losses: tuple[float, Tensor],
    combiner: Combiner,
    lam: float,
) -> dict[str, Any]:
    """One history record. ``grads``: (noise-loss, task-loss, applied) gradients per parameter;
    ``losses``: (task loss, noise loss); ``lam``: the task loss's multiplier used in the step
    (recorded for mode budget only)."""
    g_noise, g_task, g = grads
    task_value, n_loss = losses
    with torch.no_grad():
        eq_alpha, eq_scale = equivalent_alpha_and_scaling_factor_of(
            [flatten(g_noise)], [flatten(g_task)]
        )
        n, t, gg = ({id(p): x for p, x in zip(params, d, strict=True)} for d in grads)
        stds = {name: layer.std().detach().float() for name, layer in noise.items()}
        heads = head_gradient_stats(noise, n, t, gg)
        loss = n_loss.detach().float().to(eq_alpha.device)
        first = next(iter(stds.values())).device
        parts = {
            "scalars": torch.stack([eq_alpha.float(), eq_scale.float(), loss]),
            "mean_std": torch.cat([s.reshape(-1).to(first) for s in stds.values()]).mean(),
            **{f"std:{k}": v for k, v in stds.items()},
            **{f"grad:{k}": v for k, v in heads.items()},
        }
        host = to_host(parts)
    eq_a, eq_s, nl = host["scalars"]
    return {
        "step": step,
        "loss": {
            "task": task_value,
            "noise": nl,
            "total": combiner.total(task_value, nl, lam),
            "lambda": lam if isinstance(combiner, Budget) else None,
        },
        "mean_std": host["mean_std"],
        "equivalent": {"alpha": json_float(eq_a), "scale": eq_s},
        "std": {name: host[f"std:{name}"] for name in stds},
        "grad": {name: _head_stats_dict(host[f"grad:{name}"]) for name in heads},
    }
