"""The readers' draws made again in the backward (tl_noise.edges.draws): the same values and
gradients as keeping them, and the same random stream afterwards."""

from __future__ import annotations

import pytest
import torch

from tl_noise.edges.draws import add_noise

pytestmark = pytest.mark.tl3


def reference(x, std, seed, chunks, shard):
    """What add_noise replaces: draw with torch.randn, keep eps, let autograd do the rest."""
    g = torch.Generator().manual_seed(seed)
    offset, total = shard
    shape = (total, x.shape[1])
    draws = [torch.randn((*shape, n, x.shape[2]), generator=g) for n in chunks]
    eps = torch.cat([d[offset : offset + x.shape[0]].permute(2, 0, 1, 3) for d in draws])
    return torch.addcmul(x.unsqueeze(0), std[:, None, None, :], eps.to(x.dtype)), g


@pytest.mark.parametrize("chunks, shard", [([5], (0, 3)), ([2, 2, 1], (0, 3)), ([3, 2], (2, 7))])
def test_values_gradients_and_stream_match_keeping_the_draws(chunks, shard):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    std = torch.rand(sum(chunks), 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(chunks), 3, 4, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    out = add_noise(x, std, g, chunks, shard)
    expected, g_ref = reference(x, std, 11, chunks, shard)
    assert torch.equal(out, expected)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=g_ref))  # same stream
    grads = torch.autograd.grad((out * weight).sum(), [x, std])
    grads_ref = torch.autograd.grad((expected * weight).sum(), [x, std])
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_global_generator_is_used_without_one():
    x, std = torch.zeros(2, 3, 4), torch.ones(5, 4, requires_grad=True)
    torch.manual_seed(5)
    out = add_noise(x, std, None, [5])
    torch.manual_seed(5)
    eps = torch.randn((2, 3, 5, 4)).permute(2, 0, 1, 3)
    assert torch.equal(out, eps)
    (grad,) = torch.autograd.grad(out.square().sum(), [std])
    torch.testing.assert_close(grad, (2 * eps * eps).sum((1, 2)))
