"""The trainer: one :meth:`Trainer.step` is one optimisation step of the noise (model frozen).

Each step draws a batch (a function of seed and step alone, so a resumed run sees the batches an
uninterrupted one would), runs the model once with noise, and computes two gradients with respect
to the noise parameters only:

* ``t``: of the task loss (:mod:`~tl_noise.fitting.task_losses`), one backward pass through the
  frozen model (activations only);
* ``n``: of the noise loss, which depends on the noise parameters alone, so autograd over the
  small rho graph costs next to nothing.

The mode's combiner (:mod:`~tl_noise.fitting.combiners`) turns them into the step. Everything
around the steps (progress bar, run directory, data-parallel reduction) is a callback
(:mod:`~tl_noise.fitting.callbacks`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseFloatingPointError
from tl_noise.fitting.callbacks import Callback
from tl_noise.fitting.checkpoint import Checkpoint, load_optimizer, optimizer_meta
from tl_noise.fitting.combiners import make_combiner
from tl_noise.fitting.config import FitConfig
from tl_noise.fitting.inputs import FitData
from tl_noise.fitting.objectives import noise_loss, resolve_objective
from tl_noise.fitting.records import detail_interval, make_record
from tl_noise.fitting.stability import RankingStability
from tl_noise.fitting.task_losses import (
    CETaskLoss,
    CleanTargets,
    KLTaskLoss,
    MetricTaskLoss,
    TaskLoss,
)
from tl_noise.hooks import NoiseHooks, head_importance, std_node_scores
from tl_noise.hooks.noise_hooks import CORRUPTED_KEY


@dataclass
class FitResult:
    """What :func:`tl_noise.fit` returns: final stds (as ``noise.stds()``), the per-step history
    (the records written to ``history.jsonl``), head importance ``[n_layers, n_heads]`` and the
    run directory (or None)."""

    stds: dict[str, Tensor]
    history: list[dict[str, Any]]
    importance: Tensor | None = None
    run_dir: Path | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    node_scores: dict[str, float] | None = None  # the refined ranking, when the fit made one
    stopped_at: int | None = None  # the step count at which the ranking was stable
    forwards: float = 0.0  # cost in forward passes over the data (a backward counts 2)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Examples of step ``step``: a function of (seed, step) alone, so a resumed run sees the
    same batches as an uninterrupted one."""
    if batch_size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=step_generator(seed, step))[:batch_size]


def frozen_forward(model: Any, tokens: Tensor, frozen: list[Tensor]) -> Tensor:
    """``model(tokens)`` with the weights in ``frozen`` not requiring grad during the call.

    The graph then starts at the first noise layer and saves nothing for weight gradients
    (less memory, no weight-gradient work in the backward); the flags are restored at once.
    """
    for p in frozen:
        p.requires_grad_(False)
    try:
        return model(tokens)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _grads(loss: Tensor, params: list[Tensor], retain: bool) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def make_task_loss(config: FitConfig, model: Any, noise: NoiseHooks, data: FitData) -> TaskLoss:
    """The task loss of ``config.objective`` (a callable objective is a metric)."""
    kind, metric = resolve_objective(config.objective, data.metric)
    if kind == "kl":
        chunk = min(32, config.batch_size)
        return KLTaskLoss(
            CleanTargets(model, noise, data.tokens, data.mask, config.clean_cache_mb, chunk)
        )
    if kind == "ce":
        return CETaskLoss()
    assert metric is not None  # resolve_objective refuses a metric objective without one
    return MetricTaskLoss(metric)


def safe_importance(noise: NoiseHooks) -> Tensor | None:
    """Head importance, or None when the noise has no per-head part."""
    try:
        imp = head_importance(noise)
    except (ValueError, AttributeError):
        return None
    return None if torch.isnan(imp).all() else imp


