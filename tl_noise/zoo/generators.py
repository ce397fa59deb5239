"""The zoo's sequence generators: seeded, offline, shared by the loader and the training script.

Two families, both with ``BOS = 0`` at position 0:

``copy`` (the ``backup`` and ``distractor`` models). Text from an order-``k`` n-gram model (low-rank
tables, :func:`ngram_tables`), with
one *copied span*: ``L`` uniform random tokens at ``[r, r + L)`` (the source) repeated at
``[s, s + L)``. Every text token is drawn from ``softmax(sum_j tables[j][x_{t-1-j}])`` over
``1 .. d_vocab - 1``: ``tables[0]`` is the bigram table, ``tables[1]`` the skip-bigram table on
the token before, and so on. A copied token ``s + i`` (``i >= 1``) is predictable only by
induction (the source is uniform, so the n-gram tables know nothing about it); those are the
target positions: ``loss_mask[t]`` is True for ``t in [s, s + L - 2]`` (the prediction made at
``t`` is of token ``t + 1``).

``lookup`` (the ``mlp`` model). Triples ``a b c`` after BOS: ``a`` uniform over the first
alphabet, ``b`` uniform over the second, ``c = latin[a, b]`` from a Latin square over the third
(a uniform ``c`` with probability ``noise``).
Every row and column of a Latin square is a permutation, so neither ``a`` nor ``b`` alone says
anything about ``c``: the model must bring ``a`` to the position of ``b`` (attention) and compute
the pair's entry (a nonlinearity: an MLP). Target positions are the ``b`` positions.

``repeat`` (the embedded ``induction`` model): ``[BOS, segment, segment, ...]`` with a period
``P`` per row; target positions are the repeated tokens ``t > P`` (their next token is a copy of
the one after the earlier occurrence).

The ``distractor`` model adds *topic* tokens at positions ``1 .. A`` (``anchors``): uniform
tokens whose low-rank tables bias every later text token (:func:`copy_tokens`).

A *corrupted* batch has the same structure (span positions and lengths, or triple layout) and
independently drawn tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

BOS = 0


def ngram_tables(
    d_vocab: int, scales: list[float], rank: int, generator: torch.Generator
) -> Float[Tensor, "k d_vocab d_vocab"]:
    """Random n-gram logit tables ``tables[j][prev_j, next] = scales[j] (A_j B_j^T)[prev_j, next]
    / sqrt(rank)`` with ``A_j, B_j ~ N(0, 1)`` of shape ``[d_vocab, rank]``: entries of standard
    deviation ``scales[j]``, and of low rank, so one head (``d_head >= rank``) can carry a table.
    BOS is never a next token and contributes nothing as a previous one."""
    a = torch.randn(len(scales), d_vocab, rank, generator=generator)
    b = torch.randn(len(scales), d_vocab, rank, generator=generator)
    tables = a @ b.transpose(1, 2) * (torch.tensor(scales)[:, None, None] / rank**0.5)
    tables[:, BOS, :] = 0.0
    tables[:, :, BOS] = float("-inf")
    return tables


def latin_square(order: int, generator: torch.Generator) -> Int[Tensor, "order order"]:
    """A random Latin square: ``pi_c[(pi_a[a] + pi_b[b]) mod order]`` (rows, columns and symbols
    of the cyclic square permuted)."""
    pa, pb, pc = (torch.randperm(order, generator=generator) for _ in range(3))
    return pc[(pa[:, None] + pb[None, :]) % order]


def copy_layout(
    n: int, n_ctx: int, span: tuple[int, int], generator: torch.Generator, start: int = 1
) -> Int[Tensor, "n 3"]:
    """Rows ``(r, s, L)``: source start, copy start, span length; ``start <= r``, ``r + L < s``
    (at least one text token between), ``s + L <= n_ctx``."""
    length = torch.randint(span[0], span[1] + 1, (n,), generator=generator)
    room = n_ctx - start - 2 * length - 1  # free text tokens besides the spans and the gap token
    u = torch.rand(n, 3, generator=generator)
    before = (u[:, 0] * (room + 1)).long().clamp(max=room)
    between = ((u[:, 1] * (room - before + 1)).long()).clamp(max=room - before)
    r = start + before
    s = r + length + 1 + between
    return torch.stack([r, s, length], dim=1)


def copy_tokens(
    layout: Int[Tensor, "n 3"], n_ctx: int, tables: Tensor, generator: torch.Generator,
    anchors: Tensor | None = None,
) -> Int[Tensor, "n n_ctx"]:  # fmt: skip
    """Sequences with the given layout: n-gram text, a uniform source span and its copy.

    With ``anchors: [A, d_vocab, d_vocab]`` the tokens at positions ``1 .. A`` are uniform
    *topic* tokens and every later text token also gets the logits ``anchors[i][x_{1 + i}]``: a
    per-sequence bias that a head reading position ``1 + i`` can supply everywhere, and that
    says nothing about which token is copied.
    """
    n, k, d_vocab = layout.shape[0], tables.shape[0], tables.shape[-1]
    n_anchors = 0 if anchors is None else anchors.shape[0]
    r, s, length = layout.unbind(1)
    tokens = torch.full((n, n_ctx), BOS, dtype=torch.long)
    rows = torch.arange(n)
    for t in range(1, n_ctx):
        logits = torch.zeros(n, d_vocab)
        for j in range(min(k, t)):
            logits = logits + tables[j][tokens[:, t - 1 - j]]
        for i in range(n_anchors if t > n_anchors else 0):
            logits = logits + anchors[i][tokens[:, 1 + i]]  # type: ignore[index]
        cdf = logits.softmax(-1).cumsum(-1)
        u = torch.rand(n, 1, generator=generator) * cdf[:, -1:]
        text = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=d_vocab - 1)
        uniform = torch.randint(1, d_vocab, (n,), generator=generator)
        in_source = ((t >= r) & (t < r + length)) | (t <= n_anchors)
        in_copy = (t >= s) & (t < s + length)
        copied = tokens[rows, (t - (s - r)).clamp(min=0)]
        tokens[:, t] = torch.where(in_source, uniform, torch.where(in_copy, copied, text))
    return tokens


def copy_mask(layout: Int[Tensor, "n 3"], n_ctx: int) -> Bool[Tensor, "n n_ctx"]:
    """Target positions ``t in [s, s + L - 2]``: the next token is a predictable copy."""
    t = torch.arange(n_ctx)[None, :]
    s, length = layout[:, 1:2], layout[:, 2:3]
    return (t >= s) & (t <= s + length - 2)


def text_mask(layout: Int[Tensor, "n 3"], n_ctx: int) -> Bool[Tensor, "n n_ctx"]:
    """Positions ``t >= 1`` whose next token is n-gram text (neither source nor copy)."""
    t = torch.arange(n_ctx)[None, :] + 1  # the predicted token
    r, s, length = layout[:, 0:1], layout[:, 1:2], layout[:, 2:3]
    spans = ((t >= r) & (t < r + length)) | ((t >= s) & (t < s + length))
    return ~spans & (t >= 2) & (t < n_ctx)


def lookup_tokens(
    n: int, n_ctx: int, order: int, latin: Tensor, generator: torch.Generator, noise: float = 0.0
) -> Int[Tensor, "n n_ctx"]:
    """``[BOS, a b c, a b c, ...]`` cut to ``n_ctx``; ``a`` in ``1 .. order``, ``b`` in
    ``order + 1 .. 2 order``, ``c = 2 order + 1 + latin[a, b]`` (uniform over the third alphabet
    with probability ``noise``, which keeps the model's logits finite)."""
    triples = (n_ctx - 1 + 2) // 3
    a = torch.randint(0, order, (n, triples), generator=generator)
    b = torch.randint(0, order, (n, triples), generator=generator)
    c = latin[a, b]
    if noise:  # with probability ``noise`` the third token is uniform instead
        flip = torch.rand(n, triples, generator=generator) < noise
        c = torch.where(flip, torch.randint(0, order, (n, triples), generator=generator), c)
    body = torch.stack([1 + a, 1 + order + b, 1 + 2 * order + c], dim=2).flatten(1)
    return torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body[:, : n_ctx - 1]], dim=1)


