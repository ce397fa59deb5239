"""How a learned std turns an activation into a noised one: the additive and the
information-destroying ("replacement") forms.

With ``x`` the activation, ``s`` each unit's natural std and ``mu`` its natural mean (both over a
calibration set), ``eps ~ N(0, I)`` (or ``S eps`` with a structured covariance) and ``sigma`` the
learned std at the layer's granularity:

* ``"additive"``: ``x' = x + sigma * s * eps``. Never removes the unit's information (a large
  enough readout margin survives any bounded sigma) and pushes activations off their
  distribution as sigma grows.
* ``"replacement"``: ``x' = (1 - sigma) x + sigma (mu + s eps)`` with ``sigma in (0, 1]``: an
  interpolation towards a draw from the unit's own marginal (IBA, Schulz et al. 2020; IBCircuit,
  Bian et al. 2025). ``sigma = 1`` is a Gaussian resample-ablation of the unit, so sigma reads as
  "the fraction of the node destroyed" and a fitted circuit is directly comparable to
  mean-ablation faithfulness.

A unit whose activation never varies (``s = 0``: a dead head, an empty MLP, a constant residual
feature) carries no information: both forms leave it unchanged (for replacement ``mu = x`` there).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from tl_noise.errors import TLNoiseValueError

NoiseForm = Literal["additive", "replacement"]
NOISE_FORMS: tuple[NoiseForm, ...] = get_args(NoiseForm)


def check_form(form: str) -> NoiseForm:
    """``form`` as a :data:`NoiseForm`; ValueError listing the accepted ones if not."""
    for accepted in NOISE_FORMS:
        if form == accepted:
            return accepted
    raise TLNoiseValueError(f"form={form!r}; accepted: {', '.join(NOISE_FORMS)}")


def additive(x: Tensor, eps: Tensor, std: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """``x + shift + eps * std * scale`` (``shift``: an optional learned mean, already scaled)."""
    if x.dtype == eps.dtype:  # one fused multiply-add over the full-size tensors
        base = x if shift is None else x + shift.to(x.dtype)
        return torch.addcmul(base, eps, (std * scale).to(x.dtype))
    noise = eps * (std * scale)
    noise = noise if shift is None else noise + shift
    return x + noise.to(x.dtype)


def replacement(
    x: Tensor, eps: Tensor | None, sigma: Tensor, scale: Tensor, mean: Tensor, shift: Tensor | None
) -> Tensor:
    """``x + sigma ((mu + shift - x) + s eps) = (1 - sigma) x + sigma (mu + shift + s eps)``;
    ``eps=None`` gives the deterministic part ``(1 - sigma) x + sigma (mu + shift)``."""
    target = mean if shift is None else mean + shift
    delta = target.to(torch.float32) - x.to(torch.float32)
    if eps is not None:
        delta = torch.addcmul(delta, eps, scale)
    return (x.to(torch.float32) + sigma * delta).to(x.dtype)
