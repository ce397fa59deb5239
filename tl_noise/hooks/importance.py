"""Reading fitted noise as importance: ``-log(std)`` per attention head."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.noise_hooks import NoiseHooks
from tl_noise.ranking import head_stds


def head_importance(
    noise: NoiseHooks | dict[str, Tensor], n_layers: int | None = None, n_heads: int | None = None
) -> Float[Tensor, "n_layers n_heads"]:
    """Importance of each attention head: ``-log(std)`` (higher = more important).

    A head that tolerates only tiny noise (std near the parameterization's minimum) is one the
    behaviour depends on. Accepts attached :class:`NoiseHooks` or a ``stds()`` dict (then give
    ``n_layers`` and ``n_heads``). Heads without per-head noise are NaN.
    """
    if isinstance(noise, NoiseHooks):
        stds = noise.stds()
        n_layers = n_layers or int(noise.model.cfg.n_layers)
        n_heads = n_heads or int(noise.model.cfg.n_heads)
    else:
        stds = noise
        if n_layers is None or n_heads is None:
            raise TLNoiseValueError("head_importance(stds_dict) needs n_layers and n_heads")
    return -head_stds(stds, n_layers, n_heads).log()
