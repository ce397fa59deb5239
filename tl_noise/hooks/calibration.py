"""Registering hooks on HookPoints, and measuring activations: shapes, devices, natural scales.

A hook is registered with the HookPoint's own ``add_hook`` as a *permanent* hook, so that
``run_with_hooks`` and ``reset_hooks()`` leave it alone; the same code serves the 4.x bridge and
3.x ``HookedTransformer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_noise.devices import model_device


def check_finite_stats(stats: dict[str, dict[str, Any]], names: list[str]) -> None:
    bad = [n for n in names if n in stats and not bool(torch.isfinite(stats[n]["std"]).all())]
    if bad:
        raise FloatingPointError(
            f"the model's activations at {bad} are not finite (NaN/inf) on the calibration "
            "tokens; check the model's weights and dtype"
        )


def add_permanent_hook(point: Any, fn: Callable) -> Any:
    before = [id(h) for h in point.fwd_hooks]
    handle = point.add_hook(fn, dir="fwd", is_permanent=True)
    if handle is None:  # TransformerLens 3.x returns nothing; find the handle it appended
        handle = next(h for h in point.fwd_hooks if id(h) not in before)
    return handle


def remove_hook(point: Any, handle: Any) -> None:
    handle.hook.remove()
    point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


def default_probe_tokens(model: Any, n: int = 8, pos: int = 32, seed: int = 0) -> Tensor:
    """Uniformly random tokens ``[n, pos]`` (pos capped at ``n_ctx``) to probe shapes/scales."""
    gen = torch.Generator().manual_seed(seed)
    pos = min(pos, int(model.cfg.n_ctx))
    return torch.randint(0, int(model.cfg.d_vocab), (n, pos), generator=gen)


@torch.no_grad()
def collect_activation_stats(
    model: Any,
    names: list[str],
    tokens: Int[Tensor, "n pos"],
    batch_size: int = 16,
    require_all: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run the model on ``tokens`` and return, per hook, shape, device, dtype and unit std.

    A hook that does not fire is an error when ``require_all``, else it is left out.
    """
    stats: dict[str, dict[str, Any]] = {}
    handles = [
        (model.hook_dict[n], add_permanent_hook(model.hook_dict[n], _accumulate(stats, n)))
        for n in names
    ]
    try:
        device = model_device(model)
        for start in range(0, tokens.shape[0], batch_size):
            model(tokens[start : start + batch_size].to(device))
    finally:
        for point, handle in handles:
            remove_hook(point, handle)
    for name in names:
        if name in stats:
            s = stats[name]
            mean = s["sum"] / s["n"]
            s["std"] = (s["sumsq"] / s["n"] - mean * mean).clamp(min=0).sqrt().float().cpu()
            s["mean"] = mean.float().cpu()
        elif require_all:
            hint = ""
            if name.endswith("hook_result"):
                hint = " (hook_result fires only after model.set_use_attn_result(True))"
            raise ValueError(f"hook point {name!r} did not fire in a forward pass{hint}")
    return stats


def _accumulate(stats: dict[str, dict[str, Any]], name: str) -> Callable[[Tensor, Any], None]:
    """A hook adding the count, sum and sum of squares of each unit at ``name`` to ``stats``."""

    def fn(act: Tensor, hook: Any) -> None:
        x = act.detach().reshape(-1, *act.shape[2:]).double()
        s = stats.setdefault(
            name,
            {
                "shape": tuple(act.shape),
                "device": act.device,
                "dtype": act.dtype,
                "n": 0,
                "sum": 0.0,
                "sumsq": 0.0,
            },
        )
        s["n"] += x.shape[0]
        s["sum"] = s["sum"] + x.sum(0)
        s["sumsq"] = s["sumsq"] + (x * x).sum(0)

    return fn
