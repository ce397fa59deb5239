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
"""

from __future__ import annotations

import math
import numbers
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch
from torch import nn

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
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
    return layer_type  # type: ignore[return-value]


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
        for field, expected in [
            ("weight_init", set(LAYER_TYPES)),
            ("bias_init", set(LAYER_TYPES)),
            ("weight_lr", lr_keys),
            ("bias_lr", lr_keys),
        ]:
            table = getattr(self, field)
            if set(table) != expected:
                raise ValueError(
                    f"ScalingRules.{field} must have exactly the keys {sorted(expected)}, "
                    f"got {sorted(table)}"
                )
            object.__setattr__(self, field, MappingProxyType(dict(table)))


class Parametrization(ABC):
    """Abstract base: initial std and lr multiplier per tensor, from its fans and role.

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


@dataclass(frozen=True, eq=False)
class ParamSpec:
    """A trainable tensor together with what a parametrization needs to know about it.

    ``fan_in``/``fan_out`` follow the layer's ``[d_in, d_out]`` weight; a bias has ``fan_in = 1``
    and ``fan_out = size``. Compared by identity (``eq=False``): tensors have no boolean equality.
    """

    name: str
    param: nn.Parameter
    fan_in: int
    fan_out: int
    layer_type: LayerType = "hidden"
    kind: ParamKind = "weight"

    def __post_init__(self) -> None:
        if not isinstance(self.param, torch.Tensor):
            raise TypeError(
                f"ParamSpec {self.name!r}: param must be a tensor, got {type(self.param).__name__}"
            )
        fan_in, fan_out = _check_fans(self.fan_in, self.fan_out)
        object.__setattr__(self, "fan_in", fan_in)
        object.__setattr__(self, "fan_out", fan_out)
        _check_layer_type(self.layer_type)
        if self.kind not in _PARAM_KINDS:
            raise ValueError(
                f"ParamSpec {self.name!r}: kind must be one of {_PARAM_KINDS}, got {self.kind!r}"
            )


def _init_scale(parametrization: Parametrization, spec: ParamSpec) -> float:
    if spec.kind == "bias":
        return parametrization.bias_init_scale(spec.fan_in, spec.fan_out, spec.layer_type)
    return parametrization.weight_init_scale(spec.fan_in, spec.fan_out, spec.layer_type)


def _lr_scale(parametrization: Parametrization, spec: ParamSpec, optimizer: str) -> float:
    if spec.kind == "bias":
        return parametrization.bias_lr_scale(spec.fan_in, spec.fan_out, optimizer, spec.layer_type)
    return parametrization.weight_lr_scale(spec.fan_in, spec.fan_out, optimizer, spec.layer_type)


def param_groups(
    specs: Iterable[ParamSpec],
    lr: float,
    optimizer: str = "Adam",
    parametrization: Parametrization | None = None,
) -> list[dict[str, Any]]:
    """Optimizer param groups ``{"params": [p], "lr": lr * scale, "name": name}``, one per spec.

    ``scale`` is the parametrization's weight or bias lr multiplier (default
    :class:`MaximalUpdate`). Pass the result straight to ``torch.optim.Adam``/``AdamW``/``SGD``.
    ``lr`` must be a finite number > 0; a tensor appearing in two specs, or two specs with one
    name, is an error.
    """
    valid = isinstance(lr, numbers.Real) and not isinstance(lr, bool)
    if not (valid and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    optimizer_family(optimizer)
    parametrization = MaximalUpdate() if parametrization is None else parametrization
    groups: list[dict[str, Any]] = []
    seen_params: dict[int, str] = {}
    seen_names: set[str] = set()
    for spec in specs:
        if id(spec.param) in seen_params:
            raise ValueError(
                f"parameter {spec.name!r} is the same tensor as {seen_params[id(spec.param)]!r}; "
                "a tensor may appear in only one param group"
            )
        if spec.name in seen_names:
            raise ValueError(f"two specs are named {spec.name!r}; names must be unique")
        seen_params[id(spec.param)] = spec.name
        seen_names.add(spec.name)
        scale = _lr_scale(parametrization, spec, optimizer)
        groups.append({"params": [spec.param], "lr": float(lr) * scale, "name": spec.name})
    return groups


def init_(
    spec: ParamSpec,
    parametrization: Parametrization | None = None,
    generator: torch.Generator | None = None,
) -> nn.Parameter:
    """Fill ``spec.param`` in place with ``N(0, s^2)``, ``s`` the parametrization's init scale.

    Default parametrization :class:`MaximalUpdate`. Runs under ``torch.no_grad()``; returns the
    parameter.
    """
    parametrization = MaximalUpdate() if parametrization is None else parametrization
    std = _init_scale(parametrization, spec)
    with torch.no_grad():
        spec.param.normal_(0.0, std, generator=generator)
    return spec.param


def initialize(
    specs: Iterable[ParamSpec],
    parametrization: Parametrization | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """:func:`init_` every spec (scales are all computed first, so a bad spec changes nothing)."""
    parametrization = MaximalUpdate() if parametrization is None else parametrization
    plan = [(spec, _init_scale(parametrization, spec)) for spec in specs]
    with torch.no_grad():
        for spec, std in plan:
            spec.param.normal_(0.0, std, generator=generator)


def _is_bias_name(leaf: str) -> bool:
    return leaf in ("b", "bias") or leaf.startswith("b_") or leaf.endswith(("_b", "_bias"))


def param_specs_from_module(
    module: nn.Module, layer_types: Mapping[str, LayerType] | None = None
) -> list[ParamSpec]:
    """Specs for the trainable parameters of a module whose weights are stored ``[d_in, d_out]``.

    TransformerLens layout, not ``nn.Linear``'s ``[d_out, d_in]``. A parameter is a bias if it is
    1-D or its leaf name is ``b``, ``bias``, ``b_*``, ``*_b`` or ``*_bias``: ``fan_in = 1``,
    ``fan_out = numel``. Otherwise it must be a 2-D weight: ``fan_in = shape[0]``,
    ``fan_out = shape[1]``; any other ndim is a ValueError. Parameters with
    ``requires_grad=False`` are skipped.

    ``layer_types`` maps a parameter name (``"out.weight"``) or a submodule prefix (``"out"``) to
    its layer type; the longest matching key wins, the rest are ``"hidden"``. A key that matches no
    trainable parameter is a ValueError (it is almost certainly a typo).
    """
    layer_types = dict(layer_types or {})
    for key, value in layer_types.items():
        try:
            _check_layer_type(value)
        except ValueError as err:
            raise ValueError(f"layer_types[{key!r}]: {err}") from None
    used: set[str] = set()
    specs = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        matches = [k for k in layer_types if name == k or name.startswith(k + ".")]
        key = max(matches, key=len, default=None)
        if key is not None:
            used.add(key)
        layer_type = layer_types[key] if key is not None else "hidden"
        if param.ndim == 1 or (param.ndim >= 1 and _is_bias_name(name.rsplit(".", 1)[-1])):
            specs.append(ParamSpec(name, param, 1, param.numel(), layer_type, "bias"))
        elif param.ndim == 2:
            d_in, d_out = param.shape
            specs.append(ParamSpec(name, param, d_in, d_out, layer_type, "weight"))
        else:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)}: expected a 2-D [d_in, d_out] "
                "weight or a bias"
            )
    unused = sorted(set(layer_types) - used)
    if unused:
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        raise ValueError(f"layer_types keys {unused} match no trainable parameter; names: {names}")
    return specs
