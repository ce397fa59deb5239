"""Maps from unconstrained ``rhos`` to noise standard deviations.

A noise layer learns ``rhos`` (any real number) and turns them into standard deviations with a
:class:`StandardDeviationParameterization`. The map fixes which standard deviations are reachable
and how fast they move per optimiser step (``derivative``), so together with the noise loss and the
task loss it shapes the training objective.

==========================================  ============================================  ==========
class                                       std(rho)                                      range
==========================================  ============================================  ==========
CloakStandardDeviationParameterization      min + (max - min) * (1 + tanh(rho / s)) / 2   (min, max)
DirectStandardDeviationParameterization     clamp(rho, min, max)                          [min, max]
SoftplusStandardDeviationParameterization   min + log(1 + exp(rho))                       (min, inf)
==========================================  ============================================  ==========

Every class is elementwise, computes in the dtype and on the device of its input, and round-trips
through ``to_config()`` and :func:`parameterization_from_config`, so a run can store it as JSON.
The bounds live in non-persistent buffers: they are configuration (carried by ``to_config``), not
learned state, so a ``state_dict`` never disagrees with the constructor arguments.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

__all__ = [
    "CloakStandardDeviationParameterization",
    "DirectStandardDeviationParameterization",
    "ScaledStandardDeviationParameterization",
    "SoftplusStandardDeviationParameterization",
    "StandardDeviationParameterization",
    "parameterization_from_config",
    "register_parameterization",
]

_SCALE_RANGE = "expected (min_scale, max_scale): two finite numbers with 0 <= min_scale < max_scale"


def _real_scalar(value: object, name: str, hint: str = "") -> float:
    """``value`` as a float if it is a real number or a one-element real tensor, else ValueError."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}{hint}")
    return float(value)


def _as_float32(value: float) -> float:
    """The float32 rounding of ``value``: what the bound buffers actually hold."""
    return torch.tensor(value, dtype=torch.float32, device="cpu").item()


def _check_bound(name: str, value: float, hint: str) -> None:
    """ValueError unless ``value`` is >= 0 and finite in float32."""
    if not math.isfinite(_as_float32(value)):
        raise ValueError(f"{name}={value} is not finite in float32{hint}")
    if value < 0:
        raise ValueError(f"{name}={value} is negative{hint}")


def _validate_scale(scale: object) -> tuple[float, float]:
    """Check a ``(min_scale, max_scale)`` pair and return it as two floats."""
    hint = f"; {_SCALE_RANGE}"
    if isinstance(scale, str | bytes):
        raise TypeError(f"scale must be a pair of numbers, got the string {scale!r}{hint}")
    try:
        values = tuple(cast(Iterable[object], scale))  # not iterable: TypeError, caught
    except TypeError:
        raise TypeError(f"scale must be a pair of numbers, got {scale!r}{hint}") from None
    if len(values) != 2:
        raise ValueError(f"scale must have 2 entries, got {len(values)}: {scale!r}{hint}")
    low = _real_scalar(values[0], f"min_scale (in scale={scale!r})", hint)
    high = _real_scalar(values[1], f"max_scale (in scale={scale!r})", hint)
    _check_bound("min_scale", low, hint)
    _check_bound("max_scale", high, hint)
    if not low < high:
        raise ValueError(f"min_scale={low} is not below max_scale={high}{hint}")
    if not _as_float32(low) < _as_float32(high):
        raise ValueError(f"min_scale={low} and max_scale={high} are equal in float32{hint}")
    return low, high


def _set_bound(module: nn.Module, name: str, value: float) -> None:
    """(Re)create the buffer ``name`` holding ``value``, float32 unless ``.to()`` chose another
    floating dtype, on the buffer's current device (so meta -> ``to_empty`` -> reset works)."""
    old = module._buffers.get(name)
    device = None if old is None else old.device
    dtype = old.dtype if old is not None and old.is_floating_point() else torch.float32
    bound = torch.tensor(value, dtype=dtype, device=device)
    module.register_buffer(name, bound, persistent=False)


