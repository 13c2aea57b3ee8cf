"""sparse_kd_loss on CUDA: forward + backward captured in a CUDA graph and replayed on new
inputs, no host synchronisation, long rows, the CPU kernels' numbers, bitwise
reproducibility, and out-of-range labels / teacher indices reported by a device-side
assertion. Skips without a GPU and the CUDA kernels (the device-parametrised tests of the
other sparse_kd files cover the rest on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from sparse_helpers import TAILS, check_sparse, ref_sparse_and_grad, topk_teacher

import kdfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    for op in ("sparse_kd_loss_fused", "sparse_kd_loss_backward", "kd_loss_scale_grad_"):
        if not kdfast.has_kernel(op, "cuda"):
            return f"kdfast was built without CUDA kernels (kdfast::{op} has no CUDA kernel)"
    return None


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_cuda_reason() is not None,
                                                   reason=_cuda_reason() or "")]


def _inputs(shape, k, dtype, seed, values_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to("cuda", dtype)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    idx, val, _ = topk_teacher(shape[:-1], shape[-1], k, teacher=t, dtype=values_dtype, device="cuda")
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[1::3] = -100
    return s, idx, val, y.cuda()


@pytest.mark.parametrize("reduction", ("batchmean", "none"))
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype, shape, k", [
    (torch.float32, (8, 1000), 32),
    (torch.bfloat16, (4, 16, 517), 64),
    (torch.bfloat16, (6, 32000), 64),
    (torch.float16, (5, 333), 10),  # recomputing backward
], ids=["fp32-8x1000", "bf16-4x16x517", "bf16-6x32000", "fp16-5x333"])
def test_cuda_graph_capture_and_replay(dtype, shape, k, tail, reduction):
    opts = dict(alpha=0.3, temperature=2.0, tail=tail, reduction=reduction)
    s0, idx0, val0, y0 = _inputs(shape, k, dtype, seed=0)
    static_s = s0.clone().requires_grad_(True)
    static_idx, static_val, static_y = idx0.clone(), val0.clone(), y0.clone()
    static_w = torch.rand(shape[:-1], device="cuda") + 0.5

    def step():
        loss = kdfast.sparse_kd_loss(static_s, static_idx, static_val, static_y, **opts)
        out = (loss * static_w).sum() if reduction == "none" else loss * 1.5
        return loss, torch.autograd.grad(out, static_s)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    for seed in (1, 2):
        s, idx, val, y = _inputs(shape, k, dtype, seed=seed)
        with torch.no_grad():
            static_s.copy_(s)
            static_idx.copy_(idx)
            static_val.copy_(val)
            static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        go = static_w if reduction == "none" else torch.tensor(1.5)
        ref, ref_gs = ref_sparse_and_grad(s, idx, val, y, grad_output=go, **opts)
        torch.testing.assert_close(static_loss.cpu().double(), ref, rtol=2e-5, atol=1e-4)
        scale = float(ref_gs.abs().max())
        torch.testing.assert_close(static_grad.cpu().double(), ref_gs,
                                   rtol=max(1e-4, torch.finfo(dtype).eps), atol=2e-5 * max(scale, 1e-2))


def test_no_host_synchronisation():
    s, idx, val, y = _inputs((6, 1000), 16, torch.bfloat16, seed=3)
    s.requires_grad_(True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for tail in TAILS:
            for reduction in ("batchmean", "sum", "none"):
                loss = kdfast.sparse_kd_loss(s, idx, val, y, alpha=0.2, tail=tail, reduction=reduction)
                loss.sum().backward()
                with torch.no_grad():
                    kdfast.sparse_kd_loss(s, idx, val, tail=tail, reduction=reduction)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_cuda_matches_cpu_kernels(dtype, tail):
    """Large and odd shapes; the CUDA result against the reference and the CPU kernels."""
    for shape, k in (((3, 128256), 64), ((64, 4099), 100), ((1, 2), 2), ((2, 3, 31), 1), ((4, 700), 700)):
        vdtype = torch.float64 if dtype == torch.float64 else torch.float32
        s, idx, val, y = _inputs(shape, k, dtype, seed=7, values_dtype=vdtype)
        check_sparse(s, idx, val, y, tail=tail, alpha=0.2, temperature=1.5, reduction="none")
        gpu = kdfast.sparse_kd_loss(s, idx, val, y, tail=tail, alpha=0.2, reduction="none").cpu()
        cpu = kdfast.sparse_kd_loss(s.cpu(), idx.cpu(), val.cpu(), y.cpu(), tail=tail, alpha=0.2,
                                    reduction="none")
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_bitwise_reproducible():
    s, idx, val, y = _inputs((16, 5003), 64, torch.float32, seed=5)
    s.requires_grad_(True)
    for tail in TAILS:
        first = kdfast.sparse_kd_loss(s, idx, val, y, tail=tail, alpha=0.1, temperature=2.0)
        g1 = torch.autograd.grad(first, s)[0]
        second = kdfast.sparse_kd_loss(s, idx, val, y, tail=tail, alpha=0.1, temperature=2.0)
        g2 = torch.autograd.grad(second, s)[0]
        assert torch.equal(first, second) and torch.equal(g1, g2)


def test_tiny_student_tail_on_cuda():
    """The student's mass off the support (float64 sums of the same float32 terms) stays
    accurate when it is 1e-11 of the row."""
    s, idx, val, _ = _inputs((4, 4000), 16, torch.float32, seed=9)
    s[torch.arange(4, device="cuda")[:, None], idx] += 30.0
    check_sparse(s, idx, val, None, tail="residual", reduction="none")


_BAD_SCRIPT = textwrap.dedent("""
    import torch
    import kdfast
    s = torch.randn(4, 10, device="cuda", requires_grad={requires_grad})
    idx = torch.tensor([[0, 1], [2, 3], [4, {index}], [6, -1]], device="cuda")
    val = torch.full((4, 2), -1.0, device="cuda")
    y = torch.tensor([0, 9, {label}, -100], device="cuda")
    loss = kdfast.sparse_kd_loss(s, idx, val, y, alpha=0.5)
    if {requires_grad}:
        loss.backward()
    torch.cuda.synchronize()
    print("NO ERROR", float(loss))
""")


@pytest.mark.parametrize("requires_grad", (False, True), ids=("no_grad", "with_grad"))
@pytest.mark.parametrize("which, bad", [("index", 10), ("index", -2), ("label", 10), ("label", -1)],
                         ids=["index10", "index-2", "label10", "label-1"])
def test_out_of_range_is_a_device_side_assert(which, bad, requires_grad):
    """No synchronisation for the checks: a device-side assertion reports a bad teacher
    index or label (it poisons the CUDA context, so it runs in a subprocess)."""
    values = {"index": 5, "label": 3, which: bad}
    code = _BAD_SCRIPT.format(requires_grad=requires_grad, **values)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert "NO ERROR" not in proc.stdout, proc.stdout
    assert proc.returncode != 0, (proc.stdout, proc.stderr[-2000:])
    stderr = proc.stderr.lower()
    assert "device-side assert" in stderr or "assertion" in stderr, proc.stderr[-2000:]
