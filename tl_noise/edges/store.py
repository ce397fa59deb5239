"""The writers' ``mu_w - c_w`` of one forward pass, stored once, token-major.

Every reader group ``r`` needs ``sum_w sigma_{r w} (mu_w - c_w)`` over its upstream writers
(:mod:`tl_noise.edges.noise`). :class:`WriterStore` keeps the writers of one forward in a single
``[tokens, writers, d_model]`` tensor, filled in forward order (the writers of any reader are a
prefix of it), so a chunk of tokens of a reader group's rebuild is one batched matrix product
over the chunk's tokens, ``[R, W] @ [W, d_model]`` each (:mod:`tl_noise.edges.readers`).

:class:`_Write` copies a block of ``reference - contribution`` into the store and returns a
scalar handle that ties the block to the readers using it; nothing of the block is kept twice.
The readers' backward accumulates ``sigma^T g`` into the store's gradient (:meth:`grad_rows`);
each block's :class:`_Write` runs after every reader of the block (the handles order them) and
hands ``-grad[rows]`` to the block's contributions.

Rows a reader has read are never written again in the same forward, and every forward pass has
its own store. The two large tensors (rows and their gradient) come from a :class:`BufferPool`
that hands a buffer out again only once the store it was lent to is gone (its forward's graph
freed): a fit step reuses the last step's pages instead of faulting in fresh ones.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def _backward_pass() -> int:
    """The id of the running backward pass (-1 where this torch cannot tell)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return int(current()) if current is not None else -1


class BufferPool:
    """Large tensors lent to owners and handed out again once their owner is garbage."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._lent: list[tuple[Tensor, weakref.ref]] = []

    def take(self, shape: tuple[int, ...], like: Tensor, owner: Any) -> Tensor:
        """An uninitialised ``shape`` tensor of ``like``'s dtype and device for ``owner``."""
        free = [i for i, (_, ref) in enumerate(self._lent) if ref() is None]
        for i in free:
            buffer = self._lent[i][0]
            if (buffer.shape, buffer.dtype, buffer.device) == (shape, like.dtype, like.device):
                self._lent[i] = (buffer, weakref.ref(owner))
                return buffer
        if len(self._lent) >= self.keep and free:
            del self._lent[free[0]]
        buffer = like.new_empty(shape)
        if len(self._lent) < self.keep:
            self._lent.append((buffer, weakref.ref(owner)))
        return buffer

    def clear(self) -> None:
        """Forget every buffer (those still lent stay with their owners)."""
        self._lent = []


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, contribution: Tensor, reference: Tensor, store: WriterStore,
                start: int) -> Tensor:  # fmt: skip
        n = contribution.shape[0]
        tokens = store.rows.shape[0]
        flat = contribution.reshape(n, tokens, -1).transpose(0, 1)
        ref = reference.expand(contribution.shape).reshape(n, tokens, -1).transpose(0, 1)
        torch.sub(ref, flat, out=store.rows[:, start : start + n])
        ctx.store, ctx.start, ctx.shape = store, start, contribution.shape
        return store.rows.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor | None, None, None, None]:
        grad = ctx.store.grad
        if grad is None:
            return None, None, None, None
        n = ctx.shape[0]
        block = grad[:, ctx.start : ctx.start + n].transpose(0, 1)
        return -block.reshape(ctx.shape), None, None, None


class WriterStore:
    """``reference - contribution`` of every writer of one forward pass (see the module doc),
    for activations shaped like ``like`` ``[batch, pos, d_model]``; ``rows``: ``[batch * pos,
    n_writers, d_model]``."""

    def __init__(self, n_writers: int, like: Tensor, pool: BufferPool | None = None) -> None:
        self.shape = tuple(like.shape)
        self.pool = pool or BufferPool(keep=0)
        shape = (like.shape[0] * like.shape[1], n_writers, like.shape[-1])
        self.rows = self.pool.take(shape, like, self)
        self.grad: Tensor | None = None  # d loss / d rows, accumulated during a backward pass
        self._pass = -2  # the backward pass (autograd graph task) self.grad belongs to
        self.filled = 0
        self._handles: list[Tensor] = []
        self._ends: list[int] = []

    @property
    def n_writers(self) -> int:
        return self.rows.shape[1]

    def write(self, reference: Tensor, contribution: Tensor) -> None:
        """Append the writers ``contribution`` ``[n, batch, pos, d]`` with what replaces them,
        ``reference`` (broadcast to it)."""
        self._handles.append(_Write.apply(contribution, reference, self, self.filled))
        self.filled += contribution.shape[0]
        self._ends.append(self.filled)

    def handles(self, n_writers: int) -> list[Tensor]:
        """The handles of the blocks making up the first ``n_writers`` writers; ValueError if
        that is not a block boundary."""
        return self._handles[: self._ends.index(n_writers) + 1]

    def release(self) -> None:
        """Drop the handles once the forward pass is over: they and the autograd nodes
        holding this store would otherwise keep each other (and the rows) alive until a garbage
        collection."""
        self._handles = []

    def grad_rows(self, n_writers: int) -> tuple[Float[Tensor, "tokens n d"], bool]:
        """The gradient of the first ``n_writers`` rows in this backward pass, and whether it
        is fresh (its values undefined: the caller's first accumulation overwrites them; the
        rows beyond ``n_writers`` are zeroed). A new pass (e.g. after ``retain_graph=True``)
        starts a fresh gradient."""
        task = _backward_pass()
        fresh = self.grad is None or task != self._pass
        if fresh:
            self.grad, self._pass = self.pool.take(tuple(self.rows.shape), self.rows, self), task
            self.grad[:, n_writers:].zero_()
        assert self.grad is not None
        return self.grad[:, :n_writers], fresh

    def contributions(
        self, reference: Tensor, dtype: torch.dtype = torch.float64
    ) -> Float[Tensor, "writers batch pos d_model"]:
        """``reference - rows`` of the writers stored so far, in ``dtype`` (float64 by default,
        for sums over many tokens): their contributions when ``reference`` is what they were
        written with."""
        rows = self.rows[:, : self.filled].to(dtype).transpose(0, 1)
        return reference[: self.filled].to(dtype) - rows.reshape(self.filled, *self.shape)
