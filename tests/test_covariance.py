"""tl_noise.noise.covariance: sampling matches Sigma, Kronecker axes, init scale, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_noise.noise.covariance import (
    DiagonalCovariance,
    FactorizedCovariance,
    GaussianNoise,
    KroneckerCovariance,
    LowRankCovariance,
    covariance_from_config,
)


def build(cov: FactorizedCovariance, shape, dtype=torch.float64, **kwargs) -> FactorizedCovariance:
    cov.initialize_parameters(shape, dtype=dtype, **kwargs)
    return cov


# (constructor, shape) pairs; shapes are not square and ranks not full, so a transposed or
# mis-ordered reshape changes the result.
CASES = {
    "factorized_full": (lambda: FactorizedCovariance(), (2, 3)),
    "factorized_over": (lambda: FactorizedCovariance(rank=9), (5,)),
    "low_rank": (lambda: LowRankCovariance(rank=2), (3, 2)),
    "diagonal": (lambda: DiagonalCovariance(), (2, 3)),
    "kronecker_full": (lambda: KroneckerCovariance(), (2, 3)),
    "kronecker_low": (lambda: KroneckerCovariance(input_rank=2, output_rank=1), (3, 2, 2)),
}


def empirical_covariance(samples: torch.Tensor) -> torch.Tensor:
    flat = samples.reshape(samples.shape[0], -1)
    centred = flat - flat.mean(0)
    return centred.mT @ centred / (flat.shape[0] - 1)


@pytest.mark.parametrize("name", CASES)
def test_empirical_covariance_matches_to_dense(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    cov = build(make(), shape)
    n = 200_000
    samples = cov.sample((n,), generator=torch.Generator().manual_seed(1))
    assert samples.shape == (n, *shape)
    dense = cov.to_dense().detach()
    # Entry (i, j) of a Gaussian sample covariance has std sqrt((S_ii S_jj + S_ij^2) / n)
    # <= sqrt(2 / n) * max_p S_pp ~ 0.0032 * max diag; 6 of those bounds the max over <= 144 entries
    # with failure probability ~1e-7 while a wrong factor/reshape shifts entries by O(max diag).
    tolerance = 6 * math.sqrt(2 / n) * dense.diagonal().max()
    assert (empirical_covariance(samples) - dense).abs().max() <= tolerance
    assert samples.mean(0).abs().max() <= 6 * dense.diagonal().max().sqrt() / math.sqrt(n)


def test_kronecker_factor_matmul_equals_explicit_kron():
    torch.manual_seed(3)
    cov = build(KroneckerCovariance(input_rank=2, output_rank=3), (2, 3, 4), split=2)
    a, b = cov.input_factor.detach(), cov.output_factor.detach()
    assert a.shape == (6, 2) and b.shape == (4, 3)
    eps = torch.randn(5, 7, cov.rank, dtype=torch.float64)
    explicit = (eps @ torch.kron(a, b).mT).reshape(5, 7, 2, 3, 4)
    torch.testing.assert_close(cov.factor_matmul(eps).detach(), explicit)
    kron_s = torch.kron(a, b)
    torch.testing.assert_close(cov.to_dense().detach(), kron_s @ kron_s.mT)
    torch.testing.assert_close(cov.to_dense().detach(), torch.kron(a @ a.mT, b @ b.mT))


def test_kronecker_hook_z_input_factor_covers_heads():
    n_heads, d_head = 3, 4
    cov = build(KroneckerCovariance(), (n_heads, d_head))
    with torch.no_grad():
        cov.input_factor.copy_(torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)))
        cov.output_factor.copy_(torch.eye(d_head, dtype=torch.float64))
        cov.output_factor[1, 1] = 0.0
    z = cov.sample((1000,), generator=torch.Generator().manual_seed(0))
    # head 1 is silenced by A, d_head index 1 by B, for every head; head 2 has std 2
    assert (z[:, 1, :] == 0).all() and (z[:, :, 1] == 0).all()
    assert z[:, 2, 0].std() > 1.5 * z[:, 0, 0].std()


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    kind=st.sampled_from(["factorized", "low_rank", "diagonal", "kronecker"]),
    sample_shape=st.lists(st.integers(1, 3), max_size=2),
    data=st.data(),
)
def test_factor_matmul_shape_and_dense_is_psd(dims, kind, sample_shape, data):
    shape, p = tuple(dims), math.prod(dims)
    if kind == "factorized":
        build(cov := FactorizedCovariance(data.draw(st.none() | st.integers(1, 2 * p))), shape)
    elif kind == "low_rank":
        build(cov := LowRankCovariance(data.draw(st.integers(1, p))), shape)
    elif kind == "diagonal":
        build(cov := DiagonalCovariance(), shape)
    else:
        split = data.draw(st.integers(1, len(shape) - 1))
        p_in, p_out = math.prod(shape[:split]), math.prod(shape[split:])
        ranks = (
            data.draw(st.none() | st.integers(1, p_in)),
            data.draw(st.none() | st.integers(1, p_out)),
        )
        build(cov := KroneckerCovariance(*ranks), shape, split=split)
        assert cov.rank == (ranks[0] or p_in) * (ranks[1] or p_out)
    eps = torch.randn(*sample_shape, cov.rank, dtype=torch.float64)
    assert cov.factor_matmul(eps).shape == (*sample_shape, *shape)
    dense = cov.to_dense().detach()
    assert dense.shape == (p, p)
    torch.testing.assert_close(dense, dense.mT)
    assert torch.linalg.eigvalsh(dense).min() >= -1e-9 * max(1.0, dense.abs().max().item())
    # S^T is factor_matmul applied to the identity: an independent route to Sigma = S S^T.
    s_t = cov.factor_matmul(torch.eye(cov.rank, dtype=torch.float64)).reshape(cov.rank, p)
    torch.testing.assert_close(s_t.mT @ s_t, cov.to_dense())


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_reset_parameters_gives_expected_diagonal(name, scale):
    make, shape = CASES[name]
    torch.manual_seed(0)
    cov = build(make(), shape)
    diagonals = []
    for _ in range(2000):
        cov.reset_parameters(scale)
        diagonals.append(cov.to_dense().detach().diagonal().mean())
    # Var(Sigma_pp) <= ~2 s^4 per draw (chi-square with >= 1 dof), so the mean over 2000 resets
    # (and P units) has relative std <= sqrt(2 / 2000) ~ 0.032; 15% is > 4.5 sigma.
    assert torch.stack(diagonals).mean().item() == pytest.approx(scale**2, rel=0.15)


def test_reset_parameters_rejects_bad_scale():
    cov = build(DiagonalCovariance(), (3,))
    for bad in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match=repr(bad).strip("'")):
            cov.reset_parameters(bad)
    cov.reset_parameters(0.0)
    assert (cov.to_dense() == 0).all()


def test_lr_scaling():
    assert build(FactorizedCovariance(), (2, 3)).lr_scaling == {"factor": 1 / 6}
    assert build(FactorizedCovariance(rank=4), (2, 3)).lr_scaling == {"factor": 1 / 4}
    assert build(LowRankCovariance(rank=5), (2, 3)).lr_scaling == {"factor": 1 / 5}
    assert build(DiagonalCovariance(), (2, 3)).lr_scaling == {"scale": 1.0}
    kron = build(KroneckerCovariance(input_rank=2), (4, 3))
    assert kron.lr_scaling == {"input_factor": 1 / 2, "output_factor": 1 / 3}
    assert kron.rank == 6 and kron.num_units == 12 and kron.shape == (4, 3)
    assert set(kron.lr_scaling) == {name for name, _ in kron.named_parameters()}
    noise = GaussianNoise((4, 3), KroneckerCovariance(input_rank=2))
    assert set(noise.lr_scaling) == {name for name, _ in noise.named_parameters()}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FactorizedCovariance(rank=0), "rank must be a positive int or None, got 0"),
        (lambda: FactorizedCovariance(rank=2.5), "got 2.5"),
        (lambda: FactorizedCovariance(rank=True), "got True"),
        (lambda: LowRankCovariance(rank=None), "rank must be a positive int, got None"),
        (lambda: LowRankCovariance(rank=-3), "got -3"),
        (lambda: KroneckerCovariance(input_rank=0), "input_rank .* got 0"),
        (lambda: KroneckerCovariance(output_rank=-2), "output_rank .* got -2"),
    ],
)
def test_constructor_rank_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, shape, kwargs, match",
    [
        (lambda: LowRankCovariance(rank=7), (2, 3), {}, r"rank=7 exceeds .* \(6\)"),
        (lambda: KroneckerCovariance(input_rank=3), (2, 5), {}, r"input_rank=3 exceeds .*\(2\)"),
        (lambda: KroneckerCovariance(output_rank=6), (2, 5), {}, r"output_rank=6 exceeds"),
        (lambda: KroneckerCovariance(), (6,), {}, r"split .* got 1"),
        (lambda: KroneckerCovariance(), (2, 3), {"split": 2}, r"\[1, 1\] .* got 2"),
        (lambda: DiagonalCovariance(), (), {}, r"shape .* got \(\)"),
        (lambda: FactorizedCovariance(), (2, 0), {}, r"got \(2, 0\)"),
        (lambda: FactorizedCovariance(), 4, {}, r"got 4"),
    ],
)
def test_initialize_parameters_validation(make, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make().initialize_parameters(shape, **kwargs)


def test_uninitialised_access_is_a_clear_error():
    cov = KroneckerCovariance(input_rank=2)
    assert not cov.is_initialized
    with pytest.raises(RuntimeError, match="initialize_parameters"):
        _ = cov.rank
    with pytest.raises(RuntimeError, match="initialize_parameters"):
        cov.reset_parameters()


def test_factor_matmul_rejects_wrong_rank():
    cov = build(LowRankCovariance(rank=2), (3,))
    with pytest.raises(ValueError, match=r"rank=2, got shape \(4, 3\)"):
        cov.factor_matmul(torch.zeros(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", CASES)
def test_config_round_trip(name):
    make, shape = CASES[name]
    original = make()
    config = json.loads(json.dumps(original.to_config()))
    rebuilt = covariance_from_config(config)
    assert type(rebuilt) is type(original)
    assert rebuilt.to_config() == original.to_config()
    assert not rebuilt.is_initialized
    build(original, shape)
    build(rebuilt, shape)
    assert rebuilt.rank == original.rank
    assert original.to_config() == config  # initialising does not change the config


def test_config_errors():
    with pytest.raises(ValueError, match="known types: DiagonalCovariance, FactorizedCovariance"):
        covariance_from_config({"type": "FullCovariance"})
    with pytest.raises(ValueError, match="'type' key"):
        covariance_from_config({"rank": 3})
    with pytest.raises(ValueError, match="invalid arguments"):
        covariance_from_config({"type": "DiagonalCovariance", "rank": 3})
    assert covariance_from_config({"type": "LowRankCovariance", "rank": 3}).to_config() == {
        "type": "LowRankCovariance",
        "rank": 3,
    }


@pytest.mark.parametrize("name", CASES)
def test_generator_reproducibility(name):
    make, shape = CASES[name]
    cov = build(make(), shape)
    first = cov.sample((4,), generator=torch.Generator().manual_seed(7))
    again = cov.sample((4,), generator=torch.Generator().manual_seed(7))
    other = cov.sample((4,), generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert cov.sample(dtype=torch.float32).dtype == torch.float32


def test_samples_are_differentiable():
    cov = build(KroneckerCovariance(), (2, 3), dtype=torch.float32)
    cov.sample((5,), dtype=torch.float64).square().sum().backward()
    assert cov.input_factor.grad is not None and cov.output_factor.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CASES)
def test_meta_device_then_to_empty_and_reset(name):
    make, shape = CASES[name]
    with torch.device("meta"):
        noise = GaussianNoise(shape, make())
    assert all(p.is_meta for p in noise.parameters())
    noise.to_empty(device="cpu")
    noise.reset_parameters(0.5)
    assert all(torch.isfinite(p).all() for p in noise.parameters())
    assert (noise.mean == 0).all()
    assert noise.sample((3,)).shape == (3, *shape)
    assert torch.isfinite(noise.to_dense()).all()


def test_gaussian_noise_defaults_and_mean():
    noise = GaussianNoise((2, 3))
    assert isinstance(noise.covariance, DiagonalCovariance)
    assert noise.shape == (2, 3)
    assert dict(noise.named_parameters()).keys() == {"mean", "covariance.scale"}
    frozen = GaussianNoise((2, 3), learn_mean=False)
    assert "mean" in dict(frozen.named_buffers()) and "mean" not in dict(frozen.named_parameters())
    with torch.no_grad():
        noise.mean.fill_(3.0)
        noise.covariance.scale.fill_(0.5)
    samples = noise.sample((50_000,), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (50_000, 2, 3)
    # mean of 50k draws with std 0.5: standard error 0.0022, so 0.02 is ~9 standard errors
    assert (samples.mean(0) - 3.0).abs().max() < 0.02
    torch.testing.assert_close(noise.to_dense(), torch.eye(6) * 0.25)


def test_gaussian_noise_uses_preinitialised_covariance():
    cov = KroneckerCovariance()
    cov.initialize_parameters((2, 3, 4), split=2)
    noise = GaussianNoise((2, 3, 4), cov)
    assert noise.covariance.split == 2 and noise.covariance.input_factor.shape == (6, 6)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\), not \(4, 3, 2\)"):
        GaussianNoise((4, 3, 2), cov)
    with pytest.raises(TypeError, match="FactorizedCovariance"):
        GaussianNoise((2,), covariance="diagonal")
