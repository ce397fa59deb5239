"""Gradient projections for alphaless training.

The composite objective ``L = alpha * L_noise + (1 - alpha) * L_task`` needs a hand-tuned
``alpha``. Alphaless training drops it: with ``n = grad L_noise`` and ``t = grad L_task``, and
``(S, L)`` the smaller and larger of the two by 2-norm, the step direction is

    g = S + (L - proj_S(L)),        proj_S(L) = (<L, S> / <S, S>) S,

i.e. the smaller gradient is kept whole and the larger contributes only its component orthogonal
to the smaller one, so neither objective can undo the other's step along ``S``.

Compared with PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning",
https://arxiv.org/abs/2001.06782): PCGrad projects ``g_i`` onto the normal plane of ``g_j`` only
when they *conflict* (``<g_i, g_j> < 0``) and does so symmetrically for every task. The alphaless
rule always projects, whatever the sign of ``<n, t>``, and only the larger gradient is projected.
:func:`calculate_equivalent_alpha_and_scaling_factor` recovers the composite ``alpha`` (and a step
scale) that the alphaless step amounts to.

Every function has a single-tensor form and, where training needs it, a form over a list of tensors
(a model's parameter gradients, treated as one concatenated vector); both run the same code.
Inner products and norms are accumulated in float64 (float32 on MPS, which has no float64), on
vectors first divided by a power of two near their largest entry: exact, so results match the
plain formulas bit for bit in the normal range, while tiny or huge gradients neither underflow
nor overflow. Results come back in the inputs' (promoted) dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "alphaless_gradient",
    "alphaless_gradients",
    "calculate_equivalent_alpha_and_scaling_factor",
    "equivalent_alpha_and_scaling_factor_of",
    "equivalent_alpha_and_scaling_factor_rows",
    "order_tensors_by_norm",
    "project_out_smaller_tensor",
    "vector_projection",
]

Vector = Sequence[Tensor]
"""A vector stored in pieces: the concatenation of the flattened tensors."""


def _check_pair(xs: Vector, ys: Vector, x_name: str, y_name: str, indexed: bool) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"{x_name} has {len(xs)} tensors but {y_name} has {len(ys)}")
    if not xs:
        raise ValueError(f"{x_name} and {y_name} are empty; need at least one tensor each")
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        xi, yi = (f"{x_name}[{i}]", f"{y_name}[{i}]") if indexed else (x_name, y_name)
        for name, value in ((xi, x), (yi, y)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
        if x.shape != y.shape:
            raise ValueError(
                f"{xi} has shape {tuple(x.shape)} but {yi} has shape {tuple(y.shape)}; "
                "they must match"
            )


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _dot(xs: Vector, ys: Vector) -> Float[Tensor, ""]:
    """``<x, y>`` of the concatenated vectors, accumulated in float64."""
    acc = _accumulation_dtype(xs[0])
    return torch.stack(
        [
            torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc))
            for x, y in zip(xs, ys, strict=True)
        ]
    ).sum()


def _power_of_two_scale(xs: Vector, dtype: torch.dtype) -> Float[Tensor, ""]:
    """The power of two ``m`` with ``max|x|`` in ``[m/2, m)`` (1 for the zero vector).

    Dividing by ``m`` is exact, so a norm or ratio computed on ``x / m`` and scaled back equals the
    unscaled one bit for bit in the normal range, but its squares can neither underflow (tiny
    gradients) nor overflow (huge ones).
    """
    peak = torch.stack(
        [x.abs().amax().to(dtype) if x.numel() else torch.zeros((), dtype=dtype) for x in xs]
    ).amax()
    return torch.ldexp(torch.ones_like(peak), torch.frexp(peak).exponent)


def _norm(xs: Vector, **norm_kwargs: Any) -> Float[Tensor, ""]:
    """``torch.linalg.vector_norm`` of the concatenated vector (kwargs only for one piece).

    Computed as ``m * ||x / m||`` (see :func:`_power_of_two_scale`), except for ``ord=0``, which
    counts nonzeros and is not homogeneous.
    """
    dtype = norm_kwargs.setdefault("dtype", _accumulation_dtype(xs[0]))
    homogeneous = norm_kwargs.get("ord", 2) != 0
    m = _power_of_two_scale(xs, dtype) if homogeneous else torch.ones((), dtype=dtype)
    pieces = [torch.linalg.vector_norm(x.to(dtype) / m, **norm_kwargs) for x in xs]
    if len(xs) == 1:
        (norm,) = pieces
        if norm.numel() != 1:
            raise ValueError(
                f"vector_norm kwargs {norm_kwargs} give a norm of shape {tuple(norm.shape)}; "
                "ordering needs a single number per tensor"
            )
        return norm.reshape(()) * m
    # The 2-norm of a concatenation is the 2-norm of the pieces' 2-norms.
    return torch.linalg.vector_norm(torch.stack(pieces)) * m


def _order(xs: Vector, ys: Vector, **norm_kwargs: Any) -> tuple[Vector, Vector, bool]:
    """``(smaller, larger, swapped)``; ``ys`` comes first only if its norm is smaller by more
    than rounding: norms within ``16 sqrt(numel) eps`` (relative) are a tie, so a vector and a
    permutation of it tie however their pieces are summed (one tensor or a list of them)."""
    a, b = _norm(ys, **norm_kwargs), _norm(xs, **norm_kwargs)
    numel = sum(x.numel() for x in xs)
    slack = 16 * math.sqrt(max(numel, 1)) * torch.finfo(a.dtype).eps
    if a < b * (1 - slack):
        return ys, xs, True
    return xs, ys, False


class _Projection(NamedTuple):
    """``proj_onto(x) = k * unit``, ``unit = onto / m``; ``<x, onto> / <onto, onto> = k / m``."""

    k: Float[Tensor, ""]
    m: Float[Tensor, ""]
    unit: list[Tensor]


def _project(xs: Vector, onto: Vector) -> _Projection:
    """Project ``x`` onto ``onto`` (``k = 0`` when ``onto`` is the zero vector).

    With ``m`` from :func:`_power_of_two_scale`, ``k / m`` equals the unscaled
    ``<x, onto> / <onto, onto>`` bit for bit in float64's normal range, while
    ``<unit, unit> >= 1/4`` cannot underflow and ``k * unit`` never multiplies an overflowing ratio
    by a tiny vector.
    """
    acc = _accumulation_dtype(onto[0])
    m = _power_of_two_scale(onto, acc)
    unit = [o.to(acc) / m for o in onto]
    norm_sq = _dot(unit, unit)
    nonzero = norm_sq > 0
    k = _dot(xs, unit) / torch.where(nonzero, norm_sq, torch.ones_like(norm_sq))
    return _Projection(torch.where(nonzero, k, torch.zeros_like(k)), m, unit)


def _combine(
    terms: Sequence[tuple[Tensor | float, Vector]], like: tuple[Vector, Vector]
) -> list[Tensor]:
    """``sum_k c_k v_k`` piece by piece in float64, cast to the promoted dtype of ``like``."""
    out = []
    for i, (x, y) in enumerate(zip(*like, strict=True)):
        acc = _accumulation_dtype(x)
        total = functools.reduce(torch.add, [c * v[i].to(acc) for c, v in terms])
        out.append(total.to(torch.promote_types(x.dtype, y.dtype)))
    return out


def _project_out_smaller(xs: Vector, ys: Vector) -> list[Tensor]:
    smaller, larger, _ = _order(xs, ys)
    projection = _project(larger, smaller)
    return _combine([(1.0, larger), (-projection.k, projection.unit)], like=(xs, ys))


def _alphaless(noise: Vector, task: Vector) -> list[Tensor]:
    # Task first: on exactly equal norms the task gradient is the one kept whole.
    smaller, larger, _ = _order(task, noise)
    projection = _project(larger, smaller)
    terms: list[tuple[Tensor | float, Vector]] = [
        (1.0, smaller),
        (1.0, larger),
        (-projection.k, projection.unit),
    ]
    return _combine(terms, like=(noise, task))


def _equivalent_alpha(noise: Vector, task: Vector) -> tuple[Tensor, Tensor]:
    smaller, larger, noise_smaller = _order(task, noise)
    projection = _project(larger, smaller)
    c = projection.k / projection.m  # <n, t> / ||S||^2 whichever of n, t is S
    # a + b = 2 - c in both cases; alpha = a / (a + b) is 1 / scale (noise larger, a = 1) or
    # 1 - 1 / scale (task larger, a = 1 - c). This form stays finite when c overflows to inf.
    scale = 2.0 - c
    degenerate = scale == 0
    inverse = torch.where(
        degenerate, torch.full_like(scale, float("inf")), 1.0 / torch.where(degenerate, 1.0, scale)
    )
    alpha = 1.0 - inverse if noise_smaller else inverse
    # float16 cannot hold the large |alpha| met near a + b = 0: use at least float32.
    dtype = functools.reduce(torch.promote_types, [noise[0].dtype, task[0].dtype, torch.float32])
    return alpha.to(dtype), scale.to(dtype)


def vector_projection(
    tensor_a: Float[Tensor, "*shape"], tensor_b: Float[Tensor, "*shape"]
) -> Float[Tensor, "*shape"]:
    """Projection of ``a`` onto ``b``: ``proj_b(a) = (<a, b> / <b, b>) b`` (zeros if ``b == 0``).

    ``<., .>`` is the inner product of the flattened tensors.
    """
    _check_pair([tensor_a], [tensor_b], "tensor_a", "tensor_b", indexed=False)
    projection = _project([tensor_a], [tensor_b])
    return _combine([(projection.k, projection.unit)], like=([tensor_a], [tensor_b]))[0]


def order_tensors_by_norm(
    tensor_a: Float[Tensor, "*shape"], tensor_b: Float[Tensor, "*shape"], **kwargs: Any
) -> tuple[Float[Tensor, "*shape"], Float[Tensor, "*shape"]]:
    """``(smaller, larger)`` by ``torch.linalg.vector_norm(tensor, **kwargs)``.

    Default: the 2-norm of the flattened tensor (computed in float64 unless ``dtype`` is given);
    ``ord=1``, ``ord=float("inf")`` etc. pass through. Stable: on equal norms the given order is
    kept, i.e. ``(tensor_a, tensor_b)``. The kwargs must reduce each tensor to one number. Each
    tensor is divided by a power of two before the norm and the norm scaled back, so tensors whose
    squared entries would underflow (norms below ~1e-154 in float64) still compare correctly.
    """
    _check_pair([tensor_a], [tensor_b], "tensor_a", "tensor_b", indexed=False)
    smaller, larger, _ = _order([tensor_a], [tensor_b], **kwargs)
    return smaller[0], larger[0]


def project_out_smaller_tensor(
    tensor_a: Float[Tensor, "*shape"], tensor_b: Float[Tensor, "*shape"]
) -> Float[Tensor, "*shape"]:
    """The larger tensor (2-norm) minus its projection onto the smaller: ``L - proj_S(L)``.

    The result is orthogonal to ``S``. Symmetric in its arguments, except when the two norms are
    exactly equal: then ``tensor_a`` counts as the smaller one (the stable order of
    :func:`order_tensors_by_norm`), so the result is ``b - proj_a(b)``.
    """
    _check_pair([tensor_a], [tensor_b], "tensor_a", "tensor_b", indexed=False)
    return _project_out_smaller([tensor_a], [tensor_b])[0]


def alphaless_gradient(
    noise_loss_grad: Float[Tensor, "*shape"], model_loss_grad: Float[Tensor, "*shape"]
) -> Float[Tensor, "*shape"]:
    """The alphaless step ``g = S + (L - proj_S(L))``.

    ``(S, L) = order_tensors_by_norm(model_loss_grad, noise_loss_grad)``: the smaller gradient is
    kept whole, the larger loses its component along the smaller. On exactly equal norms the task
    (model-loss) gradient is ``S``. Equivalently ``g = L + (1 - <L, S>/||S||^2) S``, with the
    coefficient taken as 0 when ``S = 0`` (then ``g = L``).
    """
    _check_pair(
        [noise_loss_grad], [model_loss_grad], "noise_loss_grad", "model_loss_grad", indexed=False
    )
    return _alphaless([noise_loss_grad], [model_loss_grad])[0]


def alphaless_gradients(
    noise_grads: Sequence[Float[Tensor, "..."]], model_grads: Sequence[Float[Tensor, "..."]]
) -> list[Float[Tensor, "..."]]:
    """:func:`alphaless_gradient` for a list of parameter gradients seen as one vector.

    ``noise_grads[i]`` and ``model_grads[i]`` are the gradients of parameter ``i``; norms, inner
    products and the smaller/larger decision are over the whole concatenation, so the result
    equals splitting ``alphaless_gradient(cat(n), cat(t))`` back into the parameters' shapes.
    """
    _check_pair(noise_grads, model_grads, "noise_grads", "model_grads", indexed=True)
    return _alphaless(noise_grads, model_grads)


def calculate_equivalent_alpha_and_scaling_factor(
    noise_loss_grad: Float[Tensor, "*shape"], model_loss_grad: Float[Tensor, "*shape"]
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """``(alpha, scale)`` with ``alphaless_gradient(n, t) == scale * (alpha n + (1 - alpha) t)``.

    Write ``g = a n + b t``; then ``scale = a + b`` and ``alpha = a / (a + b)``. With
    ``c = <n, t> / ||S||^2`` (``c = 0`` when ``S = 0``): if ``||n|| >= ||t||`` (noise larger),
    ``a = 1, b = 1 - c``; otherwise ``a = 1 - c, b = 1``. In both cases ``scale = 2 - c``, and
    ``alpha`` may leave ``[0, 1]``: with the noise gradient larger, ``alpha = 1 / (2 - c)`` is
    above 1 for ``1 < c < 2`` and negative for ``c > 2``.

    Degenerate case ``a + b == 0`` (``c == 2``, e.g. ``n`` larger and ``<n, t> = 2 ||t||^2``): ``g``
    is ``+-(n - t)``, not a multiple of any composite direction with finite ``alpha``. Then
    ``scale = 0`` and ``alpha = copysign(inf, a)``: ``+inf`` when the noise gradient is the larger,
    ``-inf`` when the task gradient is. Near it, ``scale -> 0`` and ``|alpha| -> inf`` with a finite
    product. Returns 0-d tensors in the inputs' dtype, or float32 if that is narrower.
    """
    _check_pair(
        [noise_loss_grad], [model_loss_grad], "noise_loss_grad", "model_loss_grad", indexed=False
    )
    return _equivalent_alpha([noise_loss_grad], [model_loss_grad])


def equivalent_alpha_and_scaling_factor_of(
    noise_grads: Sequence[Float[Tensor, "..."]], model_grads: Sequence[Float[Tensor, "..."]]
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """:func:`calculate_equivalent_alpha_and_scaling_factor` over a list of parameter gradients.

    Matches :func:`alphaless_gradients`: ``g_i == scale * (alpha n_i + (1 - alpha) t_i)`` for
    every parameter ``i``, with one ``(alpha, scale)`` for the whole concatenated vector.
    """
    _check_pair(noise_grads, model_grads, "noise_grads", "model_grads", indexed=True)
    return _equivalent_alpha(noise_grads, model_grads)


def equivalent_alpha_and_scaling_factor_rows(
    noise_norm: Float[Tensor, "*rows"],
    task_norm: Float[Tensor, "*rows"],
    dot: Float[Tensor, "*rows"],
) -> tuple[Float[Tensor, "*rows"], Float[Tensor, "*rows"]]:
    """:func:`calculate_equivalent_alpha_and_scaling_factor` for many independent pairs at once,
    from their norms ``||n||``, ``||t||`` and inner products ``<n, t>`` (e.g. one pair per head).

    The same closed form: ``c = <n, t> / ||S||^2`` (0 when ``S = 0``); noise larger (``||n|| >=
    ||t||``): ``a = 1, b = 1 - c``; else ``a = 1 - c, b = 1``; ``scale = a + b``, ``alpha = a /
    scale``, and ``alpha = copysign(inf, a)`` where ``scale == 0``. No power-of-two rescaling: the
    inputs are already reduced, so pass them in float32 or wider.
    """
    noise_larger = noise_norm >= task_norm
    smaller_sq = torch.where(noise_larger, task_norm, noise_norm).pow(2)
    c = torch.where(smaller_sq > 0, dot / smaller_sq.clamp_min(1e-30), torch.zeros_like(dot))
    a = torch.where(noise_larger, torch.ones_like(c), 1 - c)
    b = torch.where(noise_larger, 1 - c, torch.ones_like(c))
    scale = a + b
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    alpha = torch.where(scale != 0, a / safe, torch.sign(a) * math.inf)
    return alpha, scale
