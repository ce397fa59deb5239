"""The methods compared: tl-noise (its default and the variants behind the default's choice) and
the node-level baselines of :mod:`tl_noise.evaluation.node_baselines`.

Every method returns :class:`~tl_noise.evaluation.node_baselines.NodeScores`: a score per node
(higher = more important), wall seconds and forward-pass equivalents over the evaluation set (a
backward counts 2; one fit step on ``b`` of ``n`` rows counts ``3 b / n``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

import tl_noise as tn
from tl_noise.evaluation.node_baselines import BASELINES, NodeScores
from tl_noise.evaluation.nodes import has_mlps
from tl_noise.fitting.path import fit_path
from tl_noise.names import NODE_HOOKS as HOOKS  # noqa: E402

Method = Callable[[Any, Tensor, Tensor, Tensor], NodeScores]


def tl_noise_method(**settings: Any) -> Method:
    """tl-noise with ``settings`` for attach (``form``) and fit (the rest); defaults otherwise."""
    attach = {k: settings.pop(k) for k in ("form",) if k in settings}

    def run(model: Any, tokens: Tensor, mask: Tensor, corrupted: Tensor) -> NodeScores:
        began = time.perf_counter()
        with tn.attach_noise(model, HOOKS, calibration_tokens=tokens, **attach) as noise:
            result = tn.fit(model, noise, tokens, loss_mask=mask, quiet=True, **settings)
            scores = tn.node_importance(noise)
        return NodeScores(scores, time.perf_counter() - began, result.forwards)

    return run


def tl_noise_path(model: Any, tokens: Tensor, mask: Tensor, corrupted: Tensor) -> NodeScores:
    """tl-noise's budget-sweep ranking (:mod:`tl_noise.fitting.path`)."""
    began = time.perf_counter()
    steps = 60
    with tn.attach_noise(model, HOOKS, calibration_tokens=tokens, form="replacement") as noise:
        scores, points = fit_path(tn.fit, model, noise, tokens, steps_per_budget=steps,
                                  loss_mask=mask, quiet=True)  # fmt: skip
    cost = 3 * steps * len(points) * min(32, len(tokens)) / len(tokens)
    return NodeScores(scores, time.perf_counter() - began, cost)


def baseline(name: str) -> Method:
    fn = BASELINES.get(name)

    def run(model: Any, tokens: Tensor, mask: Tensor, corrupted: Tensor) -> NodeScores:
        return fn(model, tokens, mask, corrupted_tokens=corrupted)

    return run


def methods(include_slow: bool = True) -> dict[str, Method]:
    """Method name -> runner, tl-noise's default first."""
    out: dict[str, Method] = {
        "tl-noise": tl_noise_method(),  # replacement noise, refined in context, early stop
        "tl-noise, additive + refine": tl_noise_method(form="additive"),
        "tl-noise, one fit (no refine)": tl_noise_method(refine_window=0),
        "tl-noise, additive, one fit": tl_noise_method(form="additive", refine_window=0),
        "tl-noise, refine window 4": tl_noise_method(refine_window=4),
        "tl-noise, path": tl_noise_path,
    }
    for name in BASELINES.names():
        if include_slow or name != "acdc greedy":
            out[name] = baseline(name)
    return out


def node_count(model: Any) -> int:
    cfg = model.cfg
    return int(cfg.n_layers) * (int(cfg.n_heads) + int(has_mlps(model)))


__all__ = ["methods", "node_count", "tl_noise_method"]
