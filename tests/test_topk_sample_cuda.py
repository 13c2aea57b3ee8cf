"""topk_logits and sample_logits on CUDA: captured in a CUDA graph and replayed on new
inputs, no host synchronisation, the CPU kernels' results (top k exactly; the same draws for
the same seed), bitwise reproducible runs, the largest k in float64 (opt-in shared memory),
long rows. Skips without a GPU and the CUDA kernels (the device-parametrised tests of
test_topk_logits.py / test_sample_logits.py cover the rest on CUDA)."""

from __future__ import annotations

import pytest
import torch
from topk_sample_helpers import assert_unbiased, check_sample_structure, check_topk, teacher_probs

import kdfast


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    for op in ("topk_logits", "sample_logits"):
        if not kdfast.has_kernel(op, "cuda"):
            return f"kdfast was built without CUDA kernels (kdfast::{op} has no CUDA kernel)"
    return None


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_cuda_reason() is not None, reason=_cuda_reason() or "")]


def logits(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_capture_and_replay(dtype):
    static_x = logits((64, 5000), dtype).cuda()
    static_seed = torch.tensor(5, dtype=torch.int64, device="cuda")

    def step():
        idx, lp = torch.ops.kdfast.topk_logits(static_x, 32, 2.0, torch.int32)
        sidx, w = torch.ops.kdfast.sample_logits(static_x, 12, 2.0, static_seed, torch.int64)
        return idx, lp, sidx, w

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        x = logits((64, 5000), dtype, seed=seed).cuda()
        with torch.no_grad():
            static_x.copy_(x)
            static_seed.fill_(seed * 11)
        graph.replay()
        torch.cuda.synchronize()
        want = (*torch.ops.kdfast.topk_logits(x, 32, 2.0, torch.int32),
                *torch.ops.kdfast.sample_logits(x, 12, 2.0, static_seed.clone(), torch.int64))
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref)


def test_no_host_synchronisation():
    x = logits((32, 3000)).cuda().requires_grad_(True)
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, lp = kdfast.topk_logits(x, 16, temperature=2.0)
        lp.sum().backward()
        sidx, w = kdfast.sample_logits(x, 12, generator=g)
        sidx2, w2 = kdfast.sample_logits(x, 12)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    check_sample_structure(sidx, w, 12, x)
    check_sample_structure(sidx2, w2, 12, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_cuda_matches_cpu_kernels(dtype):
    x = logits((40, 3001), dtype)
    x[0, :100] = float("-inf")
    x[1] = x[1].round()
    for k in (1, 64, 700):
        ci, cl = kdfast.topk_logits(x, k, temperature=1.5)
        gi, gl = kdfast.topk_logits(x.cuda(), k, temperature=1.5)
        assert torch.equal(gi.cpu(), ci)
        torch.testing.assert_close(gl.cpu(), cl, rtol=1e-5, atol=1e-5)
    seed = torch.tensor(123456789, dtype=torch.int64)
    ci, cw = torch.ops.kdfast.sample_logits(x, 64, 1.5, seed, torch.int64)
    gi, gw = torch.ops.kdfast.sample_logits(x.cuda(), 64, 1.5, seed.cuda(), torch.int64)
    # The same random numbers; a draw moves only when it falls within rounding of a token's
    # boundary (the two devices' exp differ in the last bits): about 1e-7 per draw.
    same = (gi.cpu() == ci).all(-1) & (gw.cpu() == cw).all(-1)
    assert same.float().mean() >= 0.95, same


def test_bitwise_reproducible():
    x = logits((100, 20000), torch.bfloat16).cuda()
    seed = torch.tensor(9, dtype=torch.int64, device="cuda")
    a = torch.ops.kdfast.topk_logits(x, 128, 1.0, torch.int64) + torch.ops.kdfast.sample_logits(
        x, 12, 1.0, seed, torch.int64)
    b = torch.ops.kdfast.topk_logits(x, 128, 1.0, torch.int64) + torch.ops.kdfast.sample_logits(
        x, 12, 1.0, seed, torch.int64)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_largest_k_in_float64():
    x = logits((3, 5000), torch.float64).cuda()
    check_topk(x, 4096, temperature=0.9)
    check_topk(x.round(), 4096)


def test_long_rows_and_many_draws():
    x = logits((4, 300000), torch.bfloat16, scale=2.0).cuda()
    check_topk(x, 1000)
    idx, w = kdfast.sample_logits(x, 4096, generator=torch.Generator(device="cuda").manual_seed(1))
    check_sample_structure(idx, w, 4096, x)
    peaked = logits((1, 300000), torch.float32, seed=3, scale=1.0)
    peaked[0, :50] += 9.0
    many = peaked.cuda().repeat(300, 1)
    idx, w = kdfast.sample_logits(many, 64, generator=torch.Generator(device="cuda").manual_seed(2))
    assert_unbiased(idx, w, 64, teacher_probs(peaked[0]))
