"""The writers' ``mu_w - c_w`` of one forward pass, stored once, and the contraction of a reader
group's stds with them.

Every reader group ``r`` needs ``sum_w sigma_{r w} (mu_w - c_w)`` over its upstream writers
(:mod:`tl_noise.edges.noise`). :class:`WriterStore` keeps the writers of one forward in a single
``[writers, batch * pos * d_model]`` matrix, filled in forward order (the writers of any reader
are a prefix of it), so a reader group's rebuild is one matrix product added in place to what
the readers read otherwise. Two autograd functions keep forward and backward lean:

* :class:`_Write` copies a block of ``reference - contribution`` into the store and returns a
  scalar handle that ties the block to the readers using it; nothing of the block is kept twice.
* :class:`_Contract` computes ``base + sigma @ rows[:W]`` (in place on ``base`` when the caller
  owns it; ``base`` is its first input, as autograd expects of in-place operations) and saves
  only ``sigma``. Its backward reads the rows from the store
  (``grad_sigma = g rows^T``) and accumulates ``sigma^T g`` into the store's gradient in place;
  each block's :class:`_Write` runs after every reader of the block (the handles order them)
  and hands ``-grad[rows]`` to the block's contributions.

Rows a reader has read are never written again in the same forward, and every forward pass has
its own store.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def _backward_pass() -> int:
    """The id of the running backward pass (-1 where this torch cannot tell)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return int(current()) if current is not None else -1


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, contribution: Tensor, reference: Tensor, store: WriterStore,
                start: int) -> Tensor:  # fmt: skip
        n = contribution.shape[0]
        store.rows[start : start + n].view(n, *store.shape).copy_(reference - contribution)
        ctx.store, ctx.start, ctx.shape = store, start, contribution.shape
        return store.rows.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor | None, None, None, None]:
        grad = ctx.store.grad
        if grad is None:
            return None, None, None, None
        n = ctx.shape[0]
        return -grad[ctx.start : ctx.start + n].view(ctx.shape), None, None, None


class _Contract(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, base: Tensor, sigma: Tensor, owned: bool, store: WriterStore,
                *handles: Tensor) -> Tensor:  # fmt: skip
        rows = store.rows[: sigma.shape[1]]
        ctx.store, ctx.n, ctx.owned = store, sigma.shape[1], owned
        ctx.save_for_backward(sigma)
        flat = base.view(base.shape[0], -1)
        if owned:  # base itself (no view of it) is marked: autograd needs no copy of it
            flat.addmm_(sigma, rows)
            ctx.mark_dirty(base)
            return base
        return torch.addmm(flat, sigma, rows).view(sigma.shape[0], *store.shape)

    @staticmethod
    def backward(ctx: Any, out_grad: Tensor) -> tuple[Tensor | None, ...]:
        (sigma,) = ctx.saved_tensors
        store, rows = ctx.store, ctx.store.rows[: ctx.n]
        grad = out_grad.reshape(sigma.shape[0], -1)
        needs = ctx.needs_input_grad
        grad_sigma = grad @ rows.T if needs[1] else None
        if any(needs[4:]):
            store.accumulate(sigma, grad)
        grad_base = None
        if needs[0]:
            grad_base = out_grad if ctx.owned else out_grad.sum(0, keepdim=True)
        handles = [grad.new_zeros(()) if need else None for need in needs[4:]]
        return (grad_base, grad_sigma, None, None, *handles)


class WriterStore:
    """``reference - contribution`` of every writer of one forward pass (see the module doc),
    for activations shaped like ``like`` ``[batch, pos, d_model]``."""

    def __init__(self, n_writers: int, like: Tensor) -> None:
        self.shape = tuple(like.shape)
        self.rows = like.new_empty(n_writers, like.numel())
        self.grad: Tensor | None = None  # d loss / d rows, accumulated during a backward pass
        self._pass = -2  # the backward pass (autograd graph task) self.grad belongs to
        self.filled = 0
        self._handles: list[Tensor] = []
        self._ends: list[int] = []

    def write(self, reference: Tensor, contribution: Tensor) -> None:
        """Append the writers ``contribution`` ``[n, batch, pos, d]`` with what replaces them,
        ``reference`` (broadcast to it)."""
        self._handles.append(_Write.apply(contribution, reference, self, self.filled))
        self.filled += contribution.shape[0]
        self._ends.append(self.filled)

    def release(self) -> None:
        """Drop the handles once the forward pass is over: they and the autograd nodes
        holding this store would otherwise keep each other (and the rows) alive until a garbage
        collection."""
        self._handles = []

    def accumulate(self, sigma: Tensor, grad: Tensor) -> None:
        """Add one reader group's ``sigma^T grad`` to the rows' gradient of this backward pass
        (a new pass, e.g. after ``retain_graph=True``, starts from zero)."""
        task = _backward_pass()
        if self.grad is None or task != self._pass:
            self.grad, self._pass = torch.zeros_like(self.rows), task
        self.grad[: sigma.shape[1]].addmm_(sigma.T, grad)

    def contract(
        self, sigma: Float[Tensor, "readers writers"], base: Tensor, owned: bool = False
    ) -> Float[Tensor, "readers batch pos d_model"]:
        """``base + sum_w sigma[r, w] (reference_w - contribution_w)`` for every reader ``r``
        (``base``: ``[readers, batch, pos, d_model]`` or broadcast to it; ``owned``: a fresh
        contiguous tensor nothing else uses, updated in place); the writers are the first
        ``sigma.shape[1]`` of the store, a whole number of its blocks."""
        blocks = self._ends.index(sigma.shape[1]) + 1  # ValueError: not a block boundary
        return _Contract.apply(base, sigma.to(self.rows.dtype), owned, self,
                               *self._handles[:blocks])  # fmt: skip

    def contributions(self, reference: Tensor) -> Float[Tensor, "writers batch pos d_model"]:
        """``reference - rows`` of the writers stored so far (float64): their contributions
        when ``reference`` is what they were written with."""
        rows = self.rows[: self.filled].double().view(self.filled, *self.shape)
        return reference[: self.filled].double() - rows
