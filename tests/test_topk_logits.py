"""kdfast.topk_logits against a float64 plain-PyTorch reference written from the definition
(stable descending sort, full-vocabulary log_softmax): every dtype, awkward shapes, ties,
degenerate rows, views, temperatures, int32 / int64 indices, gradients. CPU always, CUDA
when present (the ``device`` fixture)."""

from __future__ import annotations

import pytest
import torch
from topk_sample_helpers import INF, NAN, check_topk, ref_topk

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def logits(shape, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((3, 7), 3), ((4, 7), 7), ((2, 3, 37), 5), ((5, 1000), 64),
                                     ((2, 4099), 1), ((3, 513), 513), ((2, 16), 16)])
def test_matches_reference(device, dtype, shape, k):
    x = logits(shape, dtype, device)
    check_topk(x, k)
    check_topk(x, k, temperature=0.37)
    check_topk(x, k, temperature=4.0, index_dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_follow_the_ordering_rule(device, dtype):
    # few distinct values: many ties at and around the k-th; lower index first
    x = torch.randint(-3, 3, (6, 300), generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    for k in (1, 7, 64, 200, 300):
        check_topk(x, k)
    # -0.0 and +0.0 are equal
    z = torch.tensor([[0.0, -0.0, -1.0, 0.0, -0.0, 1.0]], dtype=dtype, device=device)
    idx, _ = kdfast.topk_logits(z, 5)
    assert idx.tolist() == [[5, 0, 1, 3, 4]]


def test_large_vocabulary_few_rows(device):
    x = logits((2, 128000), torch.float32, device, seed=1)
    check_topk(x, 64, temperature=2.0)
    check_topk(x.to(torch.bfloat16), 4096)


@pytest.mark.parametrize("k", [1, 50, 1000])
def test_rows_that_raise_the_threshold_often(device, k):
    """An increasing row makes every element a new candidate (the buffer is cut again and
    again); a decreasing one rejects almost all; equal rows keep the first k."""
    ramp = (torch.arange(6000, dtype=torch.float32, device=device) / 7).repeat(2, 1)
    check_topk(ramp, k)
    check_topk(ramp.flip(-1), k)
    check_topk(torch.zeros(2, 3000, device=device), k)
    check_topk(torch.full((2, 3000), -INF, device=device), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_with_many_blocks(device, dtype):
    """V / 256 >= k: the k-th largest block maximum is a first threshold on CPU. Edge cases:
    it is -inf (few finite entries), 0 (where -0.0 and +0.0 are equal values but not keys),
    ties at it, NaN rows, and denormals flushed to zero (DAZ) while it is 0."""
    V = 40000
    x = torch.full((6, V), -INF, dtype=torch.float64)
    x[0, torch.randperm(V, generator=torch.Generator().manual_seed(1))[:10]] = 1.5  # 10 finite, k = 64
    x[1] = -torch.rand(V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[1, ::300] = 0.0
    x[1, 7::600] = -0.0                                          # floor 0: both zeros are candidates
    x[2] = torch.randint(0, 4, (V,), generator=torch.Generator().manual_seed(3)).double()  # ties
    x[3] = logits((V,), torch.float64, scale=3.0, seed=4)
    x[4] = x[3]
    x[4, 777] = NAN
    x[5] = x[3].flip(0)
    x = x.to(dtype).to(device)
    for k in (1, 64, 156, 1000):  # k > 157 blocks: the lane maxima
        check_topk(x, k)
    if device == "cpu" and torch.set_flush_denormal(True):
        try:
            check_topk(x[1:2], 64)
        finally:
            torch.set_flush_denormal(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_degenerate_rows(device, dtype):
    x = logits((7, 50), dtype, device)
    x[0] = -INF                      # no distribution: logprobs -inf, indices 0..k-1
    x[1, 10:] = -INF                 # k beyond the finite entries: -inf logprobs after them
    x[2, 3] = NAN                    # NaN ranks first; logprobs NaN
    x[3, [4, 9]] = NAN
    x[4, 8] = INF                    # +inf: logprobs NaN
    x[5, 20] = -INF
    check_topk(x, 12)
    idx, lp = kdfast.topk_logits(x, 12)
    assert idx[0].tolist() == list(range(12)) and (lp[0] == -INF).all()
    assert idx[2, 0] == 3 and idx[3, :2].tolist() == [4, 9] and torch.isnan(lp[2:5]).all()
    assert (lp[1, :10] > -INF).all() and (lp[1, 10:] == -INF).all()
    assert idx[4, 0] == 8


def test_logprobs_are_full_vocabulary(device):
    x = logits((4, 300), torch.float32, device)
    _, lp = kdfast.topk_logits(x, 300)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, device=device), rtol=0, atol=1e-5)
    _, lp10 = kdfast.topk_logits(x, 10, temperature=2.0)
    assert (lp10.exp().sum(-1) < 1).all()


def test_extreme_logits(device):
    # huge magnitudes: the max shift keeps them exact; tiny temperature: one-hot
    x = torch.tensor([[1e30, -1e30, 3e29, 0.0], [1.0, 1.0 + 1e-6, 1.0 - 1e-6, -5.0]], device=device)
    check_topk(x, 4)
    check_topk(x, 2, temperature=1e-3)
    check_topk(x * 1e-30, 3, temperature=1e-30)


@pytest.mark.parametrize("view", ["transposed", "rows_sliced", "vocab_sliced", "strided_rows", "3d_permuted",
                                  "element_offset", "expanded"])
def test_views(device, view):
    base = logits((40, 33), torch.float32, device)
    if view == "transposed":
        x = base.t()  # [33, 40], vocabulary stride 33
    elif view == "rows_sliced":
        x = base[3:-2]
    elif view == "vocab_sliced":
        x = base[:, 1:-3]
    elif view == "strided_rows":
        x = base[::3]
    elif view == "3d_permuted":
        x = base.reshape(4, 10, 33).permute(1, 0, 2)[:, 1:]
    elif view == "element_offset":
        x = base.reshape(-1)[1:1 + 39 * 33].view(39, 33)
    else:
        x = base[:1].expand(5, 33)
    check_topk(x, 9)


def test_empty_batch(device):
    idx, lp = kdfast.topk_logits(torch.empty(0, 3, 10, device=device), 4)
    assert idx.shape == (0, 3, 4) and lp.shape == (0, 3, 4)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=DTYPE_IDS[:3])
def test_gradient_matches_reference(device, dtype):
    x = logits((3, 2, 57), dtype, device).requires_grad_(True)
    _, lp = kdfast.topk_logits(x, 9, temperature=1.7)
    g = torch.randn(lp.shape, device=device)
    (lp * g).sum().backward()
    xr = x.detach().double().requires_grad_(True)
    lr = torch.log_softmax(xr / 1.7, dim=-1).gather(-1, ref_topk(x.detach().cpu(), 9)[0].to(device))
    (lr * g.double()).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol)


def test_gradient_of_degenerate_rows(device):
    x = logits((3, 20), torch.float32, device)
    x[0] = -INF  # no distribution: zero gradient
    x[1, :5] = -INF
    x.requires_grad_(True)
    _, lp = kdfast.topk_logits(x, 3)
    lp.sum().backward()
    assert (x.grad[0] == 0).all() and torch.isfinite(x.grad).all()
    assert (x.grad[1, :5] == 0).all() and (x.grad[1, 5:] != 0).any()
    y = logits((2, 20), torch.float32, device)
    y[1, 4] = NAN  # NaN in, NaN out
    y.requires_grad_(True)
    _, lp = kdfast.topk_logits(y, 3)
    lp.sum().backward()
    assert torch.isnan(y.grad[1]).all() and torch.isfinite(y.grad[0]).all()


def test_indices_need_no_gradient(device):
    x = logits((2, 30), torch.float32, device).requires_grad_(True)
    idx, lp = kdfast.topk_logits(x, 4)
    assert not idx.requires_grad and lp.requires_grad
    with torch.no_grad():
        _, lp2 = kdfast.topk_logits(x, 4)
    assert not lp2.requires_grad
