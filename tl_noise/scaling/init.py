"""Weight initialisation in TransformerLens's ``[d_in, d_out]`` convention, with named layouts.

TransformerLens stores weights input-axis first: a linear map is ``[d_in, d_out]``, W_Q/W_K/W_V are
``[n_heads, d_model, d_head]`` and W_O is ``[n_heads, d_head, d_model]``, so torch's own
``nn.init`` (which assumes ``[d_out, d_in, ...]``) computes the wrong fans. TransformerLens's
``utilities.initialization_utils.calc_fan_in_and_fan_out`` fixes this for 2-D weights, but treats
*every* 3-D tensor as ``[n_heads, d_model, d_head]`` (fan_in = shape[1],
fan_out = shape[0] * shape[2]). For W_O that gives fan_in = d_head and
fan_out = n_heads * d_model, whereas W_O maps the concatenated heads (``n_heads * d_head`` inputs)
to ``d_model`` outputs. A Kaiming init of W_O in fan_in mode is then too large by
``sqrt(n_heads)`` (e.g. 3.5x for GPT-2 small).

The functions here take the same arguments as TransformerLens's and behave identically with
``layout=None``. Passing ``layout`` (einops-style axis names, e.g. ``"n_heads d_head d_model"``)
states which axes feed the map and which it produces; see :func:`split_layout`.

Formulas (``fan`` = fan_in or fan_out by ``mode``; ``gain`` multiplied by
``nn.init.calculate_gain(nonlinearity, a)`` for Kaiming, which is sqrt(2) for relu, 1 for linear):

- Kaiming normal: ``std = gain / sqrt(fan)``; Kaiming uniform: bound ``sqrt(3) * std``.
- Xavier normal: ``std = gain * sqrt(2 / (fan_in + fan_out))``; Xavier uniform: bound
  ``gain * sqrt(6 / (fan_in + fan_out))``.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

__all__ = [
    "HEAD_AXES",
    "calc_fan_in_and_fan_out",
    "init_kaiming_normal_",
    "init_kaiming_uniform_",
    "init_xavier_normal_",
    "init_xavier_uniform_",
    "split_layout",
]

NonlinearityType = Literal[
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
]

HEAD_AXES = frozenset({"n_heads", "n_key_value_heads", "n_kv_heads"})
"""Axis names that count attention heads; in an arrow-free layout they join ``d_head``'s side."""

_LAYOUT_HELP = (
    "write axis names separated by spaces, one per tensor dimension, e.g. 'd_model d_mlp', "
    "'n_heads d_head d_model' or 'n_heads d_head -> d_model'"
)


def _axis_names(text: str, layout: str) -> list[str]:
    names = text.split()
    for name in names:
        if not name.isidentifier():
            raise ValueError(
                f"layout {layout!r}: axis {name!r} is not a plain axis name (parenthesised "
                f"groups, '...' and numbers are not supported); {_LAYOUT_HELP}"
            )
    return names


