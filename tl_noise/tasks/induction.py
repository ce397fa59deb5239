"""Induction: random token sequences that repeat with a period (Olsson et al., 2022,
https://arxiv.org/abs/2209.11895).

Each sequence draws ``p`` i.i.d. uniform tokens and repeats them, ``x[t] = x[t - p]``, so every
token after the first period is predictable by an induction head (find the earlier copy of the
current token, copy what followed it) and by nothing else. Works for any vocabulary, including the
embedded toy model's.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.tasks.base import Batch, Task
from tl_noise.tasks.text import next_token_cross_entropy


def induction_batch_loss(
    logits: Float[Tensor, "b pos d_vocab"],
    tokens: Int[Tensor, "b pos"],
    mask: Bool[Tensor, "b pos"],
) -> Float[Tensor, ""]:
    """Mean cross-entropy of the repeated tokens: ``-log p(tokens[:, t + 1] | logits[:, t])``
    averaged over the positions ``t`` where ``mask`` is True."""
    return next_token_cross_entropy(logits, tokens, mask)


def induction_metric(logits: Float[Tensor, "b pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
    """Task metric: cross-entropy of the predictable (repeated) next tokens; lower is better."""
    return induction_batch_loss(logits, batch["tokens"], batch["loss_mask"])


def induction_task(
    d_vocab: int,
    n: int = 256,
    seq_len: int = 32,
    min_period: int = 4,
    max_period: int | None = None,
    seed: int = 0,
    bos: int | None = None,
) -> Task:
    """``n`` periodic random sequences of ``seq_len`` tokens.

    With ``o = 1`` if ``bos`` is given (then ``tokens[:, 0] = bos``) else ``0``, sequence ``i``
    has a period ``p_i`` uniform in ``[min_period, max_period]`` (default ``seq_len // 2``) and
    ``tokens[i, t] = tokens[i, t - p_i]`` for ``t >= o + p_i``; the first period is uniform over
    ``[0, d_vocab)`` minus ``bos``. ``loss_mask[i, t]`` is True exactly when the next token is a
    repeat, ``o + p_i <= t + 1 < seq_len``. ``extras["period"]`` is ``[n]``.
    """
    offset = 0 if bos is None else 1
    max_period = seq_len // 2 if max_period is None else max_period
    if d_vocab < 2:
        raise ValueError(f"d_vocab={d_vocab}; expected >= 2")
    if bos is not None and not 0 <= bos < d_vocab:
        raise ValueError(f"bos={bos} is outside the vocabulary [0, {d_vocab})")
    if n < 1:
        raise ValueError(f"n={n}; expected >= 1")
    if not 1 <= min_period <= max_period:
        raise ValueError(f"periods [{min_period}, {max_period}]; expected 1 <= min <= max")
    if max_period >= seq_len - offset:
        raise ValueError(
            f"max_period={max_period} leaves nothing to repeat in seq_len={seq_len}"
            f"{' after BOS' if offset else ''}; expected max_period <= {seq_len - offset - 1}"
        )
    gen = torch.Generator().manual_seed(seed)
    length = seq_len - offset
    period = torch.randint(min_period, max_period + 1, (n,), generator=gen)
    first = torch.randint(0, d_vocab - offset, (n, max_period), generator=gen)
    if bos is not None:
        first = first + (first >= bos).long()  # skip the BOS id
    tokens = first.gather(1, torch.arange(length)[None, :] % period[:, None])
    if bos is not None:
        tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.long), tokens], dim=1)
    following = torch.arange(1, seq_len + 1)[None, :]  # index of the token predicted at t
    loss_mask = (following >= offset + period[:, None]) & (following < seq_len)
    info = {"d_vocab": d_vocab, "n": n, "seq_len": seq_len, "min_period": min_period,
            "max_period": max_period, "seed": seed, "bos": bos}  # fmt: skip
    return Task("induction", tokens, loss_mask, metric=induction_metric,
                extras={"period": period}, info=info)  # fmt: skip
