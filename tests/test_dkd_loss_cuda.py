"""dkd_loss on CUDA: forward + backward captured in a CUDA graph and replayed on new
inputs, no host synchronisation, long rows, the CPU kernels' numbers, and out-of-range
labels reported by a device-side assertion. Skips without a GPU and the CUDA kernels
(the device-parametrised tests of the other dkd_loss files cover the rest on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from dkd_helpers import check_dkd, labels_for, logits, ref_dkd_and_grads

import kdfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    for op in ("dkd_loss_fused", "dkd_loss_backward", "kd_loss_scale_grad_"):
        if not kdfast.has_kernel(op, "cuda"):
            return f"kdfast was built without CUDA kernels (kdfast::{op} has no CUDA kernel)"
    return None


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_cuda_reason() is not None,
                                                   reason=_cuda_reason() or "")]


def _inputs(shape, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to("cuda", dtypes[0])
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to("cuda", dtypes[1])
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[1::3] = -100
    return s, t, y.cuda()


@pytest.mark.parametrize("reduction", ("batchmean", "none"))
@pytest.mark.parametrize("dtypes, shape, teacher_grad", [
    ((torch.float32, torch.float32), (8, 1000), False),
    ((torch.bfloat16, torch.bfloat16), (4, 16, 517), True),
    ((torch.bfloat16, torch.float32), (6, 32000), True),
    ((torch.float16, torch.float16), (5, 333), False),  # recomputing backward
], ids=["fp32-8x1000", "bf16-4x16x517-teacher", "bf16_fp32-6x32000-teacher", "fp16-5x333"])
def test_cuda_graph_capture_and_replay(dtypes, shape, teacher_grad, reduction):
    opts = dict(alpha=1.0, beta=8.0, temperature=4.0, reduction=reduction)
    s0, t0, y0 = _inputs(shape, dtypes, seed=0)
    static_s = s0.clone().requires_grad_(True)
    static_t = t0.clone().requires_grad_(teacher_grad)
    static_y = y0.clone()
    static_w = torch.rand(shape[:-1], device="cuda") + 0.5
    leaves = (static_s, static_t) if teacher_grad else (static_s,)

    def step():
        loss = kdfast.dkd_loss(static_s, static_t, static_y, **opts)
        out = (loss * static_w).sum() if reduction == "none" else loss * 1.5
        return loss, torch.autograd.grad(out, leaves)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grads = step()
    for seed in (1, 2):
        s, t, y = _inputs(shape, dtypes, seed=seed)
        with torch.no_grad():
            static_s.copy_(s)
            static_t.copy_(t)
            static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        go = static_w if reduction == "none" else torch.tensor(1.5)
        ref, ref_gs, ref_gt = ref_dkd_and_grads(s, t, y, grad_output=go,
                                                teacher_grad=teacher_grad, **opts)
        torch.testing.assert_close(static_loss.cpu().double(), ref, rtol=2e-5, atol=1e-4)
        for g, ref_g in zip(static_grads, (ref_gs, ref_gt)):
            scale = float(ref_g.abs().max())
            torch.testing.assert_close(g.cpu().double(), ref_g,
                                       rtol=max(1e-4, torch.finfo(g.dtype).eps),
                                       atol=2e-5 * max(scale, 1e-2))


def test_no_host_synchronisation():
    s, t, y = _inputs((6, 1000), (torch.bfloat16, torch.float32), seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("batchmean", "sum", "none"):
            loss = kdfast.dkd_loss(s, t, y, reduction=reduction)
            loss.sum().backward()
            with torch.no_grad():
                kdfast.dkd_loss(s, t, y, reduction=reduction)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(s.grad.float()).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32), (torch.float64, torch.float64)],
                         ids=["fp32", "bf16", "fp16-fp32", "fp64"])
def test_cuda_matches_cpu_kernels(dtypes):
    """Large and odd shapes; the CUDA result against the CPU kernels and the reference."""
    for shape in ((3, 128256), (64, 4099), (1, 2), (2, 3, 31)):
        s, t, y = _inputs(shape, dtypes, seed=7)
        check_dkd(s, t, y, teacher_grad=True, reduction="none")
        gpu = kdfast.dkd_loss(s, t, y, reduction="none").cpu()
        cpu = kdfast.dkd_loss(s.cpu(), t.cpu(), y.cpu(), reduction="none")
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_bitwise_reproducible():
    s, t, y = _inputs((16, 5003), (torch.float32, torch.float32), seed=5)
    s.requires_grad_(True)
    first = kdfast.dkd_loss(s, t, y)
    g1 = torch.autograd.grad(first, s)[0]
    second = kdfast.dkd_loss(s, t, y)
    g2 = torch.autograd.grad(second, s)[0]
    assert torch.equal(first, second) and torch.equal(g1, g2)


def test_certain_teacher_on_cuda():
    s, t = logits((6, 777), device="cuda"), logits((6, 777), device="cuda")
    y = labels_for((6,), 777, device="cuda", ignore_every=0)
    t[torch.arange(6), y] += 300
    check_dkd(s, t, y, teacher_grad=True, temperature=1.0, reduction="none")


_BAD_LABEL_SCRIPT = textwrap.dedent("""
    import torch
    import kdfast
    s = torch.randn(4, 10, device="cuda", requires_grad={requires_grad})
    t = torch.randn(4, 10, device="cuda")
    y = torch.tensor([0, 9, {bad}, -100], device="cuda")
    loss = kdfast.dkd_loss(s, t, y)
    if {requires_grad}:
        loss.backward()
    torch.cuda.synchronize()
    print("NO ERROR", float(loss))
""")


@pytest.mark.parametrize("requires_grad", (False, True), ids=("no_grad", "with_grad"))
@pytest.mark.parametrize("bad", (10, -1, 1000), ids=lambda b: f"label{b}")
def test_out_of_range_label_is_a_device_side_assert(bad, requires_grad):
    """No synchronisation for a label check: a device-side assertion reports it (it poisons
    the CUDA context, so it runs in a subprocess)."""
    code = _BAD_LABEL_SCRIPT.format(bad=bad, requires_grad=requires_grad)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert "NO ERROR" not in proc.stdout, proc.stdout
    assert proc.returncode != 0, (proc.stdout, proc.stderr[-2000:])
    stderr = proc.stderr.lower()
    assert "device-side assert" in stderr or "assertion" in stderr, proc.stderr[-2000:]