def lookup_mask(n: int, n_ctx: int) -> Bool[Tensor, "n n_ctx"]:
    """Target positions: the ``b`` tokens (position ``3 i + 2``), whose next token is ``c``."""
    t = torch.arange(n_ctx)
    mask = (t % 3 == 2) & (t < n_ctx - 1)
    return mask[None, :].expand(n, n_ctx).clone()


def generate(
    data: dict[str, Any], tables: dict[str, Tensor], n: int, seed: int, n_ctx: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tokens, loss_mask, corrupted, layout)`` for a benchmark's ``data`` parameters.

    ``layout`` is ``[n, 3]`` ``(r, s, L)`` for ``copy``, ``[n, 1]`` (the period) for
    ``repeat``, ``[n, 0]`` for ``lookup``.
    """
    gen = torch.Generator().manual_seed(seed)
    if data["kind"] == "copy":
        anchors = tables.get("anchor")
        start = 1 + (0 if anchors is None else anchors.shape[0])
        layout = copy_layout(n, n_ctx, tuple(data["span"]), gen, start)
        tokens = copy_tokens(layout, n_ctx, tables["ngram"], gen, anchors)
        corrupted = copy_tokens(layout, n_ctx, tables["ngram"], gen, anchors)
        return tokens, copy_mask(layout, n_ctx), corrupted, layout
    if data["kind"] == "lookup":
        order = int(data["order"])
        noise = float(data.get("noise", 0.0))
        tokens = lookup_tokens(n, n_ctx, order, tables["latin"], gen, noise)
        corrupted = lookup_tokens(n, n_ctx, order, tables["latin"], gen, noise)
        return tokens, lookup_mask(n, n_ctx), corrupted, torch.zeros(n, 0, dtype=torch.long)
    if data["kind"] == "repeat":
        period = torch.randint(data["periods"][0], data["periods"][1] + 1, (n,), generator=gen)
        tokens = repeat_tokens(period, n_ctx, data["d_vocab"], gen)
        corrupted = repeat_tokens(period, n_ctx, data["d_vocab"], gen)
        mask = torch.arange(n_ctx)[None, :] > period[:, None]  # token t repeats token t - P
        mask[:, -1] = False
        return tokens, mask, corrupted, period[:, None]
    raise ValueError(
        f"unknown benchmark data kind {data['kind']!r}; expected 'copy', 'lookup' or 'repeat'"
    )


def repeat_tokens(
    period: Int[Tensor, " n"], n_ctx: int, d_vocab: int, generator: torch.Generator
) -> Int[Tensor, "n n_ctx"]:
    """``[BOS, s_1 .. s_P, s_1 .. s_P, ...]`` cut to ``n_ctx`` (the embedded model's data,
    ``scripts/train_embedded.py``): a uniform segment over ``1 .. d_vocab - 1`` repeated."""
    segment = torch.randint(1, d_vocab, (period.shape[0], int(period.max())), generator=generator)
    content = segment.gather(1, torch.arange(n_ctx - 1)[None, :] % period[:, None])
    return torch.cat([torch.full((period.shape[0], 1), BOS, dtype=torch.long), content], dim=1)
