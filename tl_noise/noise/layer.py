"""Learnable Gaussian noise layers for one hook point.

A :class:`NoiseLayer` turns an activation ``x`` of shape ``[batch, pos, *unit]`` into

.. math::  \\mathrm{out} = x + \\bigl(\\mu + \\sigma \\odot S\\epsilon\\bigr) \\odot s,
           \\qquad \\epsilon \\sim \\mathcal N(0, I)

where ``sigma = parameterization(rhos)`` is the learned standard deviation at the chosen
granularity (one per hook, per head, or per feature; optionally per position), ``S`` the factor of
an optional structured covariance (identity by default), ``mu`` an optional learned mean, and
``s`` the *natural scale* of each unit (its activation standard deviation on a calibration batch),
so that ``sigma = 1`` means "noise as large as the signal" and heads of different layers are
comparable. With ``relative=False`` the natural scale stays 1 and the noise is absolute.

The rhos are either free parameters or estimated from the activation by a small network
(:class:`RhoEstimator`), as in the reference page of the parameterizations: "rhos can be learned
directly or estimated as the output of a neural network".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_noise.noise.covariance import FactorizedCovariance, covariance_from_config
from tl_noise.noise.estimator import RhoEstimator
from tl_noise.noise.forms import additive, check_form, replacement
from tl_noise.noise.granularity import (
    DEAD_UNIT_RTOL,
    GRANULARITIES,
    NOISE_MODES,
    Granularity,
    NoiseMode,
    check_granularity,
    check_noise_mode,
    param_shape_for,
)
from tl_noise.noise.parameterizations import (
    CloakStandardDeviationParameterization,
    StandardDeviationParameterization,
    parameterization_from_config,
)


class NoiseLayer(nn.Module):
    """Gaussian noise with a learned standard deviation for one hook point.

    Args:
        unit_shape: the activation's shape after ``[batch, pos]``, e.g. ``(n_heads, d_head)``
            for ``hook_z`` or ``(d_model,)`` for the residual stream.
        granularity: ``"hook"`` (one std), ``"head"`` (one per head), ``"feature"`` (one per unit
            element) or ``"head_feature"`` (one per head and head feature).
        parameterization: rho -> std map (default Cloak with scale ``(1e-4, 2.0)``).
        init_std: initial standard deviation (relative to the natural scale when ``relative``).
        covariance: optional structured covariance over the unit (its factor ``S`` shapes the
            correlation; the learned std still sets the magnitude). ``None``: independent noise.
        learn_mean: learn a mean shift ``mu`` at the same granularity as the std.
        n_positions: if given, one set of stds per position ``0..n_positions-1``.
        estimator: a :class:`RhoEstimator` (or ``True`` for the default one) that predicts rhos
            from the activation instead of learning them directly.
        relative: scale the noise by each unit's natural activation std (see
            :meth:`set_natural_scale`); units that never vary get no noise.
        form: ``"additive"`` (``x + sigma s eps``) or ``"replacement"`` (``(1 - sigma) x +
            sigma (mu + s eps)``, sigma capped at 1); see :mod:`tl_noise.noise.forms`.
    """

    natural_scale: Tensor  # buffers, registered in __init__
    calibrated: Tensor
    natural_mean: Tensor  # registered for the replacement form only

    def __init__(
        self,
        unit_shape: tuple[int, ...],
        granularity: Granularity = "head",
        parameterization: StandardDeviationParameterization | None = None,
        init_std: float = 0.05,
        covariance: FactorizedCovariance | None = None,
        learn_mean: bool = False,
        n_positions: int | None = None,
        estimator: RhoEstimator | bool | None = None,
        relative: bool = True,
        name: str = "",
        form: str = "additive",
    ) -> None:
        super().__init__()
        self.name = name
        self.unit_shape = tuple(int(d) for d in unit_shape)
        self.granularity = granularity
        base_shape = param_shape_for(self.unit_shape, granularity, name)
        if n_positions is not None and (not isinstance(n_positions, int) or n_positions <= 0):
            raise ValueError(f"n_positions={n_positions!r}; expected a positive int or None")
        self.n_positions = n_positions
        self.param_shape = ((n_positions,) if n_positions else ()) + base_shape
        self.form = check_form(form)
        self.parameterization = parameterization or CloakStandardDeviationParameterization(
            scale=(1e-4, 1.0 if self.form == "replacement" else 2.0)
        )
        self._check_std_range(init_std)
        self.init_std = float(init_std)
        self.relative = bool(relative)
        self.mode: NoiseMode = "sample"
        if estimator and n_positions is not None:
            raise ValueError(
                "estimator and n_positions cannot be combined: an estimator already predicts "
                "rhos at every position; pass n_positions=None"
            )
        self._init_rhos(estimator, base_shape)
        self.mean = nn.Parameter(torch.zeros(self.param_shape)) if learn_mean else None
        self.covariance = covariance
        if covariance is not None:
            covariance.initialize_parameters(self.unit_shape)
            covariance.reset_parameters(1.0)
        self.register_buffer("natural_scale", torch.ones(self.unit_shape))
        if self.form == "replacement":  # only then: saved additive noise keeps its tensors
            self.register_buffer("natural_mean", torch.zeros(self.unit_shape))
        self.register_buffer("calibrated", torch.tensor(False))
        self._last_std: Tensor | None = None
        self.batch_shard: tuple[int, int] | None = None  # (row offset, global batch) when sharded

    def _check_std_range(self, init_std: float) -> None:
        low, high = self._std_range()
        where = self.name or "this layer"
        if self.form == "replacement" and high > 1:
            raise ValueError(
                f"form='replacement' at {where} needs sigma <= 1 (the fraction of the node "
                f"destroyed), but the parameterization's maximum is {high:g}; use e.g. "
                "CloakStandardDeviationParameterization(scale=(1e-4, 1.0))"
            )
        if not (math.isfinite(init_std) and low <= init_std <= high):
            raise ValueError(
                f"init_std={init_std!r} at {where}; expected a finite value in "
                f"[{low:g}, {high:g}] (the parameterization's range)"
            )

    def _init_rhos(
        self, estimator: RhoEstimator | bool | None, base_shape: tuple[int, ...]
    ) -> None:
        """Free rhos at ``init_std``, or an estimator whose output bias starts there."""
        init_rho = float(self.parameterization.inverse(torch.tensor(self.init_std)))
        if estimator is True:
            estimator = RhoEstimator(math.prod(self.unit_shape), max(1, math.prod(base_shape)))
        if isinstance(estimator, RhoEstimator):
            if estimator.d_in != math.prod(self.unit_shape):
                raise ValueError(
                    f"estimator d_in={estimator.d_in} but the unit {self.unit_shape} has "
                    f"{math.prod(self.unit_shape)} elements"
                )
            with torch.no_grad():
                estimator.b_out.fill_(init_rho)
            self.estimator: RhoEstimator | None = estimator
            self.rhos = None
        else:
            self.estimator = None
            self.rhos = nn.Parameter(torch.full(self.param_shape, init_rho))

    # ------------------------------------------------------------------ shapes
    def _std_range(self) -> tuple[float, float]:
        scale = getattr(self.parameterization, "scale", None)
        if scale is not None:
            return float(scale[0]), float(scale[1])
        return float(getattr(self.parameterization, "min_scale", 0.0)), math.inf

    def check_activation(self, shape: tuple[int, ...]) -> None:
        """Raise a ValueError if an activation of ``shape`` does not fit this layer."""
        if tuple(shape[2:]) != self.unit_shape or len(shape) < 2:
            raise ValueError(
                f"activation at {self.name or 'this hook'} has shape {list(shape)}; this noise "
                f"layer expects [batch, pos, {', '.join(map(str, self.unit_shape))}]"
            )
        if self.n_positions is not None and shape[1] > self.n_positions:
            raise ValueError(
                f"activation at {self.name or 'this hook'} has {shape[1]} positions; the layer "
                f"was built per position with n_positions={self.n_positions}"
            )

    # ------------------------------------------------------------------- stds
    def std(self) -> Float[Tensor, "*param_shape"]:
        """Current standard deviation per parameter (float32, detached from no graph).

        For an estimator layer this is the mean std over the last forward's batch and positions
        (the std is a function of the input there).
        """
        if self.estimator is None:
            std = self.parameterization(self.rhos)
        elif self._last_std is not None:
            std = self._last_std.mean(dim=tuple(range(self._last_std.ndim - len(self.param_shape))))
        else:
            std = self.parameterization(self.estimator.b_out).reshape(self.param_shape)
        return self._with_covariance_scale(std)

    def std_for_loss(self) -> Tensor:
        """The stds the noise loss should see: parameters, or the last forward's estimates."""
        if self.estimator is not None and self._last_std is not None:
            return self._with_covariance_scale(self._last_std)
        return self.std()

    def _with_covariance_scale(self, std: Tensor) -> Tensor:
        if self.covariance is None:
            return std
        # marginal std of S eps per unit element, RMS-pooled to the granularity
        marginal = self.covariance.to_dense().diagonal().reshape(self.unit_shape)
        base = self.param_shape[1:] if self.n_positions else self.param_shape
        dims = (
            tuple(range(len(base), len(self.unit_shape)))
            if base
            else tuple(range(len(self.unit_shape)))
        )
        pooled = marginal.mean(dim=dims) if dims else marginal
        return std * pooled.sqrt()

    # ---------------------------------------------------------------- forward
    def _rhos(self, x: Tensor) -> Tensor:
        if self.estimator is not None:
            flat = x.detach().reshape(*x.shape[:2], -1).float()
            return self.estimator(flat).reshape(*x.shape[:2], *self.param_shape)
        assert self.rhos is not None  # free rhos exist exactly when there is no estimator
        return self.rhos

    def forward(
        self, x: Float[Tensor, "batch pos *unit"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "batch pos *unit"]:
        if self.mode == "off":
            return x
        n_pos = x.shape[1]
        scale = self.natural_scale
        # shift and scale are small ([1, pos | 1, *unit]) unless an estimator makes the std
        # depend on the input; the full-size work is one randn and one fused x + eps * scale
        shift = self._param_view(self.mean, n_pos) * scale if self.mean is not None else None
        if self.mode != "sample" and self.form == "replacement":
            std = self._param_view(self.parameterization(self._rhos(x)), n_pos)
            return replacement(x, None, std, scale, self.natural_mean, shift)
        if self.mode != "sample":
            return x if shift is None else x + shift.to(x.dtype)
        rhos = self._rhos(x)
        if self.estimator is None:
            std = self._param_view(self.parameterization(rhos), n_pos)
        else:
            std_full = self.parameterization(rhos)
            self._last_std = std_full if self.training else std_full.detach()
            std = std_full.reshape(*std_full.shape[:2], *self._trailing(std_full.shape[2:]))
        eps = self._eps(x, generator)
        if self.form == "replacement":
            return replacement(x, eps, std, scale, self.natural_mean, shift)
        return additive(x, eps, std, scale, shift)

    def _trailing(self, base_shape: torch.Size) -> list[int]:
        return list(base_shape) + [1] * (len(self.unit_shape) - len(base_shape))

    def _param_view(self, t: Tensor, n_pos: int) -> Tensor:
        if self.n_positions is not None:
            t = t[:n_pos]
            return t.reshape(1, n_pos, *self._trailing(t.shape[1:]))
        return t.reshape(1, 1, *self._trailing(t.shape))

    def _eps(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        trailing = x.shape[2:] if self.covariance is None else (self.covariance.rank,)
        batch = x.shape[0]
        offset, total = self.batch_shard or (0, batch)
        # a data-parallel rank draws the noise of the whole global batch and keeps its rows, so
        # N processes reproduce one process on the concatenated batch exactly
        eps = torch.randn(
            (total, x.shape[1], *trailing),
            generator=generator,
            device=x.device,
            dtype=torch.float32,
        )[offset : offset + batch]
        return eps if self.covariance is None else self.covariance.factor_matmul(eps)

    # ------------------------------------------------------------ calibration
    @torch.no_grad()
    def set_natural_scale(
        self, scale: Float[Tensor, "*unit"], mean: Float[Tensor, "*unit"] | None = None
    ) -> None:
        """Store each unit's natural activation std (and mean, for the replacement form) and
        mark the layer calibrated.

        A unit whose std is at most ``DEAD_UNIT_RTOL`` times the hook's largest (zero up to
        float error) never varies and carries no information: its scale is 0, so it gets no
        noise. With ``relative=False`` the scale stays 1 (the user's absolute noise applies as
        given, also to such units); the mean is still recorded.
        """
        if tuple(scale.shape) != self.unit_shape:
            raise ValueError(f"natural scale shape {list(scale.shape)} != unit {self.unit_shape}")
        if self.relative:
            scale = scale.float()
            dead = scale <= DEAD_UNIT_RTOL * scale.max().clamp_min(0)
            self.natural_scale.copy_(torch.where(dead, torch.zeros_like(scale), scale))
        if self.form == "replacement":
            if mean is None or tuple(mean.shape) != self.unit_shape:
                raise ValueError(
                    f"the replacement form at {self.name or 'this layer'} needs the units' "
                    f"natural mean of shape {list(self.unit_shape)}"
                )
            self.natural_mean.copy_(mean.float())
        self.calibrated.fill_(True)

    # ----------------------------------------------------------------- config
    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable settings that, with the state dict, rebuild this layer."""
        return {
            "unit_shape": list(self.unit_shape),
            "granularity": self.granularity,
            "parameterization": self.parameterization.to_config(),
            "init_std": self.init_std,
            "covariance": None if self.covariance is None else self.covariance.to_config(),
            "learn_mean": self.mean is not None,
            "n_positions": self.n_positions,
            "estimator": None if self.estimator is None else self.estimator.to_config(),
            "relative": self.relative,
            "form": self.form,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> NoiseLayer:
        unit = tuple(config["unit_shape"])
        base = param_shape_for(unit, config["granularity"], name)
        estimator = None
        if config.get("estimator"):
            est = config["estimator"]
            estimator = RhoEstimator(
                math.prod(unit), max(1, math.prod(base)), est["d_hidden"], est["parametrization"]
            )
        cov = config.get("covariance")
        return cls(
            unit,
            granularity=config["granularity"],
            parameterization=parameterization_from_config(config["parameterization"]),
            init_std=config["init_std"],
            covariance=None if cov is None else covariance_from_config(cov),
            learn_mean=config["learn_mean"],
            n_positions=config["n_positions"],
            estimator=estimator,
            relative=config["relative"],
            name=name,
            form=config.get("form", "additive"),  # noise saved before forms existed: additive
        )

    def plain_parameters(self) -> list[tuple[str, Tensor, float]]:
        """``(name, parameter, lr multiplier)`` for the plain tensors of this layer."""
        out: list[tuple[str, Tensor, float]] = []
        if self.rhos is not None:
            out.append(("rhos", self.rhos, 1.0))
        if self.mean is not None:
            out.append(("mean", self.mean, 1.0))
        if self.covariance is not None:
            scaling = self.covariance.lr_scaling
            for pname, param in self.covariance.named_parameters():
                out.append((f"covariance.{pname}", param, float(scaling.get(pname, 1.0))))
        return out


__all__ = [
    "GRANULARITIES",
    "NOISE_MODES",
    "Granularity",
    "NoiseLayer",
    "NoiseMode",
    "RhoEstimator",
    "check_granularity",
    "check_noise_mode",
    "param_shape_for",
]
