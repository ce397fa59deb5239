"""Data-parallel fitting on ``torch.distributed`` (``torchrun --nproc_per_node=N ...``).

Every rank holds the same model and noise. A step's batch (a function of seed and step) is split
into contiguous shards, one per rank; each rank backpropagates its shard, the task-loss gradients
are summed across ranks with weights proportional to each shard's share of the loss terms, and
every rank applies the same update, so all ranks keep identical noise parameters. Rank 0 alone
writes the run directory and shows the progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from tl_noise.fitting.callbacks import Callback

if TYPE_CHECKING:
    from tl_noise.fitting.trainer import FitResult, Trainer


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Context:
    """The process group of this run, initialising it from torchrun's environment if needed."""
    if not dist.is_available():
        return Context()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Context()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Context(rank=dist.get_rank(), world=dist.get_world_size())


def shard(index: Tensor, ctx: Context) -> tuple[Tensor, int]:
    """This rank's contiguous slice of ``index`` and its row offset in the global batch."""
    if not ctx.active:
        return index, 0
    chunks = torch.tensor_split(index, ctx.world)
    offset = sum(len(c) for c in chunks[: ctx.rank])
    return chunks[ctx.rank], offset


def weighted_sum(grads: list[Tensor], weight: float, ctx: Context) -> list[Tensor]:
    """``sum_r weight_r * grads_r`` over ranks (one flattened all-reduce)."""
    if not ctx.active:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    dist.all_reduce(flat)
    out, start = [], 0
    for g in grads:
        out.append(flat[start : start + g.numel()].view_as(g))
        start += g.numel()
    return out


def all_sum(value: float, ctx: Context, device: torch.device) -> float:
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


class DataParallel(Callback):
    """The callback that makes a fit data-parallel: each rank runs its contiguous shard of the
    step's batch, draws the matching rows of the global noise draw, and the task loss and
    gradients are summed across ranks weighted by each shard's share of the loss terms."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.weight = 1.0

    def on_batch(self, trainer: Trainer, step: int, idx: Tensor) -> Tensor:
        local, offset = shard(idx, self.ctx)
        trainer.noise.set_batch_shard(offset, min(trainer.config.batch_size, len(trainer.data)))
        return local

    def reduce_task(self, trainer: Trainer, value: float, terms: float) -> float:
        self.weight = terms / all_sum(terms, self.ctx, trainer.device)
        return all_sum(value * self.weight, self.ctx, trainer.device)

    def reduce_grads(
        self, trainer: Trainer, g_noise: list[Tensor], g_task: list[Tensor], rows: int
    ) -> tuple[list[Tensor], list[Tensor]]:
        g_task = weighted_sum(g_task, self.weight, self.ctx)
        if trainer.has_estimator:  # input-dependent stds: the noise loss depends on the batch
            g_noise = weighted_sum(g_noise, rows / trainer.config.batch_size, self.ctx)
        return g_noise, g_task

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        trainer.noise.clear_batch_shard()

    def on_error(self, trainer: Trainer, step: int, error: BaseException) -> None:
        trainer.noise.clear_batch_shard()
