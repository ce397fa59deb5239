"""A reader group rebuilt (and, for heads, normed and projected) chunk by chunk in one autograd
function that keeps nothing of size ``tokens x readers x d_model`` for the backward.

A group of ``R`` readers reading the residual stream ``x`` (``[batch, pos, d_model]``) reads

.. math::  y_r = x + s_r \\odot \\epsilon_r + \\sum_{w < W} \\sigma_{r w}\\,\\mathrm{rows}_w

(:mod:`tl_noise.edges.noise`: ``s_r`` the std of its noise, ``rows_w = mu_w - c_w`` from the
:class:`~tl_noise.edges.store.WriterStore`) and, for a layer's heads, returns
``LN1(y_r) W_r + b_r`` (the layer norm's weight and bias folded into ``W_r``, ``b_r``:
:class:`Projection`), else ``y_r``. The tokens are taken in chunks small enough to stay in
cache (:func:`chunk_tokens`); per chunk the sum over writers is one batched product over the
chunk's tokens. The backward draws ``eps`` again (:class:`~tl_noise.edges.draws.TokenDraw`) and
recomputes ``y`` (and the norm, by the same fused kernel: bit for bit the same) chunk by chunk,
so a layer keeps nothing but its ``tokens x R x d_head`` outputs, and returns

* ``d/dx = sum_r g_r``, ``d/ds_r = sum_tokens g_r eps_r`` and
  ``d/dsigma_rw = sum_tokens g_r . rows_w`` (``g_r = dloss/dy_r``; for heads through the norm's
  backward below), and
* ``sigma^T g`` for the rows, accumulated into the store's gradient
  (:meth:`~tl_noise.edges.store.WriterStore.grad_rows`).

With ``xhat = (y - mean) rstd`` (``rstd = 1/sqrt(var + eps)``) and ``g = dloss/dxhat``, the
layer norm's backward is ``dloss/dy = rstd (g - mean(g) - xhat mean(g xhat))``; RMS norm drops
the centring (``xhat = y rstd``, no ``mean(g)`` term).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_noise.edges.draws import TokenDraw
from tl_noise.edges.store import WriterStore

CHUNK_BYTES = {"cpu": 4 * 2**20}
"""Bytes of one ``[chunk, R, d_model]`` float32 working tensor, by device type (others: the
whole batch at once, up to :data:`MAX_CHUNK_BYTES`)."""
MAX_CHUNK_BYTES = 512 * 2**20


def chunk_tokens(device: torch.device, readers: int, width: int) -> int:
    """Tokens per chunk for ``readers`` readers of ``width`` (the same on every rank)."""
    budget = CHUNK_BYTES.get(device.type, MAX_CHUNK_BYTES)
    return max(1, budget // (4 * readers * width))


@dataclass
class Projection:
    """A layer's heads' ``LN1(y) W + b`` as ``xhat(y) @ weight + bias`` (see the module doc):
    ``kind`` ``"LN"``/``"LNPRE"`` (centred), ``"RMS"``/``"RMSPRE"`` or None (no norm);
    ``weight`` ``[R, d_model, d_head]``, ``bias`` ``[R, d_head]``."""

    kind: str | None
    eps: float
    weight: Tensor
    bias: Tensor

    def normalize(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(xhat, rstd)`` of ``y`` ``[n, R, d]`` (``rstd`` ``[n, R, 1]``; None without a
        norm), by torch's fused kernels: recomputed in the backward, bit for bit the same."""
        if self.kind in ("LN", "LNPRE"):
            xhat, _, rstd = torch.native_layer_norm(y, y.shape[-1:], None, None, self.eps)
            return xhat, rstd
        if self.kind in ("RMS", "RMSPRE"):
            return _rms_norm(y, self.eps)
        return y, None

    def backward_(self, g: Tensor, xhat: Tensor, rstd: Tensor | None) -> Tensor:
        """``dloss/dy`` from ``g = dloss/dxhat`` ``[n, R, d]``, in place on ``g`` (``xhat``
        is overwritten)."""
        if rstd is None:
            return g
        inner = (g * xhat).mean(-1, keepdim=True)
        if self.kind in ("LN", "LNPRE"):
            g.sub_(g.mean(-1, keepdim=True))
        g.sub_(xhat.mul_(inner))
        return g.mul_(rstd)


