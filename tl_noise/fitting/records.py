"""The per-step history record (format in :mod:`tl_noise.runs.format`), and the per-head gradient
statistics it carries.

A record is *full* or a *summary*. A full record carries every std and the per-head gradient
statistics; a summary carries the losses, the mean std and the global equivalents only (a few
hundred bytes whatever the model). :func:`detail_interval` picks how often a record is full so
that a step writes at most :data:`DETAIL_BYTES_PER_STEP` on average and the whole history stays
under half of what a reader accepts (:data:`~tl_noise.io.MAX_HISTORY_BYTES`); the noise itself is
saved in full at every checkpoint. Numbers are written with 7 significant digits (the float32 the
noise is fitted in carries about 7).

Per hook and head: the norms of the noise- and task-loss gradients of the head's parameters, their
cosine, their signed sums, the sum and norm of the step actually taken, and the composite
``alpha``/``scale`` the alphaless rule amounts to on that head alone
(:func:`~tl_noise.fitting.projection.equivalent_alpha_and_scaling_factor_rows`). Every number is
computed where it lives and copied to the host once per device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.fitting.combiners import Budget, Combiner, flatten
from tl_noise.fitting.projection import (
    equivalent_alpha_and_scaling_factor_of,
    equivalent_alpha_and_scaling_factor_rows,
)
from tl_noise.hooks import NoiseHooks
from tl_noise.io import MAX_HISTORY_BYTES
from tl_noise.runs.format import GRAD_KEYS

DETAIL_BYTES_PER_STEP = 16 * 2**10
"""The average history bytes per logged step that the automatic cadence of full records aims at."""
SUMMARY_BYTES = 512
"""An upper bound of a summary record's size (its fields are a fixed handful of numbers)."""
BYTES_PER_NUMBER = 16
"""An upper bound of one number's size in a record (7 significant digits, sign, exponent, comma)."""

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


def full_record_numbers(noise: NoiseHooks) -> int:
    """How many numbers a full record holds: every std, and per head the gradient statistics."""
    total = 0
    for _, layer in noise.items():
        total += layer.std().numel()
        if layer.rhos is not None and layer.granularity in ("head", "head_feature"):
            total += len(GRAD_KEYS) * layer.unit_shape[0]
    return total


def detail_interval(noise: NoiseHooks, steps: int, log_every: int, detail_every: int) -> int:
    """Every how many history records one is full (the others are summaries).

    ``detail_every`` > 0 is taken as given; 0 picks the smallest interval for which a step writes
    at most :data:`DETAIL_BYTES_PER_STEP` on average and ``steps`` steps stay under half of
    :data:`~tl_noise.io.MAX_HISTORY_BYTES`. ValueError when even summaries alone would not.
    """
    records = -(-steps // log_every) + 1
    full = full_record_numbers(noise) * BYTES_PER_NUMBER + SUMMARY_BYTES
    room = (MAX_HISTORY_BYTES // 2) // records - SUMMARY_BYTES
    if room <= 0:
        raise TLNoiseValueError(
            f"steps={steps} with log_every={log_every} writes {records} history records, more "
            f"than the {MAX_HISTORY_BYTES // 2**30} GiB history a reader accepts can hold; "
            f"raise log_every to at least {-(-steps * SUMMARY_BYTES * 2 // MAX_HISTORY_BYTES)}"
        )
    if detail_every:
        return detail_every
    budget = min(DETAIL_BYTES_PER_STEP * log_every, room)
    return max(1, -(-full // budget))


def round_numbers(values: np.ndarray, digits: int = 7) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits, so that JSON writes them short.

    Rounding divides by an exact power of ten, so the result is the double nearest the short
    decimal and Python writes exactly that decimal; magnitudes beyond the exact powers of ten
    (below about ``1e-15``) and non-finite values are left as they are.
    """
    x = values.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        shift = digits - 1 - np.floor(np.log10(np.abs(x)))
        ok = np.isfinite(x) & (x != 0) & (np.abs(shift) <= 22)
        shift = np.where(ok, shift, 0.0)
        scale = 10.0 ** np.abs(shift)
        up = np.where(shift >= 0, np.round(x * scale) / scale, np.round(x / scale) * scale)
    return np.where(ok, up, x)


def to_host(parts: dict[str, Tensor]) -> dict[str, Any]:
    """``tensor.tolist()`` of every part, with one copy per device (parts keep their shapes),
    rounded by :func:`round_numbers`."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in parts.items():
        by_device.setdefault(value.device, []).append(key)
    out: dict[str, Any] = {}
    for keys in by_device.values():
        flat = round_numbers(torch.cat([parts[k].reshape(-1).float() for k in keys]).cpu().numpy())
        sizes = np.cumsum([parts[k].numel() for k in keys])[:-1]
        for key, piece in zip(keys, np.split(flat, sizes), strict=True):
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
    full: bool = True,
) -> dict[str, Any]:
    """One history record. ``grads``: (noise-loss, task-loss, applied) gradients per parameter;
    ``losses``: (task loss, noise loss); ``lam``: the task loss's multiplier used in the step
    (recorded for mode budget only); ``full``: with every std and the per-head gradient
    statistics (else a summary)."""
    g_noise, g_task, g = grads
    task_value, n_loss = losses
    with torch.no_grad():
        eq_alpha, eq_scale = equivalent_alpha_and_scaling_factor_of(
            [flatten(g_noise)], [flatten(g_task)]
        )
        n, t, gg = ({id(p): x for p, x in zip(params, d, strict=True)} for d in grads)
        stds = {name: layer.std().detach().float() for name, layer in noise.items()}
        heads = head_gradient_stats(noise, n, t, gg) if full else {}
        loss = n_loss.detach().float().to(eq_alpha.device)
        first = next(iter(stds.values())).device
        parts = {
            "scalars": torch.stack([eq_alpha.float(), eq_scale.float(), loss]),
            "mean_std": torch.cat([s.reshape(-1).to(first) for s in stds.values()]).mean(),
            **{f"std:{k}": v for k, v in stds.items() if full},
            **{f"grad:{k}": v for k, v in heads.items()},
        }
        host = to_host(parts)
    eq_a, eq_s, nl = host["scalars"]
    record = {
        "step": step,
        "loss": {
            "task": task_value,
            "noise": nl,
            "total": combiner.total(task_value, nl, lam),
            "lambda": lam if isinstance(combiner, Budget) else None,
        },
        "mean_std": host["mean_std"],
        "equivalent": {"alpha": json_float(eq_a), "scale": eq_s},
    }
    if full:
        record["std"] = {name: host[f"std:{name}"] for name in stds}
        record["grad"] = {name: _head_stats_dict(host[f"grad:{name}"]) for name in heads}
    return record
