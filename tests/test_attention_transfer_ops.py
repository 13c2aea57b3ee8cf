"""The kdfast::attention_transfer_fused / attention_transfer_backward ops: opcheck,
gradcheck in float64, torch.compile(fullgraph=True), the op outputs (loss, per-sample
statistics, gradients) against the formula, memory, and a CUDA graph capture."""

from __future__ import annotations

import pytest
import torch
from at_helpers import assert_grad_close, assert_loss_close, feature_map, ref_loss_and_grads

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension", "fresh_dynamo")


def _op_samples(device):
    """attention_transfer_fused arguments: (student, teacher, p, student_rg, teacher_rg)."""
    s = feature_map((2, 5, 7, 3), device=device).requires_grad_(True)
    t = feature_map((2, 3, 7, 3), device=device).requires_grad_(True)
    s_cl = feature_map((3, 6, 4, 5), device=device, channels_last=True).requires_grad_(True)
    t_bf = feature_map((3, 9, 4, 5), dtype=torch.bfloat16, device=device)
    s_nc = feature_map((2, 8, 6, 6), device=device)[:, ::2].requires_grad_(True)
    t_nc = feature_map((2, 4, 6, 6), device=device).transpose(2, 3)
    s_h = feature_map((2, 4, 1, 1), dtype=torch.float16, device=device).requires_grad_(True)
    t_h = feature_map((2, 2, 1, 1), dtype=torch.float16, device=device)
    return [
        (s, t, 2.0, True, True),
        (s, t.detach(), 2.5, True, False),
        (s.detach(), t, 1.0, False, True),
        (s.detach(), t.detach(), 3.0, False, False),
        (s_cl, t_bf, 2.0, True, False),
        (s_cl, t_bf, 2.5, True, False),
        (s_nc, t_nc, 2.0, True, False),
        (s_h, t_h, 2.0, True, False),
    ]


def test_opcheck_fused(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.kdfast.attention_transfer_fused.default, args)


def test_opcheck_backward(device):
    for s, t, p, _, _ in _op_samples(device):
        with torch.no_grad():
            _, stats, _, _ = torch.ops.kdfast.attention_transfer_fused(s, t, p, False, False)
        grad_loss = torch.tensor(1.7, dtype=stats.dtype, device=device)
        for need_s, need_t in ((True, False), (False, True), (True, True)):
            torch.library.opcheck(torch.ops.kdfast.attention_transfer_backward.default,
                                  (grad_loss, s.detach(), t.detach(), stats, p, need_s, need_t))


@pytest.mark.parametrize("p", (1.0, 2.0, 3.0, 2.5))
def test_gradcheck(device, p):
    s = feature_map((2, 3, 4, 3), dtype=torch.float64, device=device).requires_grad_(True)
    t = feature_map((2, 5, 4, 3), dtype=torch.float64, device=device).requires_grad_(True)
    fn = lambda a, b: kdfast.attention_transfer_loss(a, b, p=p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-8)
    s_cl = s.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (s_cl, t.detach()), eps=1e-6, atol=1e-8)
    pairs = lambda a, b, c: kdfast.attention_transfer_loss([a, c], [b, b], p=p)  # noqa: E731
    c = feature_map((2, 2, 4, 3), dtype=torch.float64, device=device).requires_grad_(True)
    assert torch.autograd.gradcheck(pairs, (s, t, c), eps=1e-6, atol=1e-8)


def test_fused_op_outputs(device):
    s = feature_map((3, 7, 5, 6), device=device)
    t = feature_map((3, 4, 5, 6), device=device)
    s[1].zero_()
    p = 2.5
    loss, stats, gs, gt = torch.ops.kdfast.attention_transfer_fused(s, t, p, True, True)
    assert loss.shape == () and loss.dtype == torch.float32
    assert stats.shape == (3, 5) and stats.dtype == torch.float32
    assert gs.shape == s.shape and gt.shape == t.shape
    # The statistics from the formula, float64.
    maps_s = s.double().abs().pow(p).mean(1).flatten(1)
    maps_t = t.double().abs().pow(p).mean(1).flatten(1)
    norm_s, norm_t = maps_s.norm(dim=1), maps_t.norm(dim=1)
    a_s = maps_s / norm_s.clamp(min=1e-12)[:, None]
    a_t = maps_t / norm_t.clamp(min=1e-12)[:, None]
    d = a_s - a_t
    expected = torch.stack([norm_s, norm_t, (a_s * d).sum(1), (a_t * d).sum(1), (d * d).sum(1)], 1)
    torch.testing.assert_close(stats.double().cpu(), expected.cpu(), rtol=2e-5, atol=1e-6)
    ref, ref_gs, ref_gt = ref_loss_and_grads(s, t, p, teacher_grad=True)
    assert_loss_close(loss, ref, 30)
    assert_grad_close(gs, ref_gs, "grad_student")
    assert_grad_close(gt, ref_gt, "grad_teacher")
    # No gradient asked: empty tensors, the same loss and statistics.
    loss2, stats2, gs2, gt2 = torch.ops.kdfast.attention_transfer_fused(s, t, p, False, False)
    assert gs2.numel() == 0 and gt2.numel() == 0
    assert torch.equal(loss2, loss) and torch.equal(stats2, stats)


