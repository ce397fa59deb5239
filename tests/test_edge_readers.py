"""The fused reader groups (tl_noise.edges.readers) against plain autograd: the same values and
gradients as drawing with torch.randn, keeping everything and letting autograd do the rest; the
same random stream afterwards; a data-parallel rank's noise is the single process's rows."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from tl_noise.edges.draws import TokenDraw
from tl_noise.edges.readers import Group, read
from tl_noise.edges.store import BufferPool, WriterStore
from tl_noise.edges.weights import Norm, fold

pytestmark = pytest.mark.tl3

B, P, D, E, R = 3, 4, 6, 2, 5
BLOCKS = [1, 3]  # writers per block


def reference_eps(seed, readers, chunk, shard):
    """torch.randn chunk by chunk over the global tokens, then this process's rows."""
    g = torch.Generator().manual_seed(seed)
    offset, total = shard
    parts = [torch.randn(min(chunk, total * P - a), readers, D, generator=g)
             for a in range(0, total * P, chunk)]  # fmt: skip
    return torch.cat(parts)[offset * P : (offset + B) * P], g


def setup(norm_kind, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(B, P, D, dtype=torch.float64, requires_grad=True)
    writers = sum(BLOCKS)
    sigma = torch.rand(R, writers, dtype=torch.float64, requires_grad=True)
    std = torch.rand(R, D, dtype=torch.float64, requires_grad=True)
    contributions = torch.randn(writers, B, P, D, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(writers, 1, 1, D, dtype=torch.float64)
    w = torch.randn(R, D, E, dtype=torch.float64)
    b = torch.randn(R, E, dtype=torch.float64)
    ln_w, ln_b = torch.rand(D, dtype=torch.float64) + 0.5, torch.randn(D, dtype=torch.float64)
    norm = Norm(norm_kind, ln_w if norm_kind in ("LN", "RMS") else None,
                ln_b if norm_kind == "LN" else None, 1e-5)  # fmt: skip
    return x, sigma, std, contributions, mean, norm, w, b


def expected_out(x, sigma, std, contributions, mean, eps, norm, w, b, project, contract):
    y = x.reshape(B * P, 1, D) + (0 if eps is None else std * eps.double())
    if contract:
        rows = (mean - contributions).reshape(sigma.shape[1], B * P, D)
        y = y + torch.einsum("rw,wtd->trd", sigma, rows)
    if not project:
        return y.view(B, P, R, D)
    if norm.kind in ("LN", "LNPRE"):
        y = F.layer_norm(y, (D,), norm.w, norm.b, norm.eps)
    elif norm.kind in ("RMS", "RMSPRE"):
        y = F.rms_norm(y, (D,), norm.w, norm.eps)
    return (torch.einsum("trd,rde->tre", y, w) + b).view(B, P, R, E)


@pytest.mark.parametrize(
    "norm_kind, project, sample, contract, chunk, shard",
    [
        ("LN", True, True, True, 5, (0, 3)),
        ("LN", True, True, True, 5, (2, 7)),
        ("LNPRE", True, True, True, 12, (1, 4)),
        ("RMS", True, False, True, 7, (0, 3)),
        ("RMSPRE", True, True, False, 3, (0, 3)),
        (None, True, True, True, 4, (0, 3)),
        ("LN", False, True, True, 5, (2, 7)),
        ("LN", False, True, False, 100, (0, 3)),
    ],
)
def test_values_gradients_and_stream_match_plain_autograd(
    norm_kind, project, sample, contract, chunk, shard
):
    x, sigma, std, contributions, mean, norm, w, b = setup(norm_kind)
    store = WriterStore(sum(BLOCKS), x.detach())
    start = 0
    for n in BLOCKS:
        store.write(mean[start : start + n], contributions[start : start + n])
        start += n
    g = torch.Generator().manual_seed(11)
    draw = TokenDraw(g, x.device, B, P, R, D, chunk, shard) if sample else None
    projection = fold(norm, w, b) if project else None
    group = Group(store if contract else None, draw, projection, chunk)
    out = read(x, sigma, std if sample else None, group)
    store.release()

    eps, g_ref = reference_eps(11, R, chunk, shard) if sample else (None, None)
    want = expected_out(x, sigma, std, contributions, mean, eps, norm, w, b, project, contract)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    if sample:
        assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=g_ref))

    weight = torch.randn(out.shape, dtype=torch.float64)
    inputs = [x, sigma, contributions] + ([std] if sample else [])
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    grads_ref = torch.autograd.grad((want * weight).sum(), inputs, allow_unused=True)
    for got, ref in zip(grads, grads_ref, strict=True):
        if ref is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def test_two_groups_accumulate_into_the_stores_gradient():
    """Two readers of overlapping prefixes: the rows' gradient is the sum of both."""
    x, sigma, std, contributions, mean, norm, w, b = setup("LN", seed=3)
    store = WriterStore(sum(BLOCKS), x.detach())
    store.write(mean[:1], contributions[:1])
    first = read(x, sigma[:, :1], None, Group(store, None, None, 4))
    store.write(mean[1:], contributions[1:])
    second = read(x, sigma, None, Group(store, None, fold(norm, w, b), 5))
    store.release()
    loss = first.square().sum() + second.sum()
    rows = (mean - contributions).reshape(4, B * P, D)
    y1 = x.reshape(B * P, 1, D) + torch.einsum("rw,wtd->trd", sigma[:, :1], rows[:1])
    y2 = x.reshape(B * P, 1, D) + torch.einsum("rw,wtd->trd", sigma, rows)
    out2 = torch.einsum("trd,rde->tre", F.layer_norm(y2, (D,), norm.w, norm.b, 1e-5), w) + b
    loss_ref = y1.square().sum() + out2.sum()
    got = torch.autograd.grad(loss, [x, sigma, contributions])
    want = torch.autograd.grad(loss_ref, [x, sigma, contributions])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_the_global_generator_is_used_without_one():
    x = torch.zeros(B, P, D)
    std = torch.ones(R, D, requires_grad=True)
    torch.manual_seed(5)
    draw = TokenDraw(None, x.device, B, P, R, D, chunk=1000)
    out = read(x, torch.zeros(R, 1), std, Group(None, draw, None, 1000))
    torch.manual_seed(5)
    eps = torch.randn(B * P, R, D).view(B, P, R, D)
    assert torch.equal(out, eps)
    (grad,) = torch.autograd.grad(out.square().sum(), [std])
    torch.testing.assert_close(grad, (2 * eps * eps).sum((0, 1)))


def test_the_pool_lends_a_buffer_again_only_once_its_store_is_gone():
    pool, like = BufferPool(), torch.zeros(2, 3, 4)
    first = WriterStore(5, like, pool)
    second = WriterStore(5, like, pool)
    assert first.rows.data_ptr() != second.rows.data_ptr()
    pointer = first.rows.data_ptr()
    del first
    gc.collect()
    assert WriterStore(5, like, pool).rows.data_ptr() == pointer
    assert WriterStore(6, like, pool).rows.shape == (6, 6, 4)  # another shape: a new buffer
