"""Callbacks: what happens around the trainer's steps (progress bar, run directory, timing).

A :class:`Callback` sees the trainer at fixed points; every method has a do-nothing default.
:class:`~tl_noise.fitting.distributed.DataParallel` is the callback that shards batches and
reduces losses and gradients across ranks.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

from torch import Tensor
from tqdm.auto import tqdm

from tl_noise.fitting.checkpoint import optimizer_tensors
from tl_noise.hooks import node_importance
from tl_noise.ranking import rank_heads
from tl_noise.runs.writer import RunWriter

if TYPE_CHECKING:
    from tl_noise.fitting.trainer import FitResult, Trainer


class Callback:
    """Hooks into a fit; subclass and override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_batch(self, trainer: Trainer, step: int, idx: Tensor) -> Tensor:
        """The example indices this process runs at ``step`` (default: all of them)."""
        return idx

    def on_step_start(self, trainer: Trainer, step: int) -> None: ...

    def reduce_task(self, trainer: Trainer, value: float, terms: float) -> float:
        """The step's task loss over every process (default: this process's value)."""
        return value

    def reduce_grads(
        self, trainer: Trainer, g_noise: list[Tensor], g_task: list[Tensor], rows: int
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The gradients over every process (default: this process's gradients)."""
        return g_noise, g_task

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any] | None) -> None:
        """After the optimiser step; ``record`` is the history record when one was due."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None: ...

    def on_error(self, trainer: Trainer, step: int, error: BaseException) -> None:
        """The fit is about to re-raise ``error`` (Ctrl-C, a non-finite loss, a full disk...)."""


class ProgressBar(Callback):
    """A tqdm bar over the steps, showing the task loss, noise loss and mean std."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        steps = trainer.config.steps
        self.bar = tqdm(
            total=steps, initial=trainer.start, desc="fitting noise", disable=self.disable
        )

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.bar.set_postfix(
                task=f"{record['loss']['task']:.4g}",
                noise=f"{record['loss']['noise']:.3g}",
                std=f"{record['mean_std']:.3g}",
            )
        self.bar.update(1)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self.bar.close()

    def on_error(self, trainer: Trainer, step: int, error: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()


def versions() -> dict[str, str]:
    """Versions of tl-noise and the libraries a run's numbers depend on."""
    out = {}
    for pkg in ("tl-noise", "torch", "transformer-lens", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


class RunDirectory(Callback):
    """Writes the run directory through :class:`~tl_noise.runs.RunWriter`: history records in
    batches, a checkpoint every ``checkpoint_every`` steps, the status, and at the end the
    final noise and ``summary.json``."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer
        self.pending: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.writer.status("running", trainer.start)

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.pending.append(record)
        done, last = step + 1, trainer.last_step(step)
        if done % trainer.config.checkpoint_every == 0 or last:
            self.writer.append_history(self.pending)
            self.pending = []
            tensors = optimizer_tensors(trainer.optimizer)
            self.writer.checkpoint(done, trainer.noise.save, trainer.state(), tensors)
            # "completed" only once final/ and summary.json describe this run (on_fit_end)
            self.writer.status("running", done)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self.writer.append_history(self.pending)
        self.pending = []
        history = result.history or self.writer.last_records()
        done = result.stopped_at or trainer.config.steps
        summary = {
            "importance": result.importance.tolist() if result.importance is not None else None,
            "ranking": rank_heads(result.importance),
            "node_importance": node_importance(trainer.noise),
            "ranking_info": trainer.noise.ranking_info,
            "seconds": result.seconds,
            "final_loss": history[-1]["loss"] if history else None,
            "steps_done": done,
            "stopped_early": result.stopped_at is not None,
        }
        self.writer.write_final(trainer.noise.save, summary)
        self.writer.status("completed", done)

    def on_error(self, trainer: Trainer, step: int, error: BaseException) -> None:
        # say so in status.json; the last checkpoint stays intact
        if isinstance(error, FloatingPointError):
            state, message = "failed", f"{error}; the last good checkpoint is kept"
        else:
            state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            message = f"{type(error).__name__}: {error}"
        try:
            self.writer.status(state, step, message)
        except OSError:
            pass
