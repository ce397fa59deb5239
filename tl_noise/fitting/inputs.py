"""What a fit runs on: tokens, loss mask and per-example extras, checked before anything runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_noise.errors import TLNoiseTypeError, TLNoiseValueError
from tl_noise.hooks import NoiseHooks, check_model, check_tokens
from tl_noise.hooks.noise_hooks import CORRUPTED_KEY
from tl_noise.tasks.base import Task


@dataclass
class FitData:
    """Token ids ``[n, pos]``, the bool ``loss_mask`` ``[n, pos]``, per-example ``extras`` (rows
    indexed like the tokens), the task's metric and the task's description for the run."""

    tokens: Int[Tensor, "n pos"]
    mask: Bool[Tensor, "n pos"]
    extras: dict[str, Tensor] = field(default_factory=dict)
    metric: Callable[..., Tensor] | None = None
    task_info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def batch(self, idx: Tensor, device: torch.device) -> dict[str, Tensor]:
        """The examples ``idx`` on ``device``: tokens, loss_mask, index and the extras."""
        out = {
            "tokens": self.tokens[idx].to(device),
            "loss_mask": self.mask[idx].to(device),
            "index": idx,
        }
        out.update({k: v[idx].to(device) for k, v in self.extras.items()})
        return out


def _check_mask(tokens: Tensor, loss_mask: Any) -> Tensor:
    if loss_mask is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    if (
        not isinstance(loss_mask, Tensor)
        or loss_mask.dtype != torch.bool
        or loss_mask.shape != tokens.shape
    ):
        raise TLNoiseValueError(
            f"loss_mask must be a bool tensor of shape {list(tokens.shape)}, got "
            f"{getattr(loss_mask, 'dtype', type(loss_mask))} "
            f"{list(getattr(loss_mask, 'shape', []))}"
        )
    if loss_mask.device.type == "meta":
        raise TLNoiseValueError("loss_mask is on the meta device (no data); pass a real bool mask")
    if not loss_mask.any():
        raise TLNoiseValueError("loss_mask selects no position: nothing to preserve")
    return loss_mask


def prepare_data(
    model: Any,
    noise: Any,
    tokens: Int[Tensor, "n pos"] | Task,
    loss_mask: Bool[Tensor, "n pos"] | None,
    metric: Callable[..., Tensor] | None,
    task_info: dict[str, Any] | None,
    corrupted_tokens: Int[Tensor, "n pos"] | None = None,
) -> FitData:
    """Check model, noise, tokens and mask (a :class:`~tl_noise.tasks.Task` supplies its own
    mask, metric and extras unless given explicitly); ``corrupted_tokens`` (edge noise only)
    become the extra :data:`~tl_noise.hooks.noise_hooks.CORRUPTED_KEY`."""
    extras: dict[str, Tensor] = {}
    if isinstance(tokens, Task):
        task = tokens
        tokens, loss_mask = task.tokens, loss_mask if loss_mask is not None else task.loss_mask
        metric = metric or task.metric
        extras = task.extras
        task_info = task_info or {"name": task.name, **task.info}
    check_model(model)
    if not isinstance(noise, NoiseHooks):
        raise TLNoiseTypeError(
            f"noise must be NoiseHooks from tl_noise.attach_noise, got {type(noise).__name__}"
        )
    if noise.model is not model:
        raise TLNoiseValueError("noise is attached to a different model than the one passed to fit")
    check_tokens(model, tokens)
    mask = _check_mask(tokens, loss_mask)
    if corrupted_tokens is not None:
        extras = {**extras, CORRUPTED_KEY: _check_corrupted(model, noise, tokens, corrupted_tokens)}
    return FitData(tokens, mask, extras, metric, dict(task_info or {}))


def _check_corrupted(model: Any, noise: NoiseHooks, tokens: Tensor, corrupted: Any) -> Tensor:
    if noise.kind != "edges":
        raise TLNoiseValueError(
            "corrupted_tokens (noise resampled from counterfactuals) needs edge noise "
            f"(tn.attach_edge_noise); this noise is {noise.kind!r}"
        )
    if not isinstance(corrupted, Tensor) or corrupted.shape != tokens.shape:
        raise TLNoiseValueError(
            f"corrupted_tokens must be a tensor shaped like the tokens {list(tokens.shape)} "
            f"(each example's counterfactual), got {list(getattr(corrupted, 'shape', []))}"
        )
    check_tokens(model, corrupted, "corrupted_tokens")
    return corrupted