@pytest.mark.parametrize("channels_last", (False, True))
def test_backward_op_is_the_kept_gradient_scaled(device, channels_last):
    s = feature_map((2, 9, 6, 5), device=device, channels_last=channels_last)
    t = feature_map((2, 4, 6, 5), device=device)
    for p in (1.0, 2.0, 2.5):
        _, stats, gs, gt = torch.ops.kdfast.attention_transfer_fused(s, t, p, True, True)
        w = torch.tensor(-2.5, device=device)
        bs, bt = torch.ops.kdfast.attention_transfer_backward(w, s, t, stats, p, True, True)
        assert bs.stride() == gs.stride() and bt.stride() == gt.stride()
        torch.testing.assert_close(bs, gs * -2.5, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(bt, gt * -2.5, rtol=1e-6, atol=1e-12)
        bs1, bt1 = torch.ops.kdfast.attention_transfer_backward(torch.tensor(1.0, device=device), s, t,
                                                                stats, p, True, False)
        assert torch.equal(bs1, gs) and bt1.numel() == 0


@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compile_fullgraph(device, backend):
    s0 = feature_map((2, 6, 5, 7), device=device)
    t0 = feature_map((2, 3, 5, 7), device=device)
    s1 = feature_map((2, 4, 3, 3), device=device)
    t1 = feature_map((2, 8, 3, 3), device=device)

    def step(a, b, c, d):
        loss = kdfast.attention_transfer_loss([a, c], [b, d], p=2.5)
        return loss * 3.0

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for _ in range(2):
        leaves = [x.clone().requires_grad_(True) for x in (s0, t0, s1, t1)]
        out = compiled(*leaves)
        out.backward()
        ref, ref_gs, ref_gt = ref_loss_and_grads([s0, s1], [t0, t1], 2.5, grad_output=3.0,
                                                 teacher_grad=True)
        assert_loss_close(out / 3.0, ref, 9, "compiled loss")
        assert_grad_close(leaves[0].grad, ref_gs[0], "compiled grad s0")
        assert_grad_close(leaves[2].grad, ref_gs[1], "compiled grad s1")
        assert_grad_close(leaves[1].grad, ref_gt[0], "compiled grad t0")
        assert_grad_close(leaves[3].grad, ref_gt[1], "compiled grad t1")


def test_compile_module_with_backward_inside(device):
    crit = kdfast.AttentionTransferLoss(p=2.0)
    s0 = feature_map((2, 6, 5, 7), device=device, channels_last=True)
    t0 = feature_map((2, 3, 5, 7), device=device)

    def step(a, b):
        loss = crit(a, b)
        (loss * 0.5).backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        s = s0.clone().requires_grad_(True)
        out = compiled(s, t0)
    ref, ref_gs, _ = ref_loss_and_grads(s0, t0, 2.0, grad_output=0.5)
    assert_loss_close(out, ref, 35)
    assert_grad_close(s.grad, ref_gs, "grad_student")


def test_peak_memory_of_forward_backward():
    """One forward + backward allocates about the gradient it returns (kept, scaled in
    place, adopted as .grad), for NCHW and channels_last inputs."""
    from kdfast.bench.harness import peak_extra_memory

    for channels_last in (False, True):
        s = feature_map((8, 64, 32, 32), channels_last=channels_last).requires_grad_(True)
        t = feature_map((8, 128, 32, 32))

        def reset(s=s):
            s.grad = None

        def step(s=s, t=t):
            (kdfast.attention_transfer_loss(s, t) * 2.0).backward()

        step()
        extra = peak_extra_memory(step, device="cpu", reset=reset)
        grad_bytes = s.numel() * s.element_size()
        assert grad_bytes <= extra <= 1.05 * grad_bytes, (channels_last, extra, grad_bytes)
        assert s.grad.is_contiguous(memory_format=torch.channels_last if channels_last
                                    else torch.contiguous_format)


def test_cuda_graph_capture(device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    s = feature_map((4, 32, 14, 14), device=device)
    t = feature_map((4, 64, 14, 14), device=device, channels_last=True)
    op = torch.ops.kdfast.attention_transfer_fused
    back = torch.ops.kdfast.attention_transfer_backward
    grad_loss = torch.tensor(0.5, device=device)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(s, t, 2.0, True, True)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, stats, gs, gt = op(s, t, 2.0, True, True)
        bs, bt = back(grad_loss, s, t, stats, 2.0, True, True)
    s.copy_(feature_map(s.shape, device=device))
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_gs, ref_gt = ref_loss_and_grads(s, t, 2.0, teacher_grad=True)
    assert_loss_close(loss, ref, 196)
    assert_grad_close(gs, ref_gs, "grad_student")
    assert_grad_close(gt, ref_gt, "grad_teacher")
    assert_grad_close(bs, 0.5 * ref_gs, "backward grad_student")
    assert_grad_close(bt, 0.5 * ref_gt, "backward grad_teacher")
