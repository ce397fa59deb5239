"""Factorized covariances for Gaussian noise on one activation "unit" tensor.

Noise on a unit of shape ``shape`` (``(n_heads, d_head)`` for ``hook_z``, ``(d_model,)`` for the
residual stream) is ``mean + S @ eps``, ``eps ~ N(0, I_R)``; over the ``P = prod(shape)`` entries,
flattened row-major (C order), its covariance is the ``P x P`` matrix ``Sigma = S S^T``. Each class
is one structure for ``S``; only ``to_dense`` (for tests and small-model analysis) forms ``Sigma``.

The API follows inferno's covariance classes (``inferno.bnn.params``,
https://github.com/JGU-Wuppertal-ML/inferno), redone for activations: one tensor with named axes
instead of a layer's weight and bias, ranks that do not fit raise instead of being clipped, and
the Kronecker factors follow the activation's own axes.

:class:`~tl_noise.noise.kronecker.KroneckerCovariance` lives in :mod:`tl_noise.noise.kronecker`
and is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

__all__ = [
    "FactorizedCovariance", "LowRankCovariance", "DiagonalCovariance", "KroneckerCovariance",
    "GaussianNoise", "covariance_from_config"
]  # fmt: skip

_COVARIANCE_TYPES: dict[str, type[FactorizedCovariance]] = {}


def _register(cls: type[FactorizedCovariance]) -> type[FactorizedCovariance]:
    """Make ``cls`` reachable from :func:`covariance_from_config` under its class name."""
    _COVARIANCE_TYPES[cls.__name__] = cls
    return cls


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_rank(name: str, value: Any, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        accepted = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return int(value)


def _check_fits(name: str, rank: int, limit: int, what: str) -> int:
    if rank <= limit:
        return rank
    raise ValueError(f"{name}={rank} exceeds {what} ({limit}); use a rank in [1, {limit}]")


def _check_shape(shape: Any) -> tuple[int, ...]:
    dims = tuple(shape) if isinstance(shape, Sequence) else None
    if not dims or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def _check_scale(scale: Any) -> float:
    if isinstance(scale, Real) and not isinstance(scale, bool):
        value = float(scale)
        if 0 <= value < math.inf:
            return value
    raise ValueError(f"mean_parameter_scales must be a finite float >= 0, got {scale!r}")


@_register
class FactorizedCovariance(nn.Module):
    """Covariance ``Sigma = S S^T`` with a free factor ``S`` of rank ``R``.

    ``S`` is the parameter ``factor``, shape ``(*shape, R)``, i.e. a ``P x R`` matrix with rows in
    row-major unit order; ``Sigma`` is ``P x P`` of rank ``<= min(P, R)``. ``R = rank``, or ``P``
    (full covariance) when None; ``R > P`` only over-parameterises. Construct with the rank, then
    ``initialize_parameters(shape)`` once the unit is known (inferno's two-step pattern, so a
    config can name a covariance before any model exists).

    Args:
        rank: ``R``, a positive int, or None for ``P``.
    """

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self._requested_rank = _check_rank("rank", rank, allow_none=True)
        self._shape: tuple[int, ...] | None = None
        self._rank: int | None = None

    def initialize_parameters(
        self, shape: Sequence[int], *, device: Any = None, dtype: Any = None
    ) -> None:
        """Create ``factor`` of shape ``(*shape, R)`` and fill it by ``reset_parameters()``."""
        shape = _check_shape(shape)
        rank = self._resolve_rank(math.prod(shape))
        self._shape, self._rank = shape, rank
        self.factor = nn.Parameter(torch.empty(*shape, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def _resolve_rank(self, num_units: int) -> int:
        return num_units if self._requested_rank is None else self._requested_rank

    def reset_parameters(self, mean_parameter_scales: float = 1.0) -> None:
        """Draw ``S_pr ~ N(0, s^2 / R)`` so that ``E[Sigma_pp] = s^2``.

        ``s = mean_parameter_scales`` is the starting noise std, a float >= 0 (no per-tensor dict
        as in inferno: a covariance here covers exactly one tensor).
        """
        s = _check_scale(mean_parameter_scales)
        nn.init.normal_(self.factor, 0.0, s / math.sqrt(self._require_init()[1]))

    def _require_init(self) -> tuple[tuple[int, ...], int]:
        if self._shape is None or self._rank is None:
            name = type(self).__name__
            raise RuntimeError(f"{name} has no parameters yet: call initialize_parameters(shape)")
        return self._shape, self._rank

    @property
    def is_initialized(self) -> bool:
        """Whether ``initialize_parameters`` has run (parameters may still be on ``meta``)."""
        return self._shape is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The unit shape the noise covers (e.g. ``(n_heads, d_head)``)."""
        return self._require_init()[0]

    @property
    def num_units(self) -> int:
        """``P = prod(shape)``, the side of ``Sigma``."""
        return math.prod(self.shape)

    @property
    def rank(self) -> int:
        """``R``, the length of ``eps`` (known once initialised)."""
        return self._require_init()[1]

    @property
    def lr_scaling(self) -> dict[str, float]:
        """Learning-rate multiplier per parameter name: ``1 / R`` for ``factor``."""
        return {"factor": 1.0 / self.rank}

    def _check_eps(self, eps: Tensor) -> None:
        if eps.ndim == 0 or eps.shape[-1] != self.rank:
            raise ValueError(
                f"eps must have last axis of size rank={self.rank}, got shape {tuple(eps.shape)}"
            )

    def factor_matmul(self, eps: Float[Tensor, "*sample rank"]) -> Float[Tensor, "*sample *shape"]:
        """``S @ eps`` per leading index, as ``(*sample, *shape)``; computed in ``eps.dtype``."""
        self._check_eps(eps)
        factor = self.factor.to(eps.dtype).reshape(self.num_units, self.rank)
        return (eps @ factor.mT).reshape(*eps.shape[:-1], *self.shape)

    def to_dense(self) -> Float[Tensor, "P P"]:
        """The dense ``Sigma = S S^T`` over row-major flattened units."""
        factor = self.factor.reshape(self.num_units, self.rank)
        return factor @ factor.mT

    def sample(
        self,
        sample_shape: Sequence[int] = (),
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Float[Tensor, "*sample *shape"]:
        """Zero-mean draws ``S @ eps``, ``eps ~ N(0, I_R)`` (so ``Cov = Sigma``), in ``dtype``.

        ``dtype`` defaults to the parameters'; ``generator`` must be on the parameters' device.
        """
        reference = next(self.parameters())
        dtype = dtype or reference.dtype
        size = (*sample_shape, self.rank)
        eps = torch.randn(size, generator=generator, device=reference.device, dtype=dtype)
        return self.factor_matmul(eps)

    def _config_kwargs(self) -> dict[str, Any]:
        return {"rank": self._requested_rank}

    def to_config(self) -> dict[str, Any]:
        """JSON-ready ``{"type": class name, **ranks}``, read by ``covariance_from_config``."""
        return {"type": type(self).__name__, **self._config_kwargs()}


@_register
class LowRankCovariance(FactorizedCovariance):
    """``Sigma = S S^T`` with ``S`` (``factor``) of shape ``(*shape, R)`` and ``R <= P`` required.

    As :class:`FactorizedCovariance` (``lr_scaling`` ``1 / R``), but the rank must be given and
    ``initialize_parameters`` raises ValueError when it exceeds ``P = prod(shape)``.

    Args:
        rank: ``R``, a positive int.
    """

    def __init__(self, rank: int) -> None:
        super().__init__(rank=_check_rank("rank", rank, allow_none=False))

    def _resolve_rank(self, num_units: int) -> int:
        rank = super()._resolve_rank(num_units)  # the requested rank: __init__ requires one
        return _check_fits("rank", rank, num_units, "the number of units P")


@_register
class DiagonalCovariance(FactorizedCovariance):
    """Independent noise per unit: ``S = diag(scale)``, ``Sigma = diag(scale^2)``.

    Parameter ``scale`` has shape ``shape``; its sign is irrelevant (only ``scale^2`` enters
    ``Sigma``). Rank ``R = P``: ``factor_matmul(eps) = scale * eps.reshape(*sample, *shape)``.
    ``reset_parameters(s)`` draws ``scale ~ N(0, s^2)`` (so ``E[Sigma_pp] = s^2``);
    ``lr_scaling = {"scale": 1}``.
    """

    def __init__(self) -> None:
        super().__init__(rank=None)

    def initialize_parameters(
        self, shape: Sequence[int], *, device: Any = None, dtype: Any = None
    ) -> None:
        """Create ``scale`` of shape ``shape`` and fill it by ``reset_parameters()``."""
        shape = _check_shape(shape)
        self._shape, self._rank = shape, math.prod(shape)
        self.scale = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, mean_parameter_scales: float = 1.0) -> None:
        """Draw ``scale ~ N(0, s^2)`` elementwise, so ``E[Sigma_pp] = s^2``."""
        s = _check_scale(mean_parameter_scales)
        self._require_init()
        nn.init.normal_(self.scale, 0.0, s)

    @property
    def lr_scaling(self) -> dict[str, float]:
        """``{"scale": 1.0}``: each entry of ``scale`` is one standard deviation."""
        return {"scale": 1.0}

    def factor_matmul(self, eps: Float[Tensor, "*sample rank"]) -> Float[Tensor, "*sample *shape"]:
        """``scale * eps`` with ``eps`` reshaped to ``(*sample, *shape)``."""
        self._check_eps(eps)
        return self.scale.to(eps.dtype) * eps.reshape(*eps.shape[:-1], *self.shape)

    def to_dense(self) -> Float[Tensor, "P P"]:
        """``diag(scale^2)`` over row-major flattened units."""
        return torch.diag(self.scale.flatten() ** 2)

    def _config_kwargs(self) -> dict[str, Any]:
        return {}


