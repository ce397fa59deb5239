"""Apply a parametrization to concrete tensors: param specs, optimizer groups, initialisation.

A :class:`ParamSpec` pairs a trainable tensor with its ``fan_in``/``fan_out``, ``layer_type`` and
kind (weight or bias); :func:`param_groups` turns specs into optimizer param groups with
``lr * scale``, :func:`init_`/:func:`initialize` draw ``N(0, s^2)`` with the parametrization's init
std ``s``, and :func:`param_specs_from_module` reads the specs off a module stored in
TransformerLens' ``[d_in, d_out]`` layout. Split out of :mod:`tl_noise.scaling.parametrizations`
(which re-exports these names).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tl_noise.scaling.parametrizations import (
    _PARAM_KINDS,
    LayerType,
    MaximalUpdate,
    Parametrization,
    ParamKind,
    _check_fans,
    _check_layer_type,
    optimizer_family,
)

__all__ = ["ParamSpec", "init_", "initialize", "param_groups", "param_specs_from_module"]


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
        longest = max(matches, key=len, default=None)
        if longest is not None:
            used.add(longest)
        layer_type = layer_types[longest] if longest is not None else "hidden"
        specs.append(_spec_for(name, param, layer_type))
    unused = sorted(set(layer_types) - used)
    if unused:
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        raise ValueError(f"layer_types keys {unused} match no trainable parameter; names: {names}")
    return specs


def _spec_for(name: str, param: nn.Parameter, layer_type: LayerType) -> ParamSpec:
    """A bias spec (``fan_in = 1``) for a 1-D or bias-named parameter, else a 2-D weight's."""
    if param.ndim == 1 or (param.ndim >= 1 and _is_bias_name(name.rsplit(".", 1)[-1])):
        return ParamSpec(name, param, 1, param.numel(), layer_type, "bias")
    if param.ndim == 2:
        d_in, d_out = param.shape
        return ParamSpec(name, param, d_in, d_out, layer_type, "weight")
    raise ValueError(
        f"parameter {name!r} has shape {tuple(param.shape)}: expected a 2-D [d_in, d_out] "
        "weight or a bias"
    )
