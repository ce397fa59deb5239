"""The task contract: tokens, the positions whose predictions count, and an optional metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

Batch = dict[str, Tensor]
Metric = Callable[[Tensor, Batch], Tensor]


@dataclass
class Task:
    """A dataset for fitting and evaluating noise.

    Attributes:
        name: short task name (``"induction"``, ``"ioi"``, ...).
        tokens: ``Int[Tensor, "n pos"]`` token ids (BOS included where the model expects one).
        loss_mask: ``Bool[Tensor, "n pos"]``; True where the *prediction made at that position*
            (of the token at ``pos + 1``) counts for the KL / cross-entropy objectives.
        metric: optional ``metric(logits, batch) -> scalar loss`` (lower is better), e.g. the
            negative IO-vs-S logit difference. ``logits`` is ``[b, pos, d_vocab]``.
        extras: per-example tensors (first axis ``n``) that the metric reads from the batch, e.g.
            ``answers``, ``distractors``, ``metric_positions``.
        info: JSON-serialisable description (parameters, seed) recorded in run configs.
    """

    name: str
    tokens: Int[Tensor, "n pos"]
    loss_mask: Bool[Tensor, "n pos"]
    metric: Metric | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Tensor) or self.tokens.ndim != 2:
            raise TypeError(f"task tokens must be an int tensor [n, pos], got {self.tokens!r:.80}")
        if self.tokens.is_floating_point():
            raise TypeError(f"task tokens must be integers, got dtype {self.tokens.dtype}")
        if self.loss_mask.shape != self.tokens.shape or self.loss_mask.dtype != torch.bool:
            raise ValueError(
                f"loss_mask must be a bool tensor of the tokens' shape {list(self.tokens.shape)}, "
                f"got {self.loss_mask.dtype} {list(self.loss_mask.shape)}"
            )
        for key, value in self.extras.items():
            if value.shape[0] != self.tokens.shape[0]:
                raise ValueError(
                    f"extras[{key!r}] has {value.shape[0]} rows, tokens have {self.tokens.shape[0]}"
                )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def batch(self, index: Int[Tensor, " b"]) -> Batch:
        """The examples at ``index`` as a dict: tokens, loss_mask, index and every extra."""
        out = {"tokens": self.tokens[index], "loss_mask": self.loss_mask[index], "index": index}
        out.update({k: v[index] for k, v in self.extras.items()})
        return out
