"""CUDA graph safety of kd_loss: forward + backward captured in a torch.cuda.CUDAGraph
and replayed on new inputs, torch.compile(mode="reduce-overhead") of a training step,
no host synchronisation, and out-of-range labels reported by a device-side assertion
(on CPU: an error naming ``labels``). Results against the float64 reference. The CUDA
tests skip without a GPU and the CUDA kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fp64_reference import ref_loss_and_grads
from kd_helpers import assert_close_fp32, fp32_tolerances

import kdfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    for op in ("kd_loss_fused", "kd_loss_backward", "kd_loss_scale_grad_"):
        if not kdfast.has_kernel(op, "cuda"):
            return f"kdfast was built without CUDA kernels (kdfast::{op} has no CUDA kernel)"
    return None


requires_cuda = pytest.mark.skipif(_cuda_reason() is not None, reason=_cuda_reason() or "")


def _inputs(shape, dtypes, seed, device="cuda", scale=3.0):
    """Fresh (student, teacher, labels) drawn on the CPU from ``seed``; every third row ignored."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtypes[0])
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtypes[1])
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[1::3] = -100
    return s, t, y.to(device)


def _assert_matches_reference(loss, grads, student, teacher, labels, teacher_grad, what,
                              **opts):
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, labels, teacher_grad=teacher_grad,
                                             **opts)
    assert_close_fp32(loss, ref, *fp32_tolerances(opts.get("temperature", 1.0)), f"{what} loss")
    for name, g, ref_g in zip(("grad_student", "grad_teacher"), grads, (ref_gs, ref_gt)):
        assert g is not None, f"{what}: no {name}"
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        scale = float(ref_g.abs().max())
        # float32 math, then one rounding to the gradient's dtype
        assert_close_fp32(g, ref_g, rtol=max(1e-4, torch.finfo(g.dtype).eps),
                          atol=1e-5 * max(scale, 1e-2), what=f"{what} {name}")


GRAPH_CASES = [
    pytest.param("forward_kl", (torch.float32, torch.float32), (8, 1000), 0.3, None, False,
                 "autograd_grad", id="forward_kl-fp32-8x1000-alpha-autograd_grad"),
    pytest.param("reverse_kl", (torch.bfloat16, torch.bfloat16), (4, 16, 517), 0.3, None, True,
                 "backward", id="reverse_kl-bf16-4x16x517-alpha-teacher-backward"),
    pytest.param("jsd", (torch.bfloat16, torch.float32), (6, 4099), 0.0, None, True,
                 "autograd_grad", id="jsd-bf16_fp32-6x4099-teacher-autograd_grad"),
    pytest.param("jsd", (torch.float32, torch.float32), (5, 333), 0.5, 20.0, False,
                 "backward", id="jsd-fp32-5x333-alpha-softcap-backward"),
    pytest.param("forward_kl", (torch.float32, torch.float32), (2, 262147), 0.3, None, True,
                 "autograd_grad", id="forward_kl-fp32-2x262147-split_rows-autograd_grad"),
    pytest.param("jsd", (torch.bfloat16, torch.bfloat16), (2, 262147), 0.3, 30.0, False,
                 "backward", id="jsd-bf16-2x262147-split_rows-softcap-backward"),
]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
@pytest.mark.parametrize("divergence, dtypes, shape, alpha, softcap, teacher_grad, mode",
                         GRAPH_CASES)
def test_cuda_graph_capture_and_replay(divergence, dtypes, shape, alpha, softcap, teacher_grad,
                                       mode, reduction):
    opts = dict(temperature=2.0, alpha=alpha, divergence=divergence, beta=0.4,
                reduction=reduction, softcap=softcap)
    s0, t0, y0 = _inputs(shape, dtypes, seed=0)
    static_s = s0.clone().requires_grad_(True)
    static_t = t0.clone().requires_grad_(teacher_grad)
    static_y = y0.clone()
    static_w = torch.rand(shape[:-1], device="cuda") + 0.5  # per-row weights for "none"
    leaves = (static_s, static_t) if teacher_grad else (static_s,)

    def step():
        loss = kdfast.kd_loss(static_s, static_t, static_y, **opts)
        out = (loss * static_w).sum() if reduction == "none" else loss * 1.5
        if mode == "autograd_grad":
            grads = torch.autograd.grad(out, leaves)
        else:
            out.backward()
            grads = tuple(x.grad for x in leaves)
        return loss, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as the CUDA graph docs do
        for _ in range(3):
            for x in leaves:
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
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
        grad_output = static_w.double() if reduction == "none" else 1.5
        ref_opts = dict(opts, grad_output=grad_output)
        what = f"replay {seed}"
        _assert_matches_reference(static_loss.clone(), [g.clone() for g in static_grads], s, t, y,
                                  teacher_grad, what, **ref_opts)
        # and the same numbers as an eager call on the same inputs
        eager = kdfast.kd_loss(s, t, y, **opts)
        torch.testing.assert_close(static_loss, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "jsd"))