def split_layout(layout: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a layout string into ``(input_axes, output_axes)``, each in the order written.

    - ``"a b -> c"``: axes left of ``->`` are inputs, right of it outputs; the tensor's axes are
      the names read left to right, so W_O is ``"n_heads d_head -> d_model"``. Both sides must be
      non-empty.
    - Without ``->``: the last axis not in :data:`HEAD_AXES` is the output axis and the other
      non-head axes are inputs. Head axes (``n_heads``, ``n_key_value_heads``, ``n_kv_heads``)
      join the side of ``d_head``; if there is no ``d_head`` they join the output side (a head
      axis indexes separate maps, like the heads of W_Q). So ``"n_heads d_model d_head"`` (W_Q)
      gives ``(("d_model",), ("n_heads", "d_head"))``, ``"n_heads d_head d_model"`` (W_O) gives
      ``(("n_heads", "d_head"), ("d_model",))`` and a bias ``"d_model"`` has no input axes
      (fan_in 1, as TransformerLens does for 1-D tensors).

    Raises ValueError for an empty layout, a repeated axis, a name that is not an identifier,
    more than one ``->`` or an empty side of ``->``; TypeError if ``layout`` is not a string.
    """
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string, got {type(layout).__name__}: {layout!r}")
    sides = layout.split("->")
    if len(sides) > 2:
        raise ValueError(f"layout {layout!r} has {len(sides) - 1} '->', at most one is allowed")
    names = [_axis_names(side, layout) for side in sides]
    flat = [name for side in names for name in side]
    if not flat:
        raise ValueError(f"layout {layout!r} names no axes; {_LAYOUT_HELP}")
    repeated = sorted({name for name in flat if flat.count(name) > 1})
    if repeated:
        raise ValueError(f"layout {layout!r} repeats axis {', '.join(map(repr, repeated))}")
    if len(names) == 2:
        inputs, outputs = names
        for side, axes in (("before", inputs), ("after", outputs)):
            if not axes:
                raise ValueError(
                    f"layout {layout!r} has no axes {side} '->'; both sides need at least one "
                    "(for a bias-like vector write its single axis without '->')"
                )
        return tuple(inputs), tuple(outputs)
    plain = [name for name in flat if name not in HEAD_AXES]
    output_axis = plain[-1] if plain else None
    heads_are_inputs = "d_head" in flat and "d_head" != output_axis
    inputs = [n for n in flat if (n in HEAD_AXES and heads_are_inputs) or n in plain[:-1]]
    outputs = [n for n in flat if n not in inputs]
    return tuple(inputs), tuple(outputs)


def calc_fan_in_and_fan_out(tensor: Tensor, layout: str | None = None) -> tuple[int, int]:
    """Fan-in and fan-out of a weight stored input-axis first, TransformerLens style.

    ``layout=None`` reproduces ``transformer_lens.utilities.initialization_utils`` exactly:

    - 1-D ``[d]``: ``(1, d)``; 2-D ``[d_in, d_out]``: ``(d_in, d_out)``;
    - 3-D: always read as ``[n_heads, d_model, d_head]``: ``(shape[1], shape[0] * shape[2])``.
      Right for W_Q/W_K/W_V, **wrong for W_O** ``[n_heads, d_head, d_model]``, whose true fans
      are ``(n_heads * d_head, d_model)`` but which gets ``(d_head, n_heads * d_model)``;
    - 0-D or more than 3-D: ValueError.

    With a ``layout`` (see :func:`split_layout`), ``fan_in`` is the product of the input axes'
    sizes and ``fan_out`` that of the output axes (an empty product is 1). The layout must name
    exactly ``tensor.ndim`` axes.
    """
    shape = tuple(tensor.shape)
    if not shape:
        raise ValueError("Fan in and fan out can not be computed for scalars.")
    if layout is None:
        if len(shape) == 1:
            return 1, shape[0]
        if len(shape) == 2:
            return shape[0], shape[1]
        if len(shape) == 3:
            return shape[1], shape[0] * shape[2]
        raise ValueError(
            f"Fan in and fan out can not be computed for shape {shape} tensors without a layout; "
            f"pass layout=..., {_LAYOUT_HELP}"
        )
    inputs, outputs = split_layout(layout)
    order = layout.replace("->", " ").split()
    if len(order) != len(shape):
        raise ValueError(
            f"layout {layout!r} names {len(order)} axes but the tensor has {len(shape)} "
            f"dimensions (shape {shape})"
        )
    size = dict(zip(order, shape, strict=True))
    return math.prod(size[n] for n in inputs), math.prod(size[n] for n in outputs)


def _kaiming_fan(param: Tensor, mode: str, layout: str | None) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calc_fan_in_and_fan_out(param, layout)
    return fan_in if mode == "fan_in" else fan_out


def init_kaiming_normal_(
    param: Tensor,
    a: float = 0,
    nonlinearity: NonlinearityType = "relu",
    gain: float = 1.0,
    mode: str = "fan_in",
    *,
    layout: str | None = None,
) -> Tensor:
    """Fill ``param`` in place with ``N(0, std^2)``, ``std = gain * c / sqrt(fan)``.

    ``c = nn.init.calculate_gain(nonlinearity, a)`` (sqrt(2) for relu, 1 for linear), ``fan`` is
    fan_in or fan_out by ``mode`` from :func:`calc_fan_in_and_fan_out` with ``layout``. Returns
    ``param``. Unlike TransformerLens, a ``mode`` other than ``"fan_in"``/``"fan_out"`` raises.
    """
    fan = _kaiming_fan(param, mode, layout)
    gain *= nn.init.calculate_gain(nonlinearity, a)
    std = gain * math.sqrt(1.0 / fan)
    return nn.init.normal_(param, mean=0.0, std=std)


def init_kaiming_uniform_(
    param: Tensor,
    a: float = 0,
    nonlinearity: NonlinearityType = "relu",
    gain: float = 1.0,
    mode: str = "fan_in",
    *,
    layout: str | None = None,
) -> Tensor:
    """Fill ``param`` in place with ``U(-b, b)``, ``b = gain * c * sqrt(3 / fan)`` (std
    ``gain * c / sqrt(fan)``); ``c``, ``fan`` and ``mode`` as in :func:`init_kaiming_normal_`."""
    fan = _kaiming_fan(param, mode, layout)
    gain *= nn.init.calculate_gain(nonlinearity, a)
    bound = gain * math.sqrt(3.0 / fan)
    return nn.init.uniform_(param, -bound, bound)


def init_xavier_normal_(param: Tensor, gain: float = 1.0, *, layout: str | None = None) -> Tensor:
    """Fill ``param`` in place with ``N(0, std^2)``, ``std = gain * sqrt(2 / (fan_in + fan_out))``,
    fans from :func:`calc_fan_in_and_fan_out` with ``layout``. Returns ``param``."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param, layout)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return nn.init.normal_(param, mean=0.0, std=std)


def init_xavier_uniform_(param: Tensor, gain: float = 1.0, *, layout: str | None = None) -> Tensor:
    """Fill ``param`` in place with ``U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))``,
    fans from :func:`calc_fan_in_and_fan_out` with ``layout``. Returns ``param``."""
    fan_in, fan_out = calc_fan_in_and_fan_out(param, layout)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(param, -bound, bound)
