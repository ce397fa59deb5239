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
from tl_noise.fitting.checkpoint import Checkpoint, read_resume_checkpoint
from tl_noise.fitting.config import FitConfig
from tl_noise.fitting.edge_curve import EdgeCircuitCurve
from tl_noise.fitting.guard import (
    check_metric_output,
    check_resume_steps,
    check_run_dir,
    completed_result,
    data_identity,
    fit_guard,
    warn_ignored_metric,
)
from tl_noise.fitting.inputs import FitData, prepare_data
from tl_noise.fitting.objectives import resolve_objective
from tl_noise.fitting.records import detail_interval
from tl_noise.fitting.refine import RefineRanking
from tl_noise.fitting.trainer import FitResult, Trainer
from tl_noise.hooks import NoiseHooks, model_fingerprint
from tl_noise.models import model_name
from tl_noise.runs.writer import RunWriter
from tl_noise.tasks.base import Task


def _run_config(
    model: Any, noise: NoiseHooks, data: FitData, config: FitConfig, metric: Callable | None
) -> dict:
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
        "data": data_identity(data, metric),
        "versions": versions(),
        "created": time.time(),
    }


_D = FitConfig()  # the defaults below are FitConfig's: every setting is spelled once


def fit(
    model: Any,
    noise: NoiseHooks,
    tokens: Int[Tensor, "n pos"] | Task,
    loss_mask: Bool[Tensor, "n pos"] | None = None,
    objective: str | Callable[[Tensor, dict[str, Tensor]], Tensor] = _D.objective,
    mode: str = _D.mode,
    alpha: float = _D.alpha,
    budget: float | None = _D.budget,
    steps: int = _D.steps,
    lr: float = _D.lr,
    batch_size: int = _D.batch_size,
    seed: int = _D.seed,
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    noise_loss_kind: str = _D.noise_loss_kind,
    metric: Callable[[Tensor, dict[str, Tensor]], Tensor] | None = None,
    checkpoint_every: int = _D.checkpoint_every,
    log_every: int = _D.log_every,
    detail_every: int = _D.detail_every,
    budget_lr: float = _D.budget_lr,
    clean_cache_mb: float = _D.clean_cache_mb,
    task_info: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    stable_window: int | None = None,
    refine_window: int = _D.refine_window,
    refine_examples: int = _D.refine_examples,
    refine_budget: int | None = _D.refine_budget,
    overwrite: bool = False,
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
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
            uninterrupted run with the same settings and data (more steps extend a run; a
            completed run resumed with its own steps returns its final noise).
        overwrite: replace a run already in ``run_dir`` (one that failed before its first
            checkpoint is started over anyway, with a warning).
        quiet: no progress bar.
        log_every, detail_every: a history record every ``log_every`` steps, one in
            ``detail_every`` full (every std, per-head gradients), the others summaries.
        stable_window: stop once the ranking has held for this many steps (0: never; None:
            :class:`FitConfig`'s 50 for node noise, 0 for edge noise; see the CHANGELOG).
        refine_window, refine_examples, refine_budget: the in-context refinement of the node
            ranking that ends the fit (:mod:`~tl_noise.fitting.refine`; ``refine_window=0``
            skips it); ``tn.node_importance(noise)`` then returns the refined ranking.
        callbacks: extra :class:`~tl_noise.fitting.callbacks.Callback` objects.
        corrupted_tokens: edge noise only: ``[n, pos]``, each example's counterfactual: edges
            are noised towards the writer's contribution on it (resample noise,
            :meth:`~tl_noise.edges.EdgeNoise.patched`) and the end-of-fit curve uses resample
            ablation. One more forward per step.

    Returns:
        :class:`FitResult` with ``stds``, ``history``, ``importance`` and ``run_dir``.
    """
    check_run_dir(run_dir)
    if stable_window is None:
        stable_window = 0 if getattr(noise, "kind", None) == "edges" else _D.stable_window
    data = prepare_data(model, noise, tokens, loss_mask, metric, task_info, corrupted_tokens)
    config = FitConfig(
        objective=objective, mode=mode, alpha=alpha, budget=budget, steps=steps, lr=lr,
        batch_size=batch_size, seed=seed, noise_loss_kind=noise_loss_kind,
        checkpoint_every=checkpoint_every, log_every=log_every, detail_every=detail_every,
        budget_lr=budget_lr, clean_cache_mb=clean_cache_mb, stable_window=stable_window,
        refine_window=refine_window, refine_examples=refine_examples, refine_budget=refine_budget,
    )  # fmt: skip
    with fit_guard(noise):  # SIGTERM stops it like Ctrl-C; the noise's seed and modes come back
        return _fit(model, noise, data, config, run_dir, resume, overwrite, metric, quiet,
                    callbacks)  # fmt: skip


def _preflight(
    model: Any,
    noise: NoiseHooks,
    data: FitData,
    config: FitConfig,
    run_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    metric: Callable | None,
) -> tuple[Checkpoint | None, dict[str, Any]]:
    """Every check before the noise or the run directory changes: ``(checkpoint, run config)``."""
    kind, metric_fn = resolve_objective(config.objective, data.metric)
    warn_ignored_metric(config.objective, metric)
    if not noise.attached:
        raise TLNoiseValueError("noise is not attached to the model (call noise.attach() first)")
    if resume and overwrite:
        raise TLNoiseValueError("resume=True and overwrite=True contradict each other")
    # read and check the checkpoint before anything (noise, run directory) is changed
    checkpoint = read_resume_checkpoint(model, noise, run_dir) if resume else None
    if checkpoint is not None:
        check_resume_steps(run_dir, config, checkpoint[0])
    detail_interval(noise, config.steps, config.log_every, config.detail_every)  # fails early
    if kind == "metric" and metric_fn is not None:  # fails here, not after config.json exists
        check_metric_output(model, noise, data, metric_fn, config.batch_size)
    run_config = _run_config(model, noise, data, config, metric_fn) if run_dir is not None else {}
    return checkpoint, run_config


def _fit(
    model: Any,
    noise: NoiseHooks,
    data: FitData,
    config: FitConfig,
    run_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    metric: Callable | None,
    quiet: bool,
    callbacks: Sequence[Callback],
) -> FitResult:
    checkpoint, run_config = _preflight(
        model, noise, data, config, run_dir, resume, overwrite, metric
    )
    if checkpoint is not None:
        done = completed_result(model, noise, run_dir, run_config, config.steps)
        if done is not None:
            return done
    ctx = distributed.setup()
    if ctx.active and config.batch_size < ctx.world:
        raise TLNoiseValueError(
            f"batch_size={config.batch_size} must be >= the number of ranks ({ctx.world})"
        )
    if noise.calibration_source == "random" and not resume:
        noise.calibrate(data.tokens[: min(64, len(data))])
    writer = None
    if run_dir is not None and ctx.is_main:
        writer = RunWriter(run_dir, run_config, resume=resume, overwrite=overwrite)
    try:
        trainer = Trainer(model, noise, data, config)
        if checkpoint is not None:
            trainer.restore(checkpoint)
            if writer:
                writer.truncate_history(trainer.start, config.log_every)
        cfg = config
        refine = [RefineRanking(cfg.refine_window, cfg.refine_examples, cfg.refine_budget)]
        trainer.callbacks = [
            *callbacks,
            *([distributed.DataParallel(ctx)] if ctx.active else []),
            ProgressBar(disable=quiet or not ctx.is_main),
            # before the run directory, which saves the refined ranking with the noise
            *(refine if cfg.refine_window else []),
            *(
                [EdgeCircuitCurve(cfg.refine_examples, cfg.refine_window > 0)]
                if noise.kind == "edges"
                else []
            ),
            *([RunDirectory(writer)] if writer else []),
        ]
        result = trainer.fit()
    finally:
        if writer:
            writer.close()  # its lock (the OS releases it too when the process dies)
    result.run_dir = writer.path if writer else None
    return result