def _rms_norm(y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(y rstd, rstd)``, ``rstd = 1 / sqrt(mean(y^2) + eps)``."""
    fused = getattr(torch.ops.aten, "_fused_rms_norm", None)
    if fused is not None:
        xhat, rstd = fused(y, list(y.shape[-1:]), None, eps)
        return xhat, rstd
    rstd = (y.square().mean(-1, keepdim=True) + eps).rsqrt()
    return y * rstd, rstd


@dataclass
class Group:
    """One reader group's call: ``store`` (None: nothing contracted, the additive form),
    ``draw`` (None: no noise), ``projection`` (None: the readers return ``y``), ``chunk``
    (tokens per chunk without a draw)."""

    store: WriterStore | None
    draw: TokenDraw | None
    projection: Projection | None
    chunk: int

    def ranges(self, tokens: int) -> list[tuple[int, int]]:
        if self.draw is not None:
            return self.draw.ranges()
        return [(a, min(a + self.chunk, tokens)) for a in range(0, tokens, self.chunk)]

    def largest(self, tokens: int) -> int:
        return max(b - a for a, b in self.ranges(tokens))

    def chunks(self, tokens: int, again: bool) -> Iterator[tuple[int, int, Tensor | None]]:
        """``(start, stop, eps)`` of every chunk (``eps`` None without a draw); the first
        pass through a draw consumes the whole global draw."""
        if self.draw is None:
            for a in range(0, tokens, self.chunk):
                yield a, min(a + self.chunk, tokens), None
            return
        yield from (
            (a, b, eps)
            for (a, b), eps in zip(self.ranges(tokens), self.draw.chunks(again), strict=True)
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _rebuild(y: Tensor, x: Tensor, std: Tensor | None, eps: Tensor | None,
             sigma: Tensor, rows: Tensor | None) -> Tensor:  # fmt: skip
    """``y = x + std * eps + sigma @ rows`` for one chunk, in place on ``y`` ``[n, R, d]``."""
    if eps is not None and std is not None:
        torch.addcmul(x[:, None, :], eps.to(y.dtype), std, out=y)
    else:
        y.copy_(x[:, None, :].expand(y.shape))
    if rows is not None:
        y.baddbmm_(sigma.expand(y.shape[0], *sigma.shape), rows.to(y.dtype))
    return y


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sigma: Tensor, std: Tensor | None, group: Group,
                *handles: Tensor) -> Tensor:  # fmt: skip
        batch, pos, d = x.shape
        tokens, (readers, n_writers) = batch * pos, sigma.shape
        dtype = _compute_dtype(x.dtype)
        xf, sig = x.reshape(tokens, d).to(dtype), sigma.to(dtype)
        sd = None if std is None else std.to(dtype)
        proj = group.projection
        rows = None if group.store is None else group.store.rows[:, :n_writers]
        width = d if proj is None else proj.weight.shape[-1]
        weight = None if proj is None else proj.weight.to(dtype)
        out = x.new_empty(tokens, readers, width)
        work = x.new_empty(group.largest(tokens), readers, d, dtype=dtype)
        for a, b, eps in group.chunks(tokens, again=False):
            y = _rebuild(work[: b - a], xf[a:b], sd, eps, sig, None if rows is None else rows[a:b])
            if proj is None or weight is None:
                out[a:b] = y
                continue
            xhat, _ = proj.normalize(y)
            out[a:b] = torch.bmm(xhat.transpose(0, 1), weight).transpose(0, 1)
        if proj is not None:
            out += proj.bias.to(out.dtype)
        ctx.group, ctx.shape = group, x.shape
        ctx.save_for_backward(x, sigma, std)
        return out.view(batch, pos, readers, width)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, sigma, std = ctx.saved_tensors
        group, (batch, pos, d) = ctx.group, ctx.shape
        need = ctx.needs_input_grad
        tokens, (readers, n_writers) = batch * pos, sigma.shape
        dtype = _compute_dtype(x.dtype)
        xf, sig = x.reshape(tokens, d).to(dtype), sigma.to(dtype)
        sd = None if std is None else std.to(dtype)
        proj, store = group.projection, group.store
        gout = grad_out.reshape(tokens, readers, -1).to(dtype)
        weight_t = None if proj is None else proj.weight.to(dtype).transpose(1, 2)
        rows = None if store is None else store.rows[:, :n_writers]
        grad_rows, fresh = (None, False)
        if store is not None and any(need[4:]):
            grad_rows, fresh = store.grad_rows(n_writers)
        grad_x = x.new_empty(tokens, d, dtype=dtype) if need[0] else None
        grad_sigma = sig.new_zeros(sig.shape) if need[1] and rows is not None else None
        grad_std = sig.new_zeros(readers, d) if need[2] and std is not None else None
        work = x.new_empty(group.largest(tokens) if proj else 0, readers, d, dtype=dtype)
        sigma_t = sig.T.contiguous()
        for a, b, eps in group.chunks(tokens, again=True):
            if proj is not None and weight_t is not None:
                y = _rebuild(work[: b - a], xf[a:b], sd, eps, sig,
                             None if rows is None else rows[a:b])  # fmt: skip
                xhat, rstd = proj.normalize(y)
                g = torch.bmm(gout[a:b].transpose(0, 1), weight_t)
                # token-major and contiguous: the batched products below then run as one call
                gy = proj.backward_(g.transpose(0, 1).contiguous(), xhat, rstd)
            else:
                gy = gout[a:b]
            if grad_x is not None:
                torch.sum(gy, 1, out=grad_x[a:b])
            if grad_std is not None and eps is not None:
                grad_std += eps.to(dtype).mul_(gy).sum(0)
            if rows is None:
                continue
            chunk = rows[a:b].to(dtype)
            if grad_sigma is not None:
                grad_sigma += torch.bmm(gy, chunk.transpose(1, 2)).sum(0)
            if grad_rows is not None:  # beta 0: a fresh gradient's first values
                grad_rows[a:b].baddbmm_(sigma_t.expand(b - a, *sigma_t.shape), gy,
                                        beta=0.0 if fresh else 1.0)  # fmt: skip
        grads: list[Tensor | None] = [
            None if grad_x is None else grad_x.view(batch, pos, d).to(x.dtype),
            None if grad_sigma is None else grad_sigma.to(sigma.dtype),
            None if grad_std is None else grad_std.to(std.dtype),
            None,
        ]
        return (*grads, *[None if store is None else grad_out.new_zeros(()) for _ in need[4:]])


def read(
    x: Float[Tensor, "batch pos d_model"],
    sigma: Float[Tensor, "readers writers"],
    std: Float[Tensor, "readers d_model"] | None,
    group: Group,
) -> Float[Tensor, "batch pos readers width"]:
    """The group's readers (module doc): ``width`` is ``d_head`` with a projection, else
    ``d_model``."""
    handles = [] if group.store is None else group.store.handles(sigma.shape[1])
    return _Read.apply(x, sigma, std, group, *handles)
