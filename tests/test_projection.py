"""Gradient projections and the alphaless step (FORMULAS section 2)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tl_noise.fitting.projection import (
    alphaless_gradient,
    alphaless_gradients,
    calculate_equivalent_alpha_and_scaling_factor,
    equivalent_alpha_and_scaling_factor_of,
    order_tensors_by_norm,
    project_out_smaller_tensor,
    vector_projection,
)

SETTINGS = settings(max_examples=100, deadline=None)

ELEMENTS = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=64)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5)


@st.composite
def pairs(draw, shape=None):
    """Two float64 tensors of one random shape; sometimes related (parallel, equal, zero)."""
    shape = draw(SHAPES) if shape is None else shape
    a = torch.from_numpy(draw(hnp.arrays(np.float64, shape, elements=ELEMENTS)))
    b = torch.from_numpy(draw(hnp.arrays(np.float64, shape, elements=ELEMENTS)))
    relation = draw(st.sampled_from(["independent"] * 4 + ["scaled", "negated", "zero"]))
    if relation == "scaled":
        b = a * draw(st.floats(-4, 4, allow_nan=False, allow_subnormal=False))
    elif relation == "negated":
        b = -a
    elif relation == "zero":
        b = torch.zeros_like(a)
    return (a, b) if draw(st.booleans()) else (b, a)


@st.composite
def pair_lists(draw):
    """Two lists of tensors with matching shapes (a parameter list's gradients)."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    drawn = [draw(pairs(shape)) for shape in shapes]
    return [a for a, _ in drawn], [b for _, b in drawn]


def same(got, expected):
    """The very same tensor objects, in order (tensor == would compare values)."""
    return len(got) == len(expected) and all(g is e for g, e in zip(got, expected, strict=True))


def dot(x, y):
    return torch.dot(x.reshape(-1).double(), y.reshape(-1).double()).item()


def composite(alpha, scale, n, t):
    return scale.double() * (alpha.double() * n.double() + (1 - alpha.double()) * t.double())


def check_equivalence(n, t, rtol):
    g = alphaless_gradient(n, t)
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(n, t)
    assert alpha.shape == scale.shape == ()
    assert alpha.dtype == scale.dtype == g.dtype == n.dtype
    # Near a + b = 0 alpha blows up and the identity loses precision: not the point of this test.
    # float32 may also overflow scale when ||S|| is tiny.
    assume(1e-4 < abs(scale.item()) < math.inf and math.isfinite(alpha.item()))
    # Rounding alpha by eps moves the composite by eps * |scale * alpha| * |n - t|: the identity is
    # only as well conditioned as the coefficients a = scale * alpha, b = scale * (1 - alpha).
    a, b = scale.double() * alpha.double(), scale.double() * (1 - alpha.double())
    magnitude = (abs(a) + abs(b)) * (n.double().abs().max() + t.double().abs().max())
    torch.testing.assert_close(
        g.double(), composite(alpha, scale, n, t), rtol=rtol, atol=rtol * magnitude.item() + 1e-30
    )


@SETTINGS
@given(pairs())
def test_alphaless_gradient_is_a_scaled_composite_gradient(nt):
    check_equivalence(*nt, rtol=1e-9)


@SETTINGS
@given(pairs())
def test_alphaless_gradient_is_a_scaled_composite_gradient_float32(nt):
    n, t = (x.float() for x in nt)
    check_equivalence(n, t, rtol=1e-5)


@SETTINGS
@given(pairs())
def test_alphaless_gradient_keeps_smaller_and_orthogonal_part_of_larger(nt):
    n, t = nt
    smaller, larger = order_tensors_by_norm(t, n)
    expected = smaller + (larger - vector_projection(larger, smaller))
    torch.testing.assert_close(alphaless_gradient(n, t), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        alphaless_gradient(n, t), smaller + project_out_smaller_tensor(t, n), rtol=1e-9, atol=1e-9
    )


def exact_dot(x, y):
    """Inner product in exact rational arithmetic: an oracle free of rounding and underflow."""
    return sum(
        (
            Fraction(u) * Fraction(v)
            for u, v in zip(x.flatten().tolist(), y.flatten().tolist(), strict=True)
        ),
        Fraction(0),
    )


def exact_norm_key(x, ord_):
    """A number that orders tensors like their ``ord``-norm, without underflow or rounding."""
    values = [abs(Fraction(v)) for v in x.flatten().tolist()]
    if ord_ in (None, 2):
        return sum(v * v for v in values)
    if ord_ == 1:
        return sum(values)
    if ord_ == math.inf:
        return max(values)
    if ord_ == -math.inf:
        return min(values)
    return Fraction(sum(math.sqrt(v) for v in values))  # ord = 0.5


@SETTINGS
@given(pairs())
def test_alpha_formula(nt):
    n, t = nt
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(n, t)
    noise_larger = order_tensors_by_norm(t, n)[1] is n  # the definition of "larger"
    s_sq = exact_dot(t, t) if noise_larger else exact_dot(n, n)
    c = exact_dot(n, t) / s_sq if s_sq else Fraction(0)
    a, b = (1, 1 - c) if noise_larger else (1 - c, 1)
    assume(abs(a + b) < 1e300)  # beyond float64's range the returned scale is -inf
    assert scale.item() == pytest.approx(float(a + b), rel=1e-9, abs=1e-12)
    if a + b == 0:  # rounding may leave a tiny scale instead of exactly 0
        assert alpha.item() == math.copysign(math.inf, a) or abs(alpha.item()) > 1e6
    elif abs(a + b) > 1e-9:  # closer to 0, rounding may legitimately land on a + b == 0
        assert alpha.item() == pytest.approx(float(a / (a + b)), rel=1e-9, abs=1e-12)


@SETTINGS
@given(pairs())
def test_project_out_smaller_tensor_is_symmetric_and_orthogonal(ab):
    a, b = ab
    out = project_out_smaller_tensor(a, b)
    smaller, larger = order_tensors_by_norm(a, b)
    # Orthogonal to the smaller tensor, relative to the sizes involved.
    size = larger.abs().max().item() * smaller.abs().max().item() * larger.numel()
    assert abs(dot(out, smaller)) <= 1e-9 * size
    if torch.linalg.vector_norm(a) != torch.linalg.vector_norm(b):
        assert torch.equal(out, project_out_smaller_tensor(b, a))


@SETTINGS
@given(pairs(), st.sampled_from([None, 1, 2, math.inf, -math.inf, 0.5]))
def test_order_tensors_by_norm_sorts_by_the_requested_norm(ab, ord_):
    a, b = ab
    kwargs = {} if ord_ is None else {"ord": ord_}
    smaller, larger = order_tensors_by_norm(a, b, **kwargs)
    key_a, key_b = (exact_norm_key(x, ord_) for x in (a, b))
    # Norms closer than rounding may go either way; exact ties have their own test.
    assume(abs(key_a - key_b) > 1e-9 * max(abs(key_a), abs(key_b)))
    assert same((smaller, larger), (b, a) if key_b < key_a else (a, b))


def test_order_tensors_by_norm_forwards_kwargs():
    c = torch.tensor([1.0, 1.0, 1.0, 1.0])  # 2-norm 2, 1-norm 4, inf-norm 1
    d = torch.tensor([2.5, 0.0, 0.0, 0.0])  # 2.5 for every norm
    assert same(order_tensors_by_norm(c, d), (c, d))
    assert same(order_tensors_by_norm(c, d, ord=1), (d, c))
    assert same(order_tensors_by_norm(d, c, ord=math.inf), (c, d))
    e = torch.tensor([2.0, 2.0, 2.0, 2.0])  # 2-norm 4, inf-norm 2
    f = torch.tensor([3.5, 0.0, 0.0, 0.0])
    assert same(order_tensors_by_norm(e, f), (f, e))
    assert same(order_tensors_by_norm(e, f, ord=math.inf), (e, f))
    with pytest.raises(ValueError, match="single number"):
        order_tensors_by_norm(torch.ones(2, 3), torch.ones(2, 3), dim=0)
    # Reducing over every dimension with keepdim still gives one number.
    assert same(order_tensors_by_norm(c, d, dim=0, keepdim=True), (c, d))


@SETTINGS
@given(pairs())
def test_order_is_stable_on_equal_norms(ab):
    a, _ = ab
    b = -a  # bitwise-equal norm
    assert order_tensors_by_norm(a, b)[0] is a
    assert order_tensors_by_norm(b, a)[0] is b
    assert order_tensors_by_norm(a, a.flip(0) if a.ndim else a, ord=math.inf)[0] is a


@SETTINGS
@given(pair_lists())
def test_list_versions_equal_the_concatenated_vector(lists):
    noise, task = lists
    n, t = torch.cat([x.reshape(-1) for x in noise]), torch.cat([x.reshape(-1) for x in task])
    g = alphaless_gradient(n, t)
    pieces = alphaless_gradients(noise, task)
    assert [p.shape for p in pieces] == [x.shape for x in noise]
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in pieces]), g, rtol=1e-9, atol=1e-9)
    alpha, scale = equivalent_alpha_and_scaling_factor_of(noise, task)
    expected_alpha, expected_scale = calculate_equivalent_alpha_and_scaling_factor(n, t)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-9, atol=1e-9)
    if abs(expected_scale.item()) > 1e-6:
        torch.testing.assert_close(alpha, expected_alpha, rtol=1e-6, atol=1e-9)


