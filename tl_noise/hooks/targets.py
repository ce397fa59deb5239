"""What a prediction is judged against: the next token, or targets the task gives.

A language model's prediction at position ``t`` is judged against the token at ``t + 1``. A
model whose outputs are not next tokens (a compiled RASP program that writes ``reverse(x)[t]`` at
position ``t`` over its own output vocabulary, a classifier) is judged against *targets*:
``targets[i, t]`` is the id the prediction at position ``t`` of row ``i`` should give, or
:data:`NO_TARGET` (-1) where there is none. Every circuit metric of tl-noise is the mean of
``log p(targets[i, t])`` over the positions that ``loss_mask`` selects and that have a target.

:func:`resolve_targets` picks them: the task's own when it has them, else the next tokens when the
model predicts its input vocabulary (``d_vocab_out == d_vocab``) and ``loss_mask`` selects a
position that has a next token, else the clean model's own argmax prediction (what the full model
outputs is what its circuit must reproduce: a compiled program's output, or the answer a prompt
ending at its last position asks for).

>>> next_token_targets(torch.tensor([[5, 6, 7]]))
tensor([[ 6,  7, -1]])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.owners import all_noise_switched_off

NO_TARGET = -1
TARGETS_KEY = "targets"  # the Task extra that holds a task's own targets


def next_token_targets(tokens: Int[Tensor, "n pos"]) -> Int[Tensor, "n pos"]:
    """``tokens[:, t + 1]`` at every ``t``; :data:`NO_TARGET` at the last position."""
    out = torch.full_like(tokens, NO_TARGET)
    out[:, :-1] = tokens[:, 1:]
    return out


def output_vocab(model: Any) -> int:
    """The number of logits per position (``cfg.d_vocab_out``, or ``d_vocab`` when unset)."""
    cfg = model.cfg
    out = getattr(cfg, "d_vocab_out", None)
    return int(cfg.d_vocab) if out is None or int(out) <= 0 else int(out)


def predicts_next_token(model: Any) -> bool:
    """True when the model's logits range over its input vocabulary."""
    return output_vocab(model) == int(model.cfg.d_vocab)


def target_positions(
    loss_mask: Bool[Tensor, "n pos"], targets: Int[Tensor, "n pos"]
) -> Bool[Tensor, "n pos"]:
    """The positions that count: selected by ``loss_mask`` and with a target."""
    return loss_mask & (targets != NO_TARGET)


def target_log_probs(
    logits: Float[Tensor, "b pos vocab"], targets: Int[Tensor, "b pos"], mask: Bool[Tensor, "b pos"]
) -> Float[Tensor, " m"]:
    """``log p(targets[i, t])`` at every counted position ``(i, t)``, in row-major order."""
    keep = target_positions(mask, targets)
    logp = F.log_softmax(logits[keep].float(), dim=-1)
    return logp.gather(-1, targets[keep][:, None]).squeeze(-1)


@torch.no_grad()
def clean_predictions(
    model: Any, tokens: Int[Tensor, "n pos"], batch_size: int = 64
) -> Int[Tensor, "n pos"]:
    """The model's own argmax prediction at every position, with any tl-noise noise on the
    model switched off (the clean model's answer)."""
    device = model_device(model)
    with all_noise_switched_off(model):
        parts = [
            model(tokens[s : s + batch_size].to(device)).argmax(-1).cpu()
            for s in range(0, len(tokens), batch_size)
        ]
    return torch.cat(parts).to(tokens.device)


def check_targets(
    model: Any, tokens: Tensor, loss_mask: Tensor, targets: Tensor
) -> Int[Tensor, "n pos"]:
    """``targets`` as int64, or a TLNoiseValueError naming what is wrong with them."""
    integer = isinstance(targets, Tensor) and not targets.is_floating_point()
    if not integer or targets.dtype == torch.bool:
        raise TLNoiseValueError(
            f"targets must be an integer tensor shaped like the tokens {list(tokens.shape)}, "
            f"got {type(targets).__name__} {getattr(targets, 'dtype', '')}"
        )
    if targets.shape != tokens.shape:
        raise TLNoiseValueError(
            f"targets must be shaped like the tokens {list(tokens.shape)}, "
            f"got {list(targets.shape)}"
        )
    targets = targets.long()
    counted = targets[loss_mask & (targets != NO_TARGET)]
    vocab = output_vocab(model)
    bad = counted[(counted < 0) | (counted >= vocab)]
    if bad.numel():
        raise TLNoiseValueError(
            f"targets hold {int(bad[0])} at a counted position; expected ids in [0, {vocab}) "
            f"(the model's output vocabulary) or {NO_TARGET} for none"
        )
    return targets


def resolve_targets(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    loss_mask: Bool[Tensor, "n pos"],
    targets: Tensor | None = None,
    batch_size: int = 64,
) -> Int[Tensor, "n pos"]:
    """The targets a metric on ``tokens`` uses (see the module docstring); TLNoiseValueError
    when none of the positions ``loss_mask`` selects has one."""
    if targets is not None:
        targets = check_targets(model, tokens, loss_mask, targets)
    elif predicts_next_token(model) and bool(loss_mask[:, :-1].any()):
        targets = next_token_targets(tokens)
    else:  # outputs that are not input tokens, or only last positions (e.g. IOI's answer)
        targets = clean_predictions(model, tokens, batch_size)
    if not bool(target_positions(loss_mask, targets).any()):
        raise TLNoiseValueError("loss_mask selects no position")
    return targets
