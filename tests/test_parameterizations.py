"""tl_noise.noise.parameterizations: reference numbers, properties, validation, configs."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_noise.noise import parameterizations as params_module
from tl_noise.noise.parameterizations import (
    CloakStandardDeviationParameterization,
    DirectStandardDeviationParameterization,
    ScaledStandardDeviationParameterization,
    SoftplusStandardDeviationParameterization,
    StandardDeviationParameterization,
    parameterization_from_config,
    register_parameterization,
)

Cloak = CloakStandardDeviationParameterization
Direct = DirectStandardDeviationParameterization
Softplus = SoftplusStandardDeviationParameterization

F64 = torch.float64
hyp = settings(deadline=None, max_examples=60)

# lo in [0, 10], hi - lo in [1e-3, 10]: every pair is valid and not degenerate in float32.
scales = st.tuples(st.floats(0.0, 10.0), st.floats(1e-3, 10.0)).map(lambda t: (t[0], t[0] + t[1]))
# Scales with min <= max - min, where the Cloak inverse is well conditioned down to p ~ 1e-11.
narrow_min_scales = st.tuples(st.floats(0.0, 1.0), st.floats(1.0, 10.0)).map(
    lambda t: (t[0] * t[1] / 2, t[0] * t[1] / 2 + t[1])
)
shallows = st.floats(0.1, 10.0)


def rho_lists(low: float, high: float) -> st.SearchStrategy[list[float]]:
    return st.lists(st.floats(low, high, allow_nan=False), min_size=1, max_size=16)


def bounds(p: ScaledStandardDeviationParameterization) -> tuple[float, float]:
    """The bounds as stored (float32 roundings of the configured scale)."""
    return p.min_scale.item(), p.max_scale.item()


def autograd_derivative(p: StandardDeviationParameterization, rhos: torch.Tensor) -> torch.Tensor:
    leaf = rhos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(p(leaf).sum(), leaf)
    return grad


# ---------------------------------------------------------------- reference numbers (FORMULAS §1)


def test_cloak_reference_numbers():
    std = Cloak()(torch.tensor([-4.0, 0.0], dtype=F64))
    assert std[0].item() == pytest.approx(7.7e-4, rel=2e-3)
    assert std[1].item() == pytest.approx(1.00005, abs=1e-9)
    assert Cloak(shallow=2.0)(torch.tensor(-4.0)).item() == pytest.approx(0.036, rel=5e-3)


def test_cloak_matches_tanh_form_and_closed_form():
    lo, hi = 1e-4, 2.0
    rho = torch.linspace(-6, 6, 25, dtype=F64)
    for s in (0.5, 1.0, 2.0):
        p = Cloak((lo, hi), shallow=s)
        lo32, hi32 = bounds(p)
        tanh_form = lo32 + (hi32 - lo32) * (1 + torch.tanh(rho / s)) / 2
        torch.testing.assert_close(p(rho), tanh_form, rtol=1e-12, atol=1e-15)
    # rho = -4, s = 1: min + (max - min) * sigmoid(-8), written out.
    expected = lo + (hi - lo) / (1 + math.exp(8.0))
    assert Cloak()(torch.tensor(-4.0, dtype=F64)).item() == pytest.approx(expected, rel=1e-6)


def test_cloak_shallow_flattens_the_curve():
    rho = torch.tensor([-4.0, -1.0, 1.0, 4.0])
    sharp, base, flat = (Cloak(shallow=s)(rho) for s in (0.5, 1.0, 2.0))
    assert torch.all(flat[:2] > base[:2]) and torch.all(base[:2] > sharp[:2])
    assert torch.all(flat[2:] < base[2:]) and torch.all(base[2:] < sharp[2:])


def test_direct_and_softplus_values():
    rho = torch.tensor([-1.0, 0.5, 3.0], dtype=F64)
    lo32 = Direct().min_scale.item()
    torch.testing.assert_close(Direct()(rho), torch.tensor([lo32, 0.5, 2.0], dtype=F64))
    sp = Softplus(min_scale=0.25)(torch.tensor([0.0, 20.0], dtype=F64))
    torch.testing.assert_close(sp, torch.tensor([0.25 + math.log(2.0), 20.25], dtype=F64))


# ---------------------------------------------------------------- range properties


@hyp
@given(scale=scales, shallow=shallows, rhos=rho_lists(-1e30, 1e30))
def test_cloak_forward_stays_within_bounds(scale, shallow, rhos):
    p = Cloak(scale, shallow=shallow)
    std = p(torch.tensor(rhos, dtype=F64))
    lo, hi = bounds(p)
    assert torch.all(std >= lo) and torch.all(std <= hi)


@hyp
@given(scale=scales, shallow=shallows, xs=rho_lists(-20.0, 20.0))
def test_cloak_forward_is_strictly_inside_where_representable(scale, shallow, xs):
    # |2 rho / s| <= 20 keeps (max - min) * sigmoid(.) far above float64 resolution.
    p = Cloak(scale, shallow=shallow)
    std = p(torch.tensor(xs, dtype=F64) * (shallow / 2))
    lo, hi = bounds(p)
    assert torch.all(std > lo) and torch.all(std < hi)


@hyp
@given(scale=scales, rhos=rho_lists(-1e6, 1e6))
def test_direct_forward_is_the_clamp(scale, rhos):
    p = Direct(scale)
    rho = torch.tensor(rhos, dtype=F64)
    std = p(rho)
    lo, hi = bounds(p)
    assert torch.all(std >= lo) and torch.all(std <= hi)
    inside = (rho >= lo) & (rho <= hi)
    assert torch.equal(std[inside], rho[inside])


@hyp
@given(min_scale=st.floats(0.0, 10.0), rhos=rho_lists(-1e6, 1e6))
def test_softplus_forward_is_at_least_min(min_scale, rhos):
    p = Softplus(min_scale)
    rho = torch.tensor(rhos, dtype=F64)
    std = p(rho)
    lo = p.min_scale.item()
    assert torch.all(std >= lo)
    assert torch.all(std[rho >= -30] > lo)


# ---------------------------------------------------------------- inverse


@hyp
@given(scale=narrow_min_scales, shallow=shallows, xs=rho_lists(-12.0, 8.0))
def test_cloak_inverse_round_trip_float64(scale, shallow, xs):
    p = Cloak(scale, shallow=shallow)
    rho = torch.tensor(xs, dtype=F64) * shallow
    torch.testing.assert_close(p.inverse(p(rho)), rho, rtol=0, atol=1e-4 * shallow)


def test_cloak_inverse_round_trip_float32_down_to_cloak_inits():
    # rho = -9 (Cloak's MNIST init) maps to p ~ 1.5e-8, where atanh(2p - 1) would read 2p - 1 as
    # -1 in float32; the logit form recovers it.
    p = Cloak()
    rho = torch.tensor([-9.0, -4.0, -1.0, 0.0, 2.0, 4.0])
    torch.testing.assert_close(p.inverse(p(rho)), rho, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cloak_inverse_of_bounds_and_beyond_is_finite(dtype):
    p = Cloak(shallow=2.0)
    lo, hi = p.min_scale.to(dtype), p.max_scale.to(dtype)
    std = torch.stack([lo - lo, lo, hi, hi + 3])
    rho = p.inverse(std)
    assert rho.dtype == dtype
    assert torch.all(torch.isfinite(rho))
    assert rho[0] == rho[1] < 0 < rho[2] == rho[3]
    # The forward map sends the clamped inverse back to the bounds.
    torch.testing.assert_close(p(rho), torch.stack([lo, lo, hi, hi]))


@hyp
@given(scale=scales, rhos=rho_lists(-1e3, 1e3))
def test_direct_inverse_is_the_clamp(scale, rhos):
    p = Direct(scale)
    rho = torch.tensor(rhos, dtype=F64)
    torch.testing.assert_close(p.inverse(rho), p(rho), rtol=0, atol=0)
    torch.testing.assert_close(p.inverse(p(rho)), p(rho), rtol=0, atol=0)


@hyp
@given(xs=rho_lists(-30.0, 30.0), min_scale=st.sampled_from([0.0, 1e-4]))
def test_softplus_inverse_round_trip(xs, min_scale):
    p = Softplus(min_scale)
    rho = torch.tensor(xs, dtype=F64)
    if min_scale > 0:
        rho = rho.clamp_min(-5.0)  # below that softplus(rho) drowns in min_scale's rounding
    torch.testing.assert_close(p.inverse(p(rho)), rho, rtol=1e-7, atol=1e-7)


def test_softplus_inverse_is_stable_at_the_extremes():
    p = Softplus()
    std = torch.tensor([0.0, -1.0, 1e-30, 100.0, 1e4])
    rho = p.inverse(std)
    assert torch.all(torch.isfinite(rho))
    assert rho[2].item() == pytest.approx(math.log(1e-30), rel=1e-6)
    assert rho[3].item() == pytest.approx(100.0) and rho[4].item() == pytest.approx(1e4)


# ---------------------------------------------------------------- derivative


@hyp
@given(scale=scales, shallow=shallows, xs=rho_lists(-30.0, 30.0))
def test_cloak_derivative_matches_autograd(scale, shallow, xs):
    p = Cloak(scale, shallow=shallow)
    rho = torch.tensor(xs, dtype=F64) * shallow
    torch.testing.assert_close(
        p.derivative(rho), autograd_derivative(p, rho), rtol=1e-7, atol=1e-10
    )


def test_cloak_derivative_closed_form_and_tail():
    p = Cloak(shallow=2.0)
    lo, hi = bounds(p)
    assert p.derivative(torch.tensor(0.0, dtype=F64)).item() == pytest.approx((hi - lo) / 4)
    # float32 sigmoid(40) == 1, so s * (1 - s) would be 0; the analytic form keeps the tail.
    tail = Cloak().derivative(torch.tensor(20.0)).item()
    assert tail == pytest.approx(2 * (hi - lo) * math.exp(-40.0), rel=1e-4, abs=0)


@pytest.mark.parametrize("scale", [(1e-4, 2.0), (0.5, 3.0)])
def test_direct_derivative_matches_autograd_including_bounds(scale):
    p = Direct(scale)
    lo, hi = bounds(p)
    rho = torch.tensor([lo - 1, lo, (lo + hi) / 2, hi, hi + 1, math.nan], dtype=F64)
    expected = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(p.derivative(rho), expected)
    torch.testing.assert_close(autograd_derivative(p, rho), expected)


@hyp
@given(min_scale=st.floats(0.0, 10.0), rhos=rho_lists(-50.0, 50.0))
def test_softplus_derivative_matches_autograd(min_scale, rhos):
    p = Softplus(min_scale)
    rho = torch.tensor(rhos, dtype=F64)
    torch.testing.assert_close(p.derivative(rho), autograd_derivative(p, rho), rtol=1e-7, atol=0)


def test_custom_subclass_gets_autograd_derivative_and_abstract_bases_refuse():
    class Square(StandardDeviationParameterization):
        def forward(self, rhos):
            return rhos**2

        def inverse(self, std):
            return std.sqrt()

    rho = torch.tensor([-1.5, 0.0, 2.0])
    torch.testing.assert_close(Square().derivative(rho), 2 * rho)
    with pytest.raises(TypeError):
        StandardDeviationParameterization()
    with pytest.raises(TypeError):
        ScaledStandardDeviationParameterization()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("scale", "named"),
    [
        ((2.0, 1.0), "min_scale=2.0 is not below max_scale=1.0"),
        ((1.0, 1.0), "min_scale=1.0 is not below max_scale=1.0"),
        ((1.0, 1.0 + 1e-12), "equal in float32"),
        ((-1.0, 2.0), "min_scale=-1.0"),
        ((0.0, -2.0), "max_scale=-2.0"),
        ((math.nan, 2.0), "min_scale=nan"),
        ((0.0, math.inf), "max_scale=inf"),
        ((0.0, 1e39), "max_scale=1e+39"),
        (("a", 2.0), "'a'"),
        ((True, 2.0), "True"),
        ((0.1, 1.0, 2.0), "got 3: (0.1, 1.0, 2.0)"),
        ((1.0,), "got 1: (1.0,)"),
    ],
)
@pytest.mark.parametrize("cls", [Cloak, Direct])
def test_scale_validation_names_the_value_and_the_range(cls, scale, named):
    with pytest.raises(ValueError) as info:
        cls(scale)
    assert named in str(info.value)
    assert "0 <= min_scale < max_scale" in str(info.value)


@pytest.mark.parametrize(("scale", "named"), [(2.0, "got 2.0"), ("ab", "'ab'"), (None, "None")])
def test_scale_that_is_not_a_pair_is_a_type_error(scale, named):
    with pytest.raises(TypeError, match=named):
        Cloak(scale)


@pytest.mark.parametrize(
    ("shallow", "named"),
    [
        (0.0, "got 0.0"),
        (-1.0, "got -1.0"),
        (math.nan, "got nan"),
        (math.inf, "got inf"),
        ("2", "got '2'"),
        ([1.0], r"got \[1.0\]"),
        (torch.ones(2), "got tensor"),
        (True, "got True"),
    ],
)
def test_shallow_validation(shallow, named):
    with pytest.raises(ValueError, match=named):
        Cloak(shallow=shallow)


@pytest.mark.parametrize(
    ("min_scale", "named"),
    [(-0.5, "got -0.5"), (math.nan, "got nan"), (math.inf, "got inf"), ("x", "got 'x'")],
)
def test_softplus_min_scale_validation(min_scale, named):
    with pytest.raises(ValueError, match=named):
        Softplus(min_scale)


def test_scalar_like_settings_are_accepted():
    p = Cloak(scale=[0.5, torch.tensor(4.0)], shallow=torch.tensor(2.0))
    assert p.scale == (0.5, 4.0) and isinstance(p.scale[1], float)
    assert p.shallow == 2.0 and isinstance(p.shallow, float)
    assert Cloak(scale=torch.tensor([0.25, 1.0])).scale == (0.25, 1.0)


@pytest.mark.parametrize("p", [Cloak(), Direct(), Softplus()])
def test_integer_inputs_are_rejected(p):
    with pytest.raises(TypeError, match="torch.int64"):
        p(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="floating-point"):
        p.inverse(torch.tensor([1, 2]))


# ---------------------------------------------------------------- buffers, meta device, dtype


@pytest.mark.parametrize(
    "make",
    [
        lambda: Cloak((0.5, 3.0), shallow=2.0),
        lambda: Direct((0.25, 4.0)),
        lambda: Softplus(0.75),
    ],
)
def test_meta_device_then_to_empty_and_reset(make):
    with torch.device("meta"):
        p = make()
    assert p.min_scale.is_meta
    assert p(torch.zeros(3, device="meta")).is_meta
    p.to_empty(device="cpu")
    p.reset_parameters()
    reference = make()
    for name, buffer in reference.named_buffers():
        restored = getattr(p, name)
        assert restored.device.type == "cpu" and restored.dtype == torch.float32
        assert torch.equal(restored, buffer)
    rho = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(p(rho), reference(rho), rtol=0, atol=0)


def test_bounds_are_float32_buffers_outside_the_state_dict():
    p = Cloak((0.5, 3.0))
    assert p.min_scale.dtype == p.max_scale.dtype == torch.float32
    assert p.min_scale.item() == 0.5 and p.max_scale.item() == 3.0
    assert p.scale == (0.5, 3.0)
    assert p.state_dict() == {}
    p.to(F64)
    p.reset_parameters()  # keeps the dtype .to() chose
    assert p.min_scale.dtype == F64 and p.min_scale.item() == 0.5


@pytest.mark.parametrize("p", [Cloak(shallow=2.0), Direct(), Softplus(0.1)])
def test_dtype_follows_the_input(p):
    rho = torch.linspace(-3.0, 3.0, 13, dtype=F64)
    std64 = p(rho)
    assert std64.dtype == F64 and p.derivative(rho).dtype == F64 and p.inverse(std64).dtype == F64
    std16 = p(rho.to(torch.bfloat16))
    assert std16.dtype == torch.bfloat16
    torch.testing.assert_close(std16.double(), std64, rtol=2e-2, atol=1e-3)
    assert p.derivative(rho.to(torch.bfloat16)).dtype == torch.bfloat16
    back = p.inverse(std16)
    assert back.dtype == torch.bfloat16 and torch.all(torch.isfinite(back))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "p",
    [Cloak(), Cloak((0.5, 3.0), shallow=0.25), Direct((0.0, 1.0)), Softplus(), Softplus(0.3)],
)
def test_config_round_trip_through_json(p):
    config = json.loads(json.dumps(p.to_config()))
    assert config["type"] == type(p).__name__
    rebuilt = parameterization_from_config(config)
    assert type(rebuilt) is type(p)
    assert rebuilt.to_config() == p.to_config()
    rho = torch.linspace(-6, 6, 13)
    torch.testing.assert_close(rebuilt(rho), p(rho), rtol=0, atol=0)


def test_config_contents():
    assert Cloak((0.5, 3.0), shallow=2.0).to_config() == {
        "type": "CloakStandardDeviationParameterization",
        "scale": [0.5, 3.0],
        "shallow": 2.0,
    }
    assert Softplus(0.5).to_config() == {
        "type": "SoftplusStandardDeviationParameterization",
        "min_scale": 0.5,
    }


def test_from_config_errors():
    with pytest.raises(ValueError) as info:
        parameterization_from_config({"type": "Nope"})
    message = str(info.value)
    assert "'Nope'" in message
    for name in ("Cloak", "Direct", "Softplus"):
        assert f"{name}StandardDeviationParameterization" in message
    with pytest.raises(ValueError, match="None"):
        parameterization_from_config({"scale": [0.1, 1.0]})
    with pytest.raises(ValueError, match=r"\['sharpness'\]"):
        parameterization_from_config(
            {"type": "CloakStandardDeviationParameterization", "sharpness": 2.0}
        )
    with pytest.raises(TypeError, match="mapping"):
        parameterization_from_config("CloakStandardDeviationParameterization")
    with pytest.raises(ValueError, match="shallow"):
        parameterization_from_config(
            {"type": "CloakStandardDeviationParameterization", "shallow": -1.0}
        )


def test_register_custom_parameterization(monkeypatch):
    monkeypatch.setattr(params_module, "_REGISTRY", dict(params_module._REGISTRY))

    @register_parameterization
    class Exp(StandardDeviationParameterization):
        def forward(self, rhos):
            return rhos.exp()

        def inverse(self, std):
            return std.log()

    assert isinstance(parameterization_from_config(Exp().to_config()), Exp)

    class CloakStandardDeviationParameterization(Exp):  # same name, different class
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_parameterization(CloakStandardDeviationParameterization)
    with pytest.raises(TypeError, match="abstract"):
        register_parameterization(ScaledStandardDeviationParameterization)
    with pytest.raises(TypeError, match="subclass"):
        register_parameterization(torch.nn.Linear)


def test_repr_shows_settings():
    assert "scale=(0.5, 3.0), shallow=2.0" in repr(Cloak((0.5, 3.0), shallow=2.0))
    assert "min_scale=0.1" in repr(Softplus(0.1))