def covariance_from_config(config: Mapping[str, Any]) -> FactorizedCovariance:
    """Rebuild the (uninitialised) covariance described by ``FactorizedCovariance.to_config()``.

    ValueError if ``config`` has no known ``"type"`` (the message lists the known ones) or carries
    arguments that type does not take.
    """
    if not isinstance(config, Mapping) or "type" not in config:
        raise ValueError(f"covariance config must be a mapping with a 'type' key, got {config!r}")
    kwargs = dict(config)
    name = kwargs.pop("type")
    factory = _COVARIANCE_TYPES.get(name)
    if factory is None:
        raise ValueError(
            f"unknown covariance type {name!r}; known types: {', '.join(sorted(_COVARIANCE_TYPES))}"
        )
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"invalid arguments {kwargs} for {name}: {err}") from err


class GaussianNoise(nn.Module):
    """Gaussian noise ``mean + S @ eps ~ N(mean, Sigma)`` on a unit tensor of shape ``shape``.

    ``mean`` (zeros of shape ``shape``) is a parameter when ``learn_mean`` else a buffer;
    ``covariance`` (default :class:`DiagonalCovariance`) supplies ``S``. An uninitialised
    covariance is initialised here with ``shape`` (a Kronecker one with ``split=1``; initialise it
    yourself first for another split); an initialised one must already have ``shape``.

    Args:
        shape: unit shape, e.g. ``(n_heads, d_head)``.
        covariance: the structure of ``Sigma``.
        learn_mean: whether ``mean`` is trained.
    """

    def __init__(
        self,
        shape: Sequence[int],
        covariance: FactorizedCovariance | None = None,
        learn_mean: bool = True,
    ) -> None:
        super().__init__()
        shape = _check_shape(shape)
        covariance = DiagonalCovariance() if covariance is None else covariance
        if not isinstance(covariance, FactorizedCovariance):
            raise TypeError(f"covariance must be a FactorizedCovariance, got {covariance!r}")
        if not covariance.is_initialized:
            covariance.initialize_parameters(shape)
        elif covariance.shape != shape:
            raise ValueError(
                f"covariance was initialised for shape {covariance.shape}, not {shape}"
            )
        self.covariance = covariance
        reference = next(covariance.parameters())
        mean = torch.zeros(shape, device=reference.device, dtype=reference.dtype)
        if learn_mean:
            self.mean = nn.Parameter(mean)
        else:
            self.register_buffer("mean", mean)

    @property
    def shape(self) -> tuple[int, ...]:
        """The unit shape."""
        return self.covariance.shape

    def reset_parameters(self, scale: float = 1.0) -> None:
        """Zero ``mean`` and reset the covariance so that ``E[Sigma_pp] = scale^2``."""
        with torch.no_grad():
            self.mean.zero_()
        self.covariance.reset_parameters(scale)

    @property
    def lr_scaling(self) -> dict[str, float]:
        """Learning-rate multipliers keyed like ``named_parameters()``."""
        own = {"mean": 1.0} if isinstance(self.mean, nn.Parameter) else {}
        return own | {f"covariance.{k}": v for k, v in self.covariance.lr_scaling.items()}

    def sample(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> Float[Tensor, "*sample *shape"]:
        """Draws ``mean + S @ eps`` of shape ``(*sample_shape, *shape)``."""
        return self.mean + self.covariance.sample(sample_shape, generator, dtype=self.mean.dtype)

    def to_dense(self) -> Float[Tensor, "P P"]:
        """The covariance ``Sigma`` (``P x P``, row-major units)."""
        return self.covariance.to_dense()


# Re-export (and register) the Kronecker structure. It subclasses FactorizedCovariance, so it is
# imported after everything above is defined; tl_noise.noise imports this module first.
from tl_noise.noise.kronecker import KroneckerCovariance  # noqa: E402