def _require_floating(tensor: Tensor, name: str) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


class StandardDeviationParameterization(nn.Module, ABC):
    """Elementwise map ``std = f(rho)`` from unconstrained ``rhos`` to standard deviations >= 0.

    Rhos may be learned directly or predicted by a network. ``derivative`` is ``d std / d rho``;
    with a noise loss (which rewards large std) and a task loss it fixes the training dynamics.
    Subclasses implement ``forward`` and ``inverse`` (``inverse(forward(rho)) == rho`` wherever
    ``f`` is invertible and well conditioned) and should override ``derivative`` analytically;
    the default differentiates ``forward`` with autograd.
    """

    @abstractmethod
    def forward(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """Standard deviations ``f(rhos)``, same shape, dtype and device as ``rhos``."""

    @abstractmethod
    def inverse(self, std: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """Rhos ``f^-1(std)``; values outside the range of ``f`` are clamped into it first."""

    def derivative(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """Elementwise ``d std / d rho`` at ``rhos`` (autograd fallback; subclasses override)."""
        with torch.enable_grad():
            leaf = rhos.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(leaf).sum(), leaf)
        return grad

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable ``{"type": <class name>, **settings}`` for
        :func:`parameterization_from_config`."""
        return {"type": type(self).__name__}


class ScaledStandardDeviationParameterization(StandardDeviationParameterization):
    """Base for maps onto the bounded interval from ``min_scale`` to ``max_scale``.

    ``scale = (min_scale, max_scale)`` must be two finite numbers with ``0 <= min < max``
    (ValueError naming the bad value otherwise; TypeError if it is not a pair at all). The bounds
    are float32 buffers ``min_scale`` and ``max_scale`` created by ``reset_parameters()``, so a
    module built under ``torch.device("meta")`` is materialised by ``to_empty`` followed by
    ``reset_parameters``. They are cast to the input's dtype and device on every call, so float64
    inputs see the float32 roundings of the bounds (e.g. 1e-4 becomes 1e-4 * (1 - 2.5e-8)).
    """

    min_scale: Tensor
    max_scale: Tensor

    def __init__(self, scale: tuple[float, float] = (1e-4, 2.0)) -> None:
        super().__init__()
        self._scale = _validate_scale(scale)
        self.reset_parameters()

    @property
    def scale(self) -> tuple[float, float]:
        """The configured ``(min_scale, max_scale)`` as Python floats."""
        return self._scale

    def reset_parameters(self) -> None:
        """Re-create the ``min_scale`` / ``max_scale`` buffers from the configured scale."""
        _set_bound(self, "min_scale", self._scale[0])
        _set_bound(self, "max_scale", self._scale[1])

    def _bounds(self, like: Tensor, name: str) -> tuple[Tensor, Tensor]:
        _require_floating(like, name)
        return self.min_scale.to(like), self.max_scale.to(like)

    def to_config(self) -> dict[str, Any]:
        """``{"type": ..., "scale": [min_scale, max_scale]}``."""
        return {**super().to_config(), "scale": list(self._scale)}

    def extra_repr(self) -> str:
        return f"scale={self._scale}"


class CloakStandardDeviationParameterization(ScaledStandardDeviationParameterization):
    """Smooth squashing of ``rho`` into the open interval ``(min, max)``, as in Cloak.

    ``std = min + (max - min) * (1 + tanh(rho / s)) / 2 = min + (max - min) * sigmoid(2 rho / s)``
    with temperature ``s = shallow > 0``: ``s > 1`` flattens the curve (larger std for
    ``rho < 0``), ``s < 1`` sharpens it towards a step. With the defaults, ``rho = -4`` gives
    ``std ~ 7.7e-4``, ``rho = 0`` gives ``1.00005``; with ``s = 2``, ``rho = -4`` gives ``~0.036``.

    ``d std / d rho = (max - min) * (2 / s) * sigmoid(2 rho / s) * sigmoid(-2 rho / s)``.

    Inverse: ``rho = s * atanh(2p - 1)`` with ``p = (std - min) / (max - min)``. It is evaluated as
    the identical ``(s / 2) * logit(p)``, which stays accurate where Cloak trains (rho = -4 to -9,
    p ~ 1e-8, where ``2p - 1`` rounds to ``-1`` in float32), with ``p`` clamped to
    ``[tiny, 1 - eps]`` of the dtype: the atanh argument stays strictly inside (-1, 1), so the
    inverse of either bound is finite.

    Reference: Mireshghallah et al., "Not All Features Are Equal: Discovering Essential Features
    for Preserving Prediction Privacy" (Shredder / Cloak), WWW 2021,
    https://arxiv.org/abs/2003.02189 .

    Args:
        scale: ``(min_scale, max_scale)``, the asymptotes of std.
        shallow: temperature ``s``, a finite real number > 0 (ValueError otherwise).
    """

    def __init__(self, scale: tuple[float, float] = (1e-4, 2.0), shallow: float = 1.0) -> None:
        shallow = _real_scalar(shallow, "shallow", "; expected a finite number > 0")
        if not (math.isfinite(shallow) and shallow > 0):
            raise ValueError(f"shallow must be a finite number > 0, got {shallow}")
        super().__init__(scale)
        self.shallow = shallow

    def forward(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``min + (max - min) * sigmoid(2 rho / shallow)``."""
        low, high = self._bounds(rhos, "rhos")
        return low + (high - low) * torch.sigmoid(rhos * (2.0 / self.shallow))

    def derivative(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``(max - min) * (2 / s) * sigmoid(x) * sigmoid(-x)``, ``x = 2 rho / s``; the product of
        two sigmoids (rather than ``s * (1 - s)``) keeps the tail for large positive rho."""
        low, high = self._bounds(rhos, "rhos")
        k = 2.0 / self.shallow
        x = rhos * k
        return (high - low) * k * torch.sigmoid(x) * torch.sigmoid(-x)

    def inverse(self, std: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``(shallow / 2) * logit(clamp((std - min) / (max - min), tiny, 1 - eps))``."""
        low, high = self._bounds(std, "std")
        finfo = torch.finfo(std.dtype)
        p = ((std - low) / (high - low)).clamp(finfo.tiny, 1.0 - finfo.eps)
        return torch.logit(p) * (self.shallow / 2.0)

    def to_config(self) -> dict[str, Any]:
        """``{"type": ..., "scale": [min, max], "shallow": s}``."""
        return {**super().to_config(), "shallow": self.shallow}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shallow={self.shallow}"


class DirectStandardDeviationParameterization(ScaledStandardDeviationParameterization):
    """``rho`` is the standard deviation, clamped into the closed interval ``[min, max]``.

    ``std = clamp(rho, min, max)``; ``d std / d rho`` is 1 on ``[min, max]`` (bounds included,
    matching autograd of ``torch.clamp``) and 0 outside, so a rho pushed past a bound stops
    receiving gradient. ``inverse(std) = clamp(std, min, max)``.
    """

    def forward(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``clamp(rhos, min, max)``."""
        low, high = self._bounds(rhos, "rhos")
        return torch.clamp(rhos, low, high)

    def derivative(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``1`` where ``min <= rho <= max``, else ``0`` (also 0 for NaN)."""
        low, high = self._bounds(rhos, "rhos")
        return ((rhos >= low) & (rhos <= high)).to(rhos.dtype)

    def inverse(self, std: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``clamp(std, min, max)``."""
        low, high = self._bounds(std, "std")
        return torch.clamp(std, low, high)


class SoftplusStandardDeviationParameterization(StandardDeviationParameterization):
    """Unbounded-above map ``std = min_scale + softplus(rho) = min_scale + log(1 + exp(rho))``.

    Range ``(min_scale, inf)``; ``d std / d rho = sigmoid(rho)``. Inverse, with
    ``y = std - min_scale`` clamped to ``>= tiny`` of the dtype (so ``inverse(min_scale)`` is
    finite): ``rho = log(expm1(y)) = y + log(-expm1(-y))``; the second form neither overflows for
    large ``y`` nor loses precision for small ``y``.

    Args:
        min_scale: lower asymptote, a finite number >= 0 (ValueError otherwise); stored as the
            float32 buffer ``min_scale``, re-created by ``reset_parameters()``.
    """

    min_scale: Tensor

    def __init__(self, min_scale: float = 0.0) -> None:
        super().__init__()
        value = _real_scalar(min_scale, "min_scale", "; expected a finite number >= 0")
        if not (math.isfinite(_as_float32(value)) and value >= 0):
            raise ValueError(f"min_scale must be a finite number >= 0 (in float32), got {value}")
        self._min_scale = value
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-create the ``min_scale`` buffer from the configured value."""
        _set_bound(self, "min_scale", self._min_scale)

    def forward(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``min_scale + softplus(rhos)``."""
        _require_floating(rhos, "rhos")
        return self.min_scale.to(rhos) + F.softplus(rhos)

    def derivative(self, rhos: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``sigmoid(rhos)``."""
        _require_floating(rhos, "rhos")
        return torch.sigmoid(rhos)

    def inverse(self, std: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """``y + log(-expm1(-y))`` with ``y = max(std - min_scale, tiny)``."""
        _require_floating(std, "std")
        y = (std - self.min_scale.to(std)).clamp_min(torch.finfo(std.dtype).tiny)
        return y + torch.log(-torch.expm1(-y))

    def to_config(self) -> dict[str, Any]:
        """``{"type": ..., "min_scale": m}``."""
        return {**super().to_config(), "min_scale": self._min_scale}

    def extra_repr(self) -> str:
        return f"min_scale={self._min_scale}"


_REGISTRY: dict[str, type[StandardDeviationParameterization]] = {}
_P = TypeVar("_P", bound=StandardDeviationParameterization)


def register_parameterization(cls: type[_P]) -> type[_P]:
    """Class decorator: let :func:`parameterization_from_config` rebuild ``cls`` by its name.

    ``cls`` must be a concrete subclass of :class:`StandardDeviationParameterization` whose
    ``to_config()`` settings are its constructor's keyword arguments. Registering a different
    class under a name already taken raises ValueError.
    """
    if not (isinstance(cls, type) and issubclass(cls, StandardDeviationParameterization)):
        raise TypeError(f"expected a StandardDeviationParameterization subclass, got {cls!r}")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} is abstract and cannot be rebuilt from a config")
    existing = _REGISTRY.get(cls.__name__)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"a parameterization named {cls.__name__!r} is already registered")
    _REGISTRY[cls.__name__] = cls
    return cls


_BUILTIN: tuple[type[StandardDeviationParameterization], ...] = (
    CloakStandardDeviationParameterization,
    DirectStandardDeviationParameterization,
    SoftplusStandardDeviationParameterization,
)
for _cls in _BUILTIN:
    register_parameterization(_cls)


def parameterization_from_config(config: Mapping[str, Any]) -> StandardDeviationParameterization:
    """Rebuild a parameterization from its ``to_config()`` output.

    ``config["type"]`` selects a registered class; the other entries are passed to its constructor.
    An unknown type, or a setting the constructor does not accept, raises ValueError listing what
    is accepted.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}: {config!r}")
    settings = dict(config)
    type_name = settings.pop("type", None)
    cls = _REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown parameterization type {type_name!r}; known types: {known}")
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(settings) - set(parameters))
        if unknown:
            raise ValueError(
                f"{type_name} does not accept setting(s) {unknown}; accepted: {sorted(parameters)}"
            )
    return cls(**settings)
