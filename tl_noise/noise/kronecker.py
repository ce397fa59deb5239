"""Kronecker-structured covariance ``Sigma = kron(A A^T, B B^T)`` for one activation unit.

Split out of :mod:`tl_noise.noise.covariance` (which re-exports it): same conventions, a unit of
shape ``shape`` flattened row-major into ``P`` entries, noise ``S @ eps`` with ``S = kron(A, B)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_noise.noise.covariance import (
    FactorizedCovariance,
    _check_fits,
    _check_rank,
    _check_scale,
    _check_shape,
    _is_int,
    _register,
)

__all__ = ["KroneckerCovariance"]


@_register
class KroneckerCovariance(FactorizedCovariance):
    """Kronecker-structured ``Sigma = kron(A A^T, B B^T)``, i.e. ``S = kron(A, B)``.

    ``initialize_parameters(shape, split)`` splits the unit's axes: the input factor
    ``A = input_factor`` (``P_in x R_in``, ``P_in = prod(shape[:split])``) covers the leading axes,
    the output factor ``B = output_factor`` (``P_out x R_out``, ``P_out = prod(shape[split:])``)
    the trailing ones. For ``hook_z`` (``shape = (n_heads, d_head)``, ``split = 1``) ``A`` covers
    heads and ``B`` covers ``d_head``: ``Cov(z[h, d], z[g, e]) = (A A^T)[h, g] (B B^T)[d, e]``, one
    ``d_head`` covariance shared by all heads; for ``(pos, d_model)``, positions x features.
    Row-major flattening puts the leading axes outermost, so ``A`` is the first ``kron`` operand.
    ``factor_matmul`` reshapes ``eps`` to ``X: [*sample, R_in, R_out]`` and returns ``A X B^T``
    (``= kron(A, B) @ eps``) in ``O(P_in R_in R_out + P R_out)``; ``kron(A, B)`` is never formed.

    Rank ``R = R_in R_out``. ``reset_parameters(s)`` draws ``A ~ N(0, s / R_in)`` and
    ``B ~ N(0, s / R_out)`` (variances: the scale is split evenly), so ``E[Sigma_pp] = s^2``.
    ``lr_scaling``: ``1 / R_in`` and ``1 / R_out``.

    Unlike inferno's ``KroneckerCovariance``, which serves a layer weight: there ``A`` covers the
    weight's input axes (plus bias), and the flat sample, ordered input-major as ``kron(A, B)``,
    is viewed as the weight's ``(out, *in)`` shape, so ``B`` does not line up with the output
    axis. Here the factors follow the activation's axes and ranks above ``P_in`` / ``P_out`` raise.

    Args:
        input_rank: ``R_in <= P_in``, or None for ``P_in``.
        output_rank: ``R_out <= P_out``, or None for ``P_out``.
    """

    def __init__(self, input_rank: int | None = None, output_rank: int | None = None) -> None:
        super().__init__()
        self._requested_ranks = (
            _check_rank("input_rank", input_rank, allow_none=True),
            _check_rank("output_rank", output_rank, allow_none=True),
        )
        self._ranks, self._split = (0, 0), 0

    def initialize_parameters(
        self, shape: Sequence[int], split: int = 1, *, device: Any = None, dtype: Any = None
    ) -> None:
        """Create ``A`` over ``shape[:split]`` and ``B`` over ``shape[split:]``, then reset them."""
        shape = _check_shape(shape)
        if not _is_int(split) or not 1 <= split < len(shape):
            raise ValueError(
                f"split must be an int in [1, {len(shape) - 1}] so that each Kronecker factor "
                f"covers at least one axis of shape {shape}, got {split!r}"
            )
        p_in, p_out = math.prod(shape[:split]), math.prod(shape[split:])
        r_in, r_out = self._requested_ranks[0] or p_in, self._requested_ranks[1] or p_out
        _check_fits("input_rank", r_in, p_in, f"P_in, the size of axes {shape[:split]}")
        _check_fits("output_rank", r_out, p_out, f"P_out, the size of axes {shape[split:]}")
        self._shape, self._rank, self._split = shape, r_in * r_out, split
        self._ranks = (r_in, r_out)
        self.input_factor = nn.Parameter(torch.empty(p_in, r_in, device=device, dtype=dtype))
        self.output_factor = nn.Parameter(torch.empty(p_out, r_out, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, mean_parameter_scales: float = 1.0) -> None:
        """Draw ``A ~ N(0, s / R_in)``, ``B ~ N(0, s / R_out)`` so that ``E[Sigma_pp] = s^2``."""
        s = _check_scale(mean_parameter_scales)
        self._require_init()
        nn.init.normal_(self.input_factor, 0.0, math.sqrt(s / self.input_rank))
        nn.init.normal_(self.output_factor, 0.0, math.sqrt(s / self.output_rank))

    @property
    def input_rank(self) -> int:
        """``R_in``, the rank of ``A`` (the leading axes' factor)."""
        self._require_init()
        return self._ranks[0]

    @property
    def output_rank(self) -> int:
        """``R_out``, the rank of ``B`` (the trailing axes' factor)."""
        self._require_init()
        return self._ranks[1]

    @property
    def split(self) -> int:
        """How many leading axes of ``shape`` ``A`` covers."""
        self._require_init()
        return self._split

    @property
    def lr_scaling(self) -> dict[str, float]:
        """``{"input_factor": 1 / R_in, "output_factor": 1 / R_out}``."""
        return {"input_factor": 1.0 / self.input_rank, "output_factor": 1.0 / self.output_rank}

    def factor_matmul(self, eps: Float[Tensor, "*sample rank"]) -> Float[Tensor, "*sample *shape"]:
        """``A X B^T`` with ``X = eps.reshape(*sample, R_in, R_out)``, reshaped to ``shape``."""
        self._check_eps(eps)
        a, b = self.input_factor.to(eps.dtype), self.output_factor.to(eps.dtype)
        x = eps.reshape(*eps.shape[:-1], self.input_rank, self.output_rank)
        return (a @ x @ b.mT).reshape(*eps.shape[:-1], *self.shape)

    def to_dense(self) -> Float[Tensor, "P P"]:
        """``kron(A A^T, B B^T)`` over row-major flattened units."""
        a, b = self.input_factor, self.output_factor
        return torch.kron(a @ a.mT, b @ b.mT)

    def _config_kwargs(self) -> dict[str, Any]:
        return {"input_rank": self._requested_ranks[0], "output_rank": self._requested_ranks[1]}
