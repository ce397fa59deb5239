"""Every setting of a fit, spelled once: :class:`FitConfig`.

:func:`tl_noise.fit` builds one from its keyword arguments, the command line derives its options
from the fields (their ``help`` metadata is the option's help text), and the run directory
records :meth:`FitConfig.record` in ``config.json`` under ``"fit"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from tl_noise.errors import TLNoiseValueError
from tl_noise.fitting.combiners import COMBINERS
from tl_noise.fitting.objectives import NOISE_LOSSES, OBJECTIVES


def _setting(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its command-line help (``cli``: extra argparse keywords)."""
    return field(default=default, metadata={"help": help, **cli})


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TLNoiseValueError(f"{name}={value!r}; expected an int > 0")


def _positive_number(name: str, value: Any, extra: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise TLNoiseValueError(f"{name}={value!r}; {extra or 'expected a finite number > 0'}")


@dataclass(frozen=True)
class FitConfig:
    """The settings of one fit (validated on construction; ValueError naming the bad field).

    The objective is ``mode``'s combination of the noise loss ``noise_loss_kind`` (how large the
    noise is) and the task loss ``objective`` (what behaviour it costs); see
    :mod:`tl_noise.fitting.combiners` and :mod:`tl_noise.fitting.objectives`.
    """

    objective: str | Callable[..., Any] = _setting(
        "kl",
        "task loss: kl (clean vs noised next-token distributions), ce (true next tokens) or "
        "metric (the task's own metric)",
        choices=OBJECTIVES,
    )
    mode: str = _setting(
        "alphaless",
        "how the noise and task gradients combine: alphaless (no weight to tune), composite "
        "(alpha-weighted sum) or budget (keep the task loss at --budget)",
        choices=COMBINERS.names(),
    )
    alpha: float = _setting(0.5, "weight of the noise loss in mode composite, in [0, 1]")
    budget: float | None = _setting(
        None, "task-loss budget of mode budget (e.g. a KL of 0.05)", type=float
    )
    steps: int = _setting(500, "optimisation steps")
    lr: float = _setting(0.05, "Adam learning rate of the noise parameters")
    batch_size: int = _setting(32, "examples per step")
    seed: int = _setting(0, "seed of the batches and of the noise draws")
    noise_loss_kind: str = _setting(
        "neg_log_mean",
        "noise loss: neg_log_mean (-log mean std) or neg_mean_log (-mean log std)",
        choices=NOISE_LOSSES,
    )
    checkpoint_every: int = _setting(50, "steps between checkpoints of the run directory")
    log_every: int = _setting(1, "steps between history records")
    detail_every: int = _setting(
        0,
        "history records between full ones (every std and the per-head gradients; the others "
        "are summaries); 0: chosen so a step writes at most 16 KiB on average",
    )
    budget_lr: float = _setting(0.05, "dual-ascent rate of the budget multiplier")
    clean_cache_mb: float = _setting(
        512.0, "memory for cached clean next-token distributions (MiB; 0: recompute each step)"
    )
    stable_window: int = _setting(
        50, "stop once the node ranking has not changed for this many steps (0: run every step)"
    )
    refine_window: int = _setting(
        8,
        "in-context refinement of the ranking: candidates tried per removal (0: off; edge "
        "noise: exchanges at the measured circuit sizes, on unless 0)",
    )
    refine_examples: int = _setting(
        128,
        "examples the in-context refinement evaluates on (edge noise: the faithfulness of its "
        "top-k edges, measured at the end of the fit)",
    )
    refine_budget: int | None = _setting(
        None, "most forward passes the refinement may spend (default: no cap)", type=int
    )

    def __post_init__(self) -> None:
        COMBINERS.get(self.mode)  # ValueError naming the accepted modes
        if not callable(self.objective) and self.objective not in OBJECTIVES:
            raise TLNoiseValueError(
                f"objective={self.objective!r}; accepted: {', '.join(OBJECTIVES)} or a callable"
            )
        if self.noise_loss_kind not in NOISE_LOSSES:
            raise TLNoiseValueError(
                f"noise_loss_kind={self.noise_loss_kind!r}; accepted: {', '.join(NOISE_LOSSES)}"
            )
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "refine_examples"):
            _positive_int(name, getattr(self, name))
        for name in ("stable_window", "refine_window", "detail_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TLNoiseValueError(f"{name}={value!r}; expected an int >= 0")
        if self.refine_budget is not None:
            _positive_int("refine_budget", self.refine_budget)
        _positive_number("lr", self.lr)
        cache = self.clean_cache_mb
        if not (isinstance(cache, (int, float)) and math.isfinite(cache) and cache >= 0):
            raise TLNoiseValueError(f"clean_cache_mb={cache!r}; expected a finite number >= 0")
        if self.mode == "composite" and not (
            isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1
        ):
            raise TLNoiseValueError(f"alpha={self.alpha!r}; expected a number in [0, 1]")
        if self.mode == "budget":
            _positive_number(
                "budget", self.budget, "mode='budget' needs a finite task-loss budget > 0"
            )
            _positive_number("budget_lr", self.budget_lr)

    @property
    def objective_name(self) -> str:
        """``"kl"``/``"ce"``/``"metric"``, or a callable objective's ``__name__``."""
        if callable(self.objective):
            return getattr(self.objective, "__name__", "callable")
        return self.objective

    def record(self, n_examples: int, n_positions: int) -> dict[str, Any]:
        """The ``"fit"`` section of a run's ``config.json`` (settings a mode ignores are null)."""
        return {
            "objective": self.objective_name,
            "mode": self.mode,
            "alpha": self.alpha if self.mode == "composite" else None,
            "budget": self.budget if self.mode == "budget" else None,
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "noise_loss": self.noise_loss_kind,
            "n_examples": n_examples,
            "n_positions": n_positions,
            "budget_lr": self.budget_lr if self.mode == "budget" else None,
            "stable_window": self.stable_window,
            "refine_window": self.refine_window,
            "refine_examples": self.refine_examples if self.refine_window else None,
            "refine_budget": self.refine_budget if self.refine_window else None,
            "log_every": self.log_every,
            "detail_every": self.detail_every,
        }

    @classmethod
    def settings(cls) -> list[tuple[str, Any, dict[str, Any]]]:
        """``(name, default, metadata)`` of every setting, in declaration order (for the CLI)."""
        return [(f.name, f.default, dict(f.metadata)) for f in fields(cls)]
