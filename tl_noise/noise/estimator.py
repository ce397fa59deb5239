"""Estimating rhos from the activation: a small network instead of free parameters.

As the reference page of the parameterizations puts it, "rhos can be learned directly or
estimated as the output of a neural network". The network's own weights are initialised and given
learning rates by a width-aware parametrization (:mod:`tl_noise.scaling`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_noise.scaling.groups import ParamSpec
from tl_noise.scaling.init import NonlinearityType, init_kaiming_normal_
from tl_noise.scaling.parametrizations import (
    LayerType,
    Parametrization,
    parametrization_from_name,
)


class RhoEstimator(nn.Module):
    """Two-layer network estimating rhos from the (detached) activation at each position.

    ``rho = relu(x W_in + b_in) W_out + b_out`` with ``x: Float[Tensor, "... d_in"]`` the flattened
    unit (``d_in = prod(unit_shape)``) and ``W_in: [d_in, d_hidden]``, ``W_out: [d_hidden, n_out]``
    stored in TransformerLens' ``[d_in, d_out]`` layout. Weights start from Kaiming-normal
    (:func:`tl_noise.init.init_kaiming_normal_`) rescaled to the init scale the parametrization
    prescribes (muP by default: input layer ``1/sqrt(fan_in)``, output layer ``1/fan_in``);
    ``b_out`` starts at the rho of the initial std, so the initial stds sit around it.
    """

    def __init__(
        self,
        d_in: int,
        n_out: int,
        d_hidden: int = 32,
        parametrization: Parametrization | str = "mup",
        init_rho: float = 0.0,
    ) -> None:
        super().__init__()
        for label, value in (("d_in", d_in), ("n_out", n_out), ("d_hidden", d_hidden)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"RhoEstimator {label}={value!r}; expected a positive int")
        if isinstance(parametrization, str):
            parametrization = parametrization_from_name(parametrization)
        self.parametrization = parametrization
        self.d_in, self.n_out, self.d_hidden = d_in, n_out, d_hidden
        self.W_in = nn.Parameter(torch.empty(d_in, d_hidden))
        self.b_in = nn.Parameter(torch.zeros(d_hidden))
        self.W_out = nn.Parameter(torch.empty(d_hidden, n_out))
        self.b_out = nn.Parameter(torch.full((n_out,), float(init_rho)))
        self.reset_parameters()

    def layer_types(self) -> dict[str, LayerType]:
        return {"W_in": "input", "b_in": "input", "W_out": "output", "b_out": "output"}

    def reset_parameters(self) -> None:
        weights: tuple[tuple[str, NonlinearityType], ...] = (("W_in", "relu"), ("W_out", "linear"))
        for name, nonlinearity in weights:
            weight = getattr(self, name)
            fan_in, fan_out = weight.shape
            init_kaiming_normal_(weight, nonlinearity=nonlinearity)
            target = self.parametrization.weight_init_scale(
                fan_in, fan_out, layer_type=self.layer_types()[name]
            )
            with torch.no_grad():
                weight.mul_(target * math.sqrt(fan_in))  # Kaiming's 1/sqrt(fan_in) -> target

    def param_specs(self) -> list[ParamSpec]:
        """Fans and layer types of every parameter (for ``scaling.groups.param_groups``)."""
        specs = []
        for name, param in self.named_parameters():
            is_bias = param.ndim == 1
            fan_in, fan_out = (1, param.shape[0]) if is_bias else tuple(param.shape)
            specs.append(
                ParamSpec(
                    name=name,
                    param=param,
                    fan_in=fan_in,
                    fan_out=fan_out,
                    layer_type=self.layer_types()[name],
                    kind="bias" if is_bias else "weight",
                )
            )
        return specs

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch n_out"]:
        hidden = torch.relu(x @ self.W_in + self.b_in)
        return hidden @ self.W_out + self.b_out

    def to_config(self) -> dict[str, Any]:
        return {"d_hidden": self.d_hidden, "parametrization": self.parametrization.name}
