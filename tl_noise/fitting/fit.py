"""``tl_noise.fit``: the public entry point, a thin wrapper over :class:`~tl_noise.fitting.
trainer.Trainer`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.fitting import distributed
from tl_noise.fitting.callbacks import Callback, ProgressBar, RunDirectory, versions
from tl_noise.fitting.checkpoint import read_resume_checkpoint
from tl_noise.fitting.config import FitConfig
from tl_noise.fitting.inputs import FitData, prepare_data
from tl_noise.fitting.objectives import resolve_objective
from tl_noise.fitting.refine import RefineRanking
from tl_noise.fitting.trainer import FitResult, Trainer
from tl_noise.hooks import NoiseHooks, model_fingerprint
from tl_noise.models import model_name
from tl_noise.runs.writer import RunWriter
from tl_noise.tasks.base import Task


def _run_config(model: Any, noise: NoiseHooks, data: FitData, config: FitConfig) -> dict:
    return {
        "model": {
            "name": model_name(model),
            "fingerprint": model_fingerprint(model),
            "ground_truth": getattr(model, "ground_truth", None),
        },
        "hooks": noise.hook_names,
        "noise": noise.config(),
        "fit": config.record(len(data), int(data.tokens.shape[1])),
        "task": data.task_info,
        "versions": versions(),
        "created": time.time(),
    }


def fit(
    model: Any,
    noise: NoiseHooks,
    tokens: Int[Tensor, "n pos"] | Task,
    loss_mask: Bool[Tensor, "n pos"] | None = None,
    objective: str | Callable[[Tensor, dict[str, Tensor]], Tensor] = "kl",
    mode: str = "alphaless",
    alpha: float = 0.5,
    budget: float | None = None,
    steps: int = 500,
    lr: float = 0.05,
    batch_size: int = 32,
    seed: int = 0,
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    noise_loss_kind: str = "neg_log_mean",
    metric: Callable[[Tensor, dict[str, Tensor]], Tensor] | None = None,
    checkpoint_every: int = 50,
    log_every: int = 1,
    budget_lr: float = 0.05,
    clean_cache_mb: float = 512.0,
    task_info: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    stable_window: int = 0,
    refine_window: int = 4,
    refine_examples: int = 64,
    refine_budget: int | None = None,
) -> FitResult:
    """Fit the noise of ``noise`` (attached to ``model``) on ``tokens``; the model stays frozen.

    Args:
        tokens: ``[n, pos]`` token ids, or a :class:`~tl_noise.tasks.Task` (its loss mask,
            metric and extras are used unless given explicitly).
        loss_mask: ``[n, pos]`` bool, the positions whose predictions count (None: all).
        objective: ``"kl"`` (clean vs noised next-token distributions), ``"ce"`` (true next
            tokens), ``"metric"`` (the task's metric) or a callable ``metric(logits, batch)``.
        mode: ``"alphaless"`` (default), ``"composite"`` (uses ``alpha``) or ``"budget"``
            (uses ``budget``: the task loss the user accepts).
        steps, lr, batch_size, seed, ...: the settings of :class:`~tl_noise.fitting.FitConfig`.
        run_dir: write the run directory there (config, history, checkpoints, final noise).
        resume: continue the run in ``run_dir`` from its last checkpoint; the result equals an
            uninterrupted run with the same settings.
        quiet: no progress bar.
        stable_window: stop once the node ranking has held for this many steps (0: never).
        refine_window, refine_examples, refine_budget: the in-context refinement of the node
            ranking that ends the fit (:mod:`~tl_noise.fitting.refine`; ``refine_window=0``
            skips it); ``tn.node_importance(noise)`` then returns the refined ranking.
        callbacks: extra :class:`~tl_noise.fitting.callbacks.Callback` objects.

    Returns:
        :class:`FitResult` with ``stds``, ``history``, ``importance`` and ``run_dir``.
    """
    data = prepare_data(model, noise, tokens, loss_mask, metric, task_info)
    config = FitConfig(
        objective=objective, mode=mode, alpha=alpha, budget=budget, steps=steps, lr=lr,
        batch_size=batch_size, seed=seed, noise_loss_kind=noise_loss_kind,
        checkpoint_every=checkpoint_every, log_every=log_every, budget_lr=budget_lr,
        clean_cache_mb=clean_cache_mb, stable_window=stable_window, refine_window=refine_window,
        refine_examples=refine_examples, refine_budget=refine_budget,
    )  # fmt: skip
    resolve_objective(config.objective, data.metric)
    if not noise.attached:
        raise TLNoiseValueError("noise is not attached to the model (call noise.attach() first)")
    # read and check the checkpoint before anything (noise, run directory) is changed
    checkpoint = read_resume_checkpoint(model, noise, run_dir) if resume else None
    ctx = distributed.setup()
    if ctx.active and batch_size < ctx.world:
        raise TLNoiseValueError(
            f"batch_size={batch_size} must be >= the number of ranks ({ctx.world})"
        )
    if noise.calibration_source == "random" and not resume:
        noise.calibrate(data.tokens[: min(64, len(data))])
    writer = None
    if run_dir is not None and ctx.is_main:
        writer = RunWriter(run_dir, _run_config(model, noise, data, config), resume=resume)
    trainer = Trainer(model, noise, data, config)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        if writer:
            writer.truncate_history(trainer.start)
    refine = [RefineRanking(refine_window, refine_examples, refine_budget)] if refine_window else []
    trainer.callbacks = [
        *callbacks,
        *([distributed.DataParallel(ctx)] if ctx.active else []),
        ProgressBar(disable=quiet or not ctx.is_main),
        *refine,  # before the run directory, which saves the refined ranking with the noise
        *([RunDirectory(writer)] if writer else []),
    ]
    result = trainer.fit()
    result.run_dir = writer.path if writer else None
    return result