def test_list_versions_decide_on_the_whole_vector_not_per_piece():
    # Piece 0: noise larger; piece 1: task larger; overall: task larger (norm 5 vs sqrt(2)).
    noise = [torch.tensor([1.0]), torch.tensor([0.0, 1.0])]
    task = [torch.tensor([0.0]), torch.tensor([3.0, 4.0])]
    # S = noise, L = task: g = n + t - (<n, t> / ||n||^2) n = n + t - 2 n = t - n.
    g = alphaless_gradients(noise, task)
    torch.testing.assert_close(g, [torch.tensor([-1.0]), torch.tensor([3.0, 3.0])])
    alpha, scale = equivalent_alpha_and_scaling_factor_of(noise, task)
    assert (alpha.item(), scale.item()) == (-math.inf, 0.0)  # a = 1 - 2 = -1, b = 1


# Explicit cases: (n, t, expected g, expected alpha, expected scale).
CASES = {
    "noise zero": ([0.0, 0.0], [1.0, 2.0], [1.0, 2.0], 0.5, 2.0),
    "task zero": ([1.0, 2.0], [0.0, 0.0], [1.0, 2.0], 0.5, 2.0),
    "both zero": ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], 0.5, 2.0),
    # n = 3t: c = 3, a = 1, b = -2 -> g = n - 2t = t.
    "parallel, noise larger": ([3.0, 6.0], [1.0, 2.0], [1.0, 2.0], -1.0, -1.0),
    # t = 3n: c = 3, a = -2, b = 1 -> g = t - 2n = n.
    "parallel, task larger": ([1.0, 2.0], [3.0, 6.0], [1.0, 2.0], 2.0, -1.0),
    # n = -2t: c = -2, a = 1, b = 3 -> g = n + 3t = t.
    "anti-parallel": ([-2.0, -4.0], [1.0, 2.0], [1.0, 2.0], 0.25, 4.0),
    # Orthogonal: nothing to project, g = n + t, the composite with alpha = 1/2, scale 2.
    "orthogonal": ([0.0, 5.0], [1.0, 0.0], [1.0, 5.0], 0.5, 2.0),
    # ||n|| = ||t|| = 5: the task gradient is S. c = 24/25 -> g = n + t/25.
    "equal norms": ([3.0, 4.0], [4.0, 3.0], [3.16, 4.12], 25 / 26, 26 / 25),
    # n larger, <n, t> = 2 ||t||^2: a = 1, b = -1, g = n - t.
    "a + b = 0, noise larger": ([2.0, 1.0], [1.0, 0.0], [1.0, 1.0], math.inf, 0.0),
    # t larger, <n, t> = 2 ||n||^2: a = -1, b = 1, g = t - n.
    "a + b = 0, task larger": ([1.0, 0.0], [2.0, 1.0], [1.0, 1.0], -math.inf, 0.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_explicit_cases(case, dtype):
    n, t, g, alpha, scale = CASES[case]
    n, t, g = (torch.tensor(x, dtype=dtype) for x in (n, t, g))
    torch.testing.assert_close(alphaless_gradient(n, t), g)
    got_alpha, got_scale = calculate_equivalent_alpha_and_scaling_factor(n, t)
    assert got_alpha.dtype == got_scale.dtype == dtype
    assert got_alpha.item() == pytest.approx(alpha, rel=1e-6)
    assert got_scale.item() == pytest.approx(scale, rel=1e-6, abs=1e-12)
    if math.isfinite(alpha):
        torch.testing.assert_close(composite(got_alpha, got_scale, n, t).to(dtype), g)


def test_equal_norms_tie_is_broken_towards_the_task_gradient():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    # Swapping roles swaps which gradient is kept whole.
    torch.testing.assert_close(alphaless_gradient(a, b), a + b / 25)
    torch.testing.assert_close(alphaless_gradient(b, a), b + a / 25)
    # project_out_smaller_tensor: tensor_a counts as the smaller on ties.
    torch.testing.assert_close(project_out_smaller_tensor(a, b), b - 24 / 25 * a)
    torch.testing.assert_close(project_out_smaller_tensor(b, a), a - 24 / 25 * b)


def test_tiny_and_huge_gradients_neither_underflow_nor_overflow():
    # ||S||^2 = 9e-400 underflows float64 and <L, S> / ||S||^2 = 3e199 * ... would overflow.
    small, large = (
        torch.tensor([3e-200, 0.0], dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
    )
    torch.testing.assert_close(
        project_out_smaller_tensor(small, large), torch.tensor([0.0, 1.0]).double()
    )
    torch.testing.assert_close(
        alphaless_gradient(large, small), torch.tensor([3e-200, 1.0]).double()
    )
    torch.testing.assert_close(vector_projection(large, small), torch.tensor([1.0, 0.0]).double())
    # The step is homogeneous: scaling both gradients by 2^-900 scales it exactly.
    n, t = torch.tensor([3.0, -1.0, 2.0]).double(), torch.tensor([0.5, 0.25, -4.0]).double()
    k = 2.0**-900
    assert torch.equal(alphaless_gradient(k * n, k * t), k * alphaless_gradient(n, t))
    assert calculate_equivalent_alpha_and_scaling_factor(
        k * n, k * t
    ) == calculate_equivalent_alpha_and_scaling_factor(n, t)


def test_exactly_degenerate_parallel_gradients_give_infinite_alpha():
    n = torch.full((3, 5), 34.421, dtype=torch.float64)
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(n, 2 * n)  # t larger, c = 2
    assert (alpha.item(), scale.item()) == (-math.inf, 0.0)
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(2 * n, n)  # n larger, c = 2
    assert (alpha.item(), scale.item()) == (math.inf, 0.0)
    torch.testing.assert_close(alphaless_gradient(2 * n, n), n)


def test_vector_projection():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(vector_projection(a, b), torch.tensor([[0.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(vector_projection(a, torch.zeros(2, 2)), torch.zeros(2, 2))
    torch.testing.assert_close(vector_projection(torch.zeros(2, 2), b), torch.zeros(2, 2))
    torch.testing.assert_close(vector_projection(a, -3 * a), a)


def test_zero_gradients_give_no_nan():
    zero = torch.zeros(3)
    for fn in (vector_projection, project_out_smaller_tensor, alphaless_gradient):
        assert torch.equal(fn(zero, zero), zero)
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(zero, zero)
    assert (alpha.item(), scale.item()) == (0.5, 2.0)


def test_low_precision_inputs_accumulate_in_high_precision_and_keep_their_dtype():
    # 300^2 overflows float16 (max 65504); a float16 inner product would be inf.
    n = torch.tensor([300.0, 0.0], dtype=torch.float16)
    t = torch.tensor([0.0, 200.0], dtype=torch.float16)
    g = alphaless_gradient(n, t)
    assert g.dtype == torch.float16
    torch.testing.assert_close(g, torch.tensor([300.0, 200.0], dtype=torch.float16))
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(n, t)
    assert (alpha.dtype, alpha.item(), scale.item()) == (torch.float32, 0.5, 2.0)
    # |alpha| = 1e5 / 2 would overflow float16 (c = <n, t> / ||S||^2 = 1e5, t larger).
    alpha, scale = calculate_equivalent_alpha_and_scaling_factor(
        torch.tensor([0.01], dtype=torch.float16), torch.tensor([1000.0], dtype=torch.float16)
    )
    assert math.isfinite(alpha.item()) and alpha.item() == pytest.approx(1.0, abs=1e-4)
    assert scale.item() == pytest.approx(2 - 1000 / 0.01, rel=1e-3)
    bf = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    other = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = project_out_smaller_tensor(bf, other)
    assert out.dtype == torch.bfloat16
    expected = project_out_smaller_tensor(bf.double(), other.double()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    mixed = alphaless_gradient(n.float(), t.double())
    assert mixed.dtype == torch.float64


def test_shape_and_type_errors_name_the_arguments():
    with pytest.raises(ValueError, match=r"noise_loss_grad has shape \(3,\).*\(4,\)"):
        alphaless_gradient(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"model_loss_grad has shape \(2, 3\)"):
        calculate_equivalent_alpha_and_scaling_factor(torch.zeros(3, 2), torch.zeros(2, 3))
    for fn in (vector_projection, order_tensors_by_norm, project_out_smaller_tensor):
        with pytest.raises(ValueError, match=r"tensor_a has shape \(2,\) but tensor_b"):
            fn(torch.zeros(2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"noise_grads\[1\] has shape \(2,\).*model_grads\[1\]"):
        alphaless_gradients([torch.zeros(1), torch.zeros(2)], [torch.zeros(1), torch.zeros(3)])
    with pytest.raises(ValueError, match="noise_grads has 2 tensors but model_grads has 1"):
        equivalent_alpha_and_scaling_factor_of([torch.zeros(1)] * 2, [torch.zeros(1)])
    with pytest.raises(ValueError, match="empty"):
        alphaless_gradients([], [])
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        alphaless_gradient(torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(TypeError, match=r"model_grads\[0\] must be a tensor, got NoneType"):
        alphaless_gradients([torch.zeros(2)], [None])
