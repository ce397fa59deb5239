"""One combiner per fit mode: how the noise-loss gradient ``n`` and the task-loss gradient ``t``
become the step ``g`` (all lists of tensors, one per noise parameter).

* ``"alphaless"`` (default): ``g = S + (L - proj_S(L))`` with ``S``, ``L`` the smaller and larger of
  ``(n, t)`` (:func:`tl_noise.fitting.projection.alphaless_gradients`): no weight to tune.
* ``"composite"``: ``g = alpha * n + (1 - alpha) * t``.
* ``"budget"``: ``g = n + w * t`` with ``w = max(0, lambda + (L_task / budget - 1))``: a Lagrange
  multiplier adapted by dual ascent ``log lambda += budget_lr * (EMA(L_task) / budget - 1)``, plus
  a damping term (Platt & Barr, 1988) that pushes back as soon as the task loss overshoots, so
  the task loss settles at the budget the user accepts.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from tl_noise.fitting.projection import alphaless_gradients
from tl_noise.registry import Registry

LOG_LAMBDA_MAX = math.log(1e4)
BUDGET_DAMPING = 1.0


class Combiner(Protocol):
    """What the trainer needs of a mode."""

    def multiplier(self) -> float:
        """The task loss's multiplier ``lambda`` in force for the coming step (1 unless budget)."""
        ...

    def combine(self, g_noise: list[Tensor], g_task: list[Tensor], task: float) -> list[Tensor]:
        """The step direction from the two gradients (``task``: this step's task loss)."""
        ...

    def update(self, task: float) -> None:
        """Adapt internal state after the optimiser step (budget's multiplier)."""
        ...

    def total(self, task: float, noise: float, lam: float) -> float:
        """The scalar objective this mode minimises, for the history."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON state for checkpoints (``log_lambda``, ``task_ema``)."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...


COMBINERS: Registry[type] = Registry("mode")


class _Stateless:
    def multiplier(self) -> float:
        return 1.0

    def update(self, task: float) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"log_lambda": 0.0, "task_ema": None}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


@COMBINERS.register("alphaless")
class Alphaless(_Stateless):
    """``g = S + (L - proj_S(L))`` on the concatenated vector (a few ops, however many hooks)."""

    def __init__(self, **_: Any) -> None:
        pass

    def combine(self, g_noise: list[Tensor], g_task: list[Tensor], task: float) -> list[Tensor]:
        return unflatten(alphaless_gradients([flatten(g_noise)], [flatten(g_task)])[0], g_noise)

    def total(self, task: float, noise: float, lam: float) -> float:
        return task + noise


@COMBINERS.register("composite")
class Composite(_Stateless):
    """``g = alpha * n + (1 - alpha) * t``."""

    def __init__(self, alpha: float = 0.5, **_: Any) -> None:
        self.alpha = alpha

    def combine(self, g_noise: list[Tensor], g_task: list[Tensor], task: float) -> list[Tensor]:
        a = self.alpha
        return [a * n + (1 - a) * t for n, t in zip(g_noise, g_task, strict=True)]

    def total(self, task: float, noise: float, lam: float) -> float:
        return self.alpha * noise + (1 - self.alpha) * task


@COMBINERS.register("budget")
class Budget:
    """``g = n + w t``, ``w = max(0, lambda + damping * (L_task / budget - 1))``; ``lambda`` by
    dual ascent on ``log lambda`` driven by an EMA of the task loss, clipped to ``[1e-4, 1e4]``."""

    def __init__(self, budget: float = 1.0, budget_lr: float = 0.05, **_: Any) -> None:
        self.budget, self.budget_lr = float(budget), float(budget_lr)
        self.log_lambda = 0.0
        self.task_ema: float | None = None

    def multiplier(self) -> float:
        return math.exp(self.log_lambda)

    def combine(self, g_noise: list[Tensor], g_task: list[Tensor], task: float) -> list[Tensor]:
        # damped multiplier (Platt & Barr 1988): the constraint pushes back at once when the task
        # loss overshoots, instead of waiting for lambda to grow
        w = max(0.0, self.multiplier() + BUDGET_DAMPING * (task / self.budget - 1))
        return [n + w * t for n, t in zip(g_noise, g_task, strict=True)]

    def update(self, task: float) -> None:
        ema = task if self.task_ema is None else 0.9 * self.task_ema + 0.1 * task
        self.task_ema = ema
        step = self.log_lambda + self.budget_lr * (ema / self.budget - 1)
        self.log_lambda = min(LOG_LAMBDA_MAX, max(-LOG_LAMBDA_MAX, step))

    def total(self, task: float, noise: float, lam: float) -> float:
        return noise + lam * task

    def state(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda, "task_ema": self.task_ema}

    def load_state(self, state: dict[str, Any]) -> None:
        self.log_lambda = float(state.get("log_lambda", 0.0))
        self.task_ema = state.get("task_ema")


def make_combiner(mode: str, alpha: float, budget: float | None, budget_lr: float) -> Combiner:
    """The combiner of ``mode`` (ValueError naming the accepted modes)."""
    combiner: Combiner = COMBINERS.get(mode)(alpha=alpha, budget=budget, budget_lr=budget_lr)
    return combiner


def flatten(tensors: list[Tensor]) -> Tensor:
    """One vector over all noise parameters, in ``torch.nn.utils.parameters_to_vector``'s layout
    (which needs contiguous tensors; gradients need not be)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return torch.cat([x.reshape(-1) for x in tensors])


def unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Split a vector from :func:`flatten` back into tensors shaped like ``like``."""
    if len(like) == 1:
        return [flat.reshape(like[0].shape)]
    pieces = flat.split([x.numel() for x in like])
    return [piece.reshape(x.shape) for piece, x in zip(pieces, like, strict=True)]