def test_no_host_synchronisation(divergence):
    """Forward and backward of every reduction run with CUDA sync debugging set to error."""
    s, t, y = _inputs((6, 1000), (torch.bfloat16, torch.float32), seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("batchmean", "sum", "none"):
            loss = kdfast.kd_loss(s, t, y, temperature=2.0, alpha=0.3, divergence=divergence,
                                  reduction=reduction, softcap=30.0)
            loss.sum().backward()
            with torch.no_grad():
                kdfast.kd_loss(s, t, y, temperature=2.0, alpha=0.3, divergence=divergence,
                               reduction=reduction)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(s.grad.float()).all() and torch.isfinite(t.grad).all()


@pytest.mark.cuda
@requires_cuda
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("divergence", ("forward_kl", "jsd"))
def test_compile_reduce_overhead_training_step(divergence):
    """A linear student head + kd_loss compiled with CUDA graphs (reduce-overhead), several
    steps with new inputs; loss and parameter gradients against the float64 reference."""
    hidden, vocab, rows = 64, 1031, 24
    head = torch.nn.Linear(hidden, vocab, device="cuda")
    opts = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.4)

    def train_step(x, teacher, labels):
        return kdfast.kd_loss(head(x), teacher, labels, **opts)

    compiled = torch.compile(train_step, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(rows, hidden, generator=g).cuda()
        teacher = (torch.randn(rows, vocab, generator=g) * 3).cuda()
        labels = torch.randint(0, vocab, (rows,), generator=g)
        labels[::5] = -100
        labels = labels.cuda()
        head.zero_grad(set_to_none=True)
        loss = compiled(x, teacher, labels)
        loss.backward()
        loss_value = loss.detach().clone()
        grad_w, grad_b = head.weight.grad.clone(), head.bias.grad.clone()
        # float64 reference through the same head
        w64, b64 = head.weight.detach().double(), head.bias.detach().double()
        student64 = x.double() @ w64.T + b64
        ref, ref_gs, _ = ref_loss_and_grads(student64, teacher, labels, **opts)
        torch.testing.assert_close(loss_value.double(), ref, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, i=step: f"step {i} loss: {m}")
        for name, got, want in (("weight", grad_w, ref_gs.T @ x.double()),
                                ("bias", grad_b, ref_gs.sum(0))):
            scale = float(want.abs().max())
            torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * scale,
                                       msg=lambda m, i=step, n=name: f"step {i} {n}.grad: {m}")
        # the same step in eager mode
        head.zero_grad(set_to_none=True)
        eager = train_step(x, teacher, labels)
        eager.backward()
        torch.testing.assert_close(loss_value, eager.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_w, head.weight.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- out-of-range labels

_BAD_LABEL_SCRIPT = textwrap.dedent("""
    import torch
    import kdfast
    s = torch.randn(4, 10, device="cuda", requires_grad={requires_grad})
    t = torch.randn(4, 10, device="cuda")
    y = torch.tensor([0, 9, {bad}, -100], device="cuda")
    loss = kdfast.kd_loss(s, t, y, alpha=0.5)
    if {requires_grad}:
        loss.backward()
    torch.cuda.synchronize()
    print("NO ERROR", float(loss))
""")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("requires_grad", (False, True), ids=("no_grad", "with_grad"))
@pytest.mark.parametrize("bad", (10, -1, 1000), ids=lambda b: f"label{b}")
def test_out_of_range_label_is_a_device_side_assert(bad, requires_grad):
    """On CUDA the label check cannot synchronise (graph capture): a device-side assertion
    reports it. It poisons the CUDA context, so it runs in a subprocess."""
    code = _BAD_LABEL_SCRIPT.format(bad=bad, requires_grad=requires_grad)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert "NO ERROR" not in proc.stdout, proc.stdout
    assert proc.returncode != 0, (proc.stdout, proc.stderr[-2000:])
    stderr = proc.stderr.lower()
    assert "device-side assert" in stderr or "assertion" in stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("requires_grad", (False, True), ids=("no_grad", "with_grad"))
@pytest.mark.parametrize("bad", (10, -1, 1000), ids=lambda b: f"label{b}")
def test_out_of_range_label_on_cpu_names_labels(bad, requires_grad):
    s = torch.randn(4, 10, requires_grad=requires_grad)
    t = torch.randn(4, 10)
    y = torch.tensor([0, 9, bad, -100])
    with pytest.raises((ValueError, RuntimeError, IndexError), match="labels"):
        kdfast.kd_loss(s, t, y, alpha=0.5)
    with pytest.raises((ValueError, RuntimeError, IndexError), match="labels"):
        kdfast.kd_loss(s, t, y, alpha=0.5, softcap=5.0, divergence="jsd")
