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

import torch
import torch.distributed as dist
from torch import Tensor


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