class Trainer:
    """Fits the noise of ``noise`` (attached to ``model``) on ``data`` with ``config``.

    ``step(k)`` runs step ``k`` and returns its history record when one is due (every
    ``log_every`` steps and the last), else None; ``fit()`` runs the remaining steps with the
    callbacks and returns the :class:`FitResult`.
    """

    def __init__(
        self,
        model: Any,
        noise: NoiseHooks,
        data: FitData,
        config: FitConfig,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model, self.noise, self.data, self.config = model, noise, data, config
        self.callbacks = list(callbacks)
        self.params: list[Tensor] = [p for p in noise.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(noise.param_groups(config.lr))
        self.combiner = make_combiner(config.mode, config.alpha, config.budget, config.budget_lr)
        self.task_loss = make_task_loss(config, model, noise, data)
        self.frozen = [p for p in model.parameters() if p.requires_grad]
        self.device = model_device(model)
        self.layers = [layer for _, layer in noise.items()]
        self.has_estimator = any(layer.estimator is not None for layer in self.layers)
        self.start = 0
        self.history: list[dict[str, Any]] = []
        self.stability = RankingStability(config.stable_window)
        self.stopping = False  # set when the ranking is stable: this step is the last
        self.detail_every = detail_interval(
            noise, config.steps, config.log_every, config.detail_every
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the noise: optimizer, mode and stability state."""
        return {
            "optimizer": optimizer_meta(self.optimizer),
            **self.combiner.state(),
            "stability": self.stability.state(),
        }

    def last_step(self, step: int) -> bool:
        """Whether ``step`` is the fit's last (the step count, or a stable ranking)."""
        return self.stopping or step + 1 == self.config.steps

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint: noise parameters, optimizer and the mode's state."""
        start, state, opt_tensors, loaded = checkpoint
        self.noise.load_state_dict(loaded.state_dict())
        load_optimizer(self.optimizer, state["optimizer"], opt_tensors)
        self.combiner.load_state(state)
        self.stability.load_state(state.get("stability"))
        self.start = start

    def _batch(self, step: int) -> dict[str, Tensor]:
        cfg = self.config
        idx = batch_indices(len(self.data), cfg.batch_size, cfg.seed, step)
        for cb in self.callbacks:
            idx = cb.on_batch(self, step, idx)
        return self.data.batch(idx, self.device)

    def step(self, step: int) -> dict[str, Any] | None:
        """One optimisation step; the history record when one is due."""
        cfg = self.config
        batch = self._batch(step)
        self.noise.manual_seed(int(step_generator(cfg.seed, step).initial_seed() % (2**31)))
        self.task_loss.prepare(batch["index"])
        with self.noise.batch_context(batch):
            logits = frozen_forward(self.model, batch["tokens"], self.frozen)
        task_loss, terms = self.task_loss(logits, batch)
        del logits  # the loss graph keeps what its backward needs
        n_loss = noise_loss([layer.std_for_loss() for layer in self.layers], cfg.noise_loss_kind)
        lam = self.combiner.multiplier()
        g_noise = _grads(n_loss, self.params, retain=self.has_estimator)
        finite = bool(torch.isfinite(task_loss))
        g_task = _grads(task_loss, self.params, retain=False) if finite else None
        task_value = task_loss.item()
        for cb in self.callbacks:
            task_value = cb.reduce_task(self, task_value, terms)
        if not (math.isfinite(task_value) and torch.isfinite(n_loss) and g_task is not None):
            raise TLNoiseFloatingPointError(
                f"non-finite loss at step {step} (task {task_value}, noise {n_loss.item()}); "
                "the noise parameters were left at the last finite step"
            )
        for cb in self.callbacks:
            g_noise, g_task = cb.reduce_grads(self, g_noise, g_task, len(batch["index"]))
        g = self.combiner.combine(g_noise, g_task, task_value)
        for p, grad in zip(self.params, g, strict=True):
            p.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.combiner.update(task_value)
        if cfg.stable_window:
            self.stopping = self.stability.update(self.noise)
        if not (step % cfg.log_every == 0 or self.last_step(step)):
            return None
        grads = (g_noise, g_task, g)
        full = (step // cfg.log_every) % self.detail_every == 0 or self.last_step(step)
        record = make_record(
            step, self.noise, self.params, grads, (task_value, n_loss), self.combiner, lam, full
        )
        self.history.append(record)
        return record

    def fit(self) -> FitResult:
        """Run steps ``start .. steps - 1`` with the callbacks; the noise is left in train mode."""
        began = time.time()
        self.noise.train()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        step = self.start
        try:
            for step in range(self.start, self.config.steps):
                for cb in self.callbacks:
                    cb.on_step_start(self, step)
                record = self.step(step)
                for cb in self.callbacks:
                    cb.on_step_end(self, step, record)
                if self.stopping:
                    break
        except BaseException as err:
            for cb in self.callbacks:
                cb.on_error(self, step, err)
            raise
        self.noise.train()
        result = FitResult(
            stds=self.noise.stds(),
            history=self.history,
            importance=safe_importance(self.noise),
            seconds=time.time() - began,
            stopped_at=step + 1 if self.stopping else None,
            node_scores=std_node_scores(self.noise),
        )
        n = len(self.data)  # one step: a noised forward and a backward on a batch
        per_step = 3 + (CORRUPTED_KEY in self.data.extras)  # + the counterfactual's forward
        result.forwards = per_step * (step + 1 - self.start) * min(self.config.batch_size, n) / n
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result
