"""Width-aware initialisation scales and learning rates: SP, NTP and muP.

A parametrization gives every trainable tensor of the noise model (rhos, means, the small
std-estimator networks) an initial standard deviation and a multiplier of the base learning rate,
as a function of the tensor's ``fan_in``/``fan_out``, its ``layer_type`` and the optimizer family.
Under muP a learning rate tuned on a narrow noise model transfers to a wide one.

Conventions:

- scales are *standard deviations* (init) and *multipliers of a base lr* (lr);
- a bias has ``fan_in = 1`` and ``fan_out = its size`` (this is what makes the muP table's
  "input weights and all biases" column come out right);
- ``layer_type`` is ``"input"`` (maps a fixed-size input into the width), ``"hidden"``
  (width to width) or ``"output"`` (width to a fixed-size output);
- optimizers are named ``"SGD"``, ``"Adam"`` or ``"AdamW"`` (case-insensitive); AdamW scales as
  Adam, since decoupled weight decay does not change the update's width dependence.

Every rule lives in a table keyed by layer type (init) or by ``(optimizer family, layer type)``
(lr), checked for completeness when the class is defined, so a bad argument fails up front with a
message naming the accepted values.

The per-tensor helpers (:class:`~tl_noise.scaling.groups.ParamSpec`, ``param_groups``, ``init_``,
``initialize``, ``param_specs_from_module``) live in :mod:`tl_noise.scaling.groups` and are
re-exported here.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

__all__ = [
    "LAYER_TYPES",
    "OPTIMIZERS",
    "LayerType",
    "MaximalUpdate",
    "NeuralTangent",
    "ParamSpec",
    "Parametrization",
    "ScalingRules",
    "Standard",
    "UndefinedScaleError",
    "init_",
    "initialize",
    "optimizer_family",
    "param_groups",
    "param_specs_from_module",
    "parametrization_from_name",
]

LayerType = Literal["input", "hidden", "output"]
OptimizerFamily = Literal["SGD", "Adam"]
ParamKind = Literal["weight", "bias"]

LAYER_TYPES: tuple[LayerType, ...] = get_args(LayerType)
OPTIMIZERS: tuple[str, ...] = ("SGD", "Adam", "AdamW")
_OPTIMIZER_FAMILIES: Mapping[str, OptimizerFamily] = MappingProxyType(
    {"sgd": "SGD", "adam": "Adam", "adamw": "Adam"}
)
_PARAM_KINDS: tuple[ParamKind, ...] = get_args(ParamKind)

Scale = Callable[[int, int], float]
"""A scaling rule: ``(fan_in, fan_out) -> scale``."""


class UndefinedScaleError(ValueError, NotImplementedError):
    """A parametrization does not define a scale for this optimizer (e.g. NTP with Adam).

    Both a ``ValueError`` (the configuration is invalid) and a ``NotImplementedError`` (the
    source paper does not define the rule), so either ``except`` clause catches it.
    """


def optimizer_family(optimizer: str) -> OptimizerFamily:
    """Map an optimizer name (``"SGD"``, ``"Adam"``, ``"AdamW"``; any case) to its family."""
    family = _OPTIMIZER_FAMILIES.get(optimizer.lower()) if isinstance(optimizer, str) else None
    if family is None:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} (any case), got {optimizer!r}")
    return family


def _check_layer_type(layer_type: str) -> LayerType:
    for accepted in LAYER_TYPES:
        if layer_type == accepted:
            return accepted
    raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")


def _check_fan(label: str, fan: int) -> int:
    if isinstance(fan, bool):
        raise TypeError(f"{label} must be a positive integer, got {fan!r}")
    try:
        value = operator.index(fan)
    except TypeError:
        raise TypeError(f"{label} must be a positive integer, got {fan!r}") from None
    if value <= 0:
        raise ValueError(f"{label} must be a positive integer, got {fan!r}")
    return value


def _check_fans(fan_in: int, fan_out: int) -> tuple[int, int]:
    return _check_fan("fan_in", fan_in), _check_fan("fan_out", fan_out)


# Scaling rules, named after their formula.
def _one(fan_in: int, fan_out: int) -> float:
    return 1.0


def _inv_sqrt_fan_in(fan_in: int, fan_out: int) -> float:
    return 1.0 / math.sqrt(fan_in)


def _inv_fan_in(fan_in: int, fan_out: int) -> float:
    return 1.0 / fan_in


def _fan_out(fan_in: int, fan_out: int) -> float:
    return float(fan_out)


def _undefined(reason: str) -> Scale:
    def rule(fan_in: int, fan_out: int) -> float:
        raise UndefinedScaleError(reason)

    return rule


def _every_layer(rule: Scale) -> dict[LayerType, Scale]:
    return {layer_type: rule for layer_type in LAYER_TYPES}


def _every_optimizer(
    rules: Mapping[LayerType, Scale],
) -> dict[tuple[OptimizerFamily, LayerType], Scale]:
    families = get_args(OptimizerFamily)
    return {(family, lt): rule for family in families for lt, rule in rules.items()}


@dataclass(frozen=True)
class ScalingRules:
    """The four tables that define a parametrization.

    ``weight_init``/``bias_init`` map a layer type, ``weight_lr``/``bias_lr`` map an
    ``(optimizer family, layer type)`` pair, to a rule ``(fan_in, fan_out) -> scale``. Every key
    must be present (checked here, i.e. when the parametrization class is defined).
    """

    weight_init: Mapping[LayerType, Scale]
    bias_init: Mapping[LayerType, Scale]
    weight_lr: Mapping[tuple[OptimizerFamily, LayerType], Scale]
    bias_lr: Mapping[tuple[OptimizerFamily, LayerType], Scale]

    def __post_init__(self) -> None:
        lr_keys = {(f, lt) for f in get_args(OptimizerFamily) for lt in LAYER_TYPES}
        expected_keys: list[tuple[str, set[Any]]] = [
            ("weight_init", set(LAYER_TYPES)),
            ("bias_init", set(LAYER_TYPES)),
            ("weight_lr", lr_keys),
            ("bias_lr", lr_keys),
        ]
        for field, expected in expected_keys:
            table = getattr(self, field)
            if set(table) != expected:
                raise ValueError(
                    f"ScalingRules.{field} must have exactly the keys {sorted(expected)}, "
                    f"got {sorted(table)}"
                )
            object.__setattr__(self, field, MappingProxyType(dict(table)))


class Parametrization(ABC):
    """Abstract base: initial std and lr multiplier per tensor, from its fans and role.

    For a tensor with fans ``(fan_in, fan_out)`` and layer type ``t``: initialise
    ``W ~ N(0, init(fan_in, fan_out)^2)`` and train it with learning rate
    ``base_lr * lr(fan_in, fan_out)``, where ``init = rules.weight_init[t]`` and
    ``lr = rules.weight_lr[(optimizer family, t)]`` (``bias_*`` for a bias, ``fan_in = 1``).

    Subclasses set two class attributes: ``name`` (the short config name, e.g. ``"mup"``) and
    ``rules`` (a :class:`ScalingRules`). The four methods validate their arguments, then look the
    rule up in the tables.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """Short name used in configs and run directories (``"sp"``, ``"ntp"``, ``"mup"``)."""

    @property
    @abstractmethod
    def rules(self) -> ScalingRules:
        """The parametrization's tables."""

    def weight_init_scale(
        self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden"
    ) -> float:
        """Standard deviation to initialise a weight with, ``W ~ N(0, scale^2)``."""
        fan_in, fan_out = _check_fans(fan_in, fan_out)
        return self.rules.weight_init[_check_layer_type(layer_type)](fan_in, fan_out)

    def bias_init_scale(self, fan_in: int, fan_out: int, layer_type: LayerType = "hidden") -> float:
        """Standard deviation to initialise a bias with (``fan_in = 1``, ``fan_out = size``)."""
        fan_in, fan_out = _check_fans(fan_in, fan_out)
        return self.rules.bias_init[_check_layer_type(layer_type)](fan_in, fan_out)

    def weight_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str, layer_type: LayerType = "hidden"
    ) -> float:
        """Multiplier of the base learning rate for a weight, under ``optimizer``."""
        key = (optimizer_family(optimizer), _check_layer_type(layer_type))
        fan_in, fan_out = _check_fans(fan_in, fan_out)
        return self.rules.weight_lr[key](fan_in, fan_out)

    def bias_lr_scale(
        self, fan_in: int, fan_out: int, optimizer: str, layer_type: LayerType = "hidden"
    ) -> float:
        """Multiplier of the base learning rate for a bias, under ``optimizer``."""
        key = (optimizer_family(optimizer), _check_layer_type(layer_type))
        fan_in, fan_out = _check_fans(fan_in, fan_out)
        return self.rules.bias_lr[key](fan_in, fan_out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class Standard(Parametrization):
    """Standard parametrization (SP): PyTorch's default, "fan_in"/LeCun initialisation.

    ``W ~ N(0, 1/fan_in)``, biases ``N(0, 1)``, one learning rate for every tensor. Kaiming
    initialisation equals it up to a constant gain. Learning rates tuned under SP do not transfer
    across widths.
    """

    name = "sp"
    rules = ScalingRules(
        weight_init=_every_layer(_inv_sqrt_fan_in),
        bias_init=_every_layer(_one),
        weight_lr=_every_optimizer(_every_layer(_one)),
        bias_lr=_every_optimizer(_every_layer(_one)),
    )


_NTP_ADAM = (
    "NeuralTangent ('ntp') defines no weight learning-rate scale for Adam-family optimizers: "
    "the neural tangent parametrization (Jacot et al. 2018) is derived for gradient descent only. "
    "Use optimizer='SGD', or parametrization 'mup' (or 'sp') with Adam."
)


class NeuralTangent(Parametrization):
    """Neural tangent parametrization (NTP), Jacot et al. 2018, https://arxiv.org/abs/1806.07572.

    Weights are initialised ``N(0, 1)`` and biases ``N(0, 1)``; NTP puts the ``1/sqrt(fan_in)`` in
    the layer's forward pass instead, and this class supplies only the init and lr scales. SGD
    learning-rate multipliers: input weights 1, hidden and output weights ``1/fan_in``; biases
    ``1/fan_in`` (which is 1 under the bias convention ``fan_in = 1``).
    NTP's infinite-width limit is a kernel regime: features do not move from initialisation.

    The paper defines NTP for gradient descent only, so a weight lr scale for Adam/AdamW raises
    :class:`UndefinedScaleError` rather than guessing; the bias rule ``1/fan_in`` is kept for both
    optimizer families, as in the reference table.
    """

    name = "ntp"
    rules = ScalingRules(
        weight_init=_every_layer(_one),
        bias_init=_every_layer(_one),
        weight_lr={
            ("SGD", "input"): _one,
            ("SGD", "hidden"): _inv_fan_in,
            ("SGD", "output"): _inv_fan_in,
            ("Adam", "input"): _undefined(_NTP_ADAM),
            ("Adam", "hidden"): _undefined(_NTP_ADAM),
            ("Adam", "output"): _undefined(_NTP_ADAM),
        },
        bias_lr=_every_optimizer(_every_layer(_inv_fan_in)),
    )


class MaximalUpdate(Parametrization):
    """Maximal update parametrization (muP), Tensor Programs V, Table 3.

    Yang & Hu 2021, https://arxiv.org/abs/2011.14522 (feature learning in the infinite-width limit)
    and Yang et al. 2022, https://arxiv.org/abs/2203.03466 (muTransfer). Activations stay O(1)
    at initialisation and every layer's features move by O(1) during training, at any width, so a
    learning rate tuned on a narrow model transfers to a wide one.

    ==========  =====================  ==============  ==============
    scale       input weights, biases  hidden weights  output weights
    ==========  =====================  ==============  ==============
    init std    1/sqrt(fan_in)         1/sqrt(fan_in)  1/fan_in
    SGD lr      fan_out                1               1/fan_in
    Adam lr     1                      1/fan_in        1/fan_in
    ==========  =====================  ==============  ==============

    With the bias convention ``fan_in = 1`` the bias column reads: init std 1, SGD lr
    ``fan_out``, Adam lr 1, for every layer type.
    """

    name = "mup"
    rules = ScalingRules(
        weight_init={"input": _inv_sqrt_fan_in, "hidden": _inv_sqrt_fan_in, "output": _inv_fan_in},
        bias_init=_every_layer(_one),
        weight_lr={
            ("SGD", "input"): _fan_out,
            ("SGD", "hidden"): _one,
            ("SGD", "output"): _inv_fan_in,
            ("Adam", "input"): _one,
            ("Adam", "hidden"): _inv_fan_in,
            ("Adam", "output"): _inv_fan_in,
        },
        bias_lr={
            **{("SGD", lt): _fan_out for lt in LAYER_TYPES},
            **{("Adam", lt): _one for lt in LAYER_TYPES},
        },
    )


_BY_NAME: Mapping[str, type[Parametrization]] = MappingProxyType(
    {
        "sp": Standard,
        "standard": Standard,
        "ntp": NeuralTangent,
        "neuraltangent": NeuralTangent,
        "mup": MaximalUpdate,
        "maximalupdate": MaximalUpdate,
    }
)


def parametrization_from_name(name: str) -> Parametrization:
    """Build a parametrization from its config name: ``"sp"``/``"standard"``, ``"ntp"``,
    ``"mup"`` (also the class names; any case)."""
    cls = _BY_NAME.get(name.strip().lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown parametrization {name!r}; expected one of {sorted(_BY_NAME)}")
    return cls()


# Re-export the per-tensor helpers. tl_noise.scaling.groups needs the classes above, so it is
# imported once they are defined; tl_noise.scaling imports this module first.
from tl_noise.scaling.groups import (  # noqa: E402
    ParamSpec,
    init_,
    initialize,
    param_groups,
    param_specs_from_module,
)
