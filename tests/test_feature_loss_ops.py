"""The kdfast::feature_loss_fused / feature_loss_backward ops: torch.library.opcheck,
torch.autograd.gradcheck in float64, torch.compile(fullgraph=True), the outputs of the
ops, and the kept-gradient backward (which op runs when, retain_graph, grad_output != 1,
per-row weights, the recomputed float16 gradient), and CUDA-graph capture on GPUs."""

from __future__ import annotations

import pytest
import torch
from feature_helpers import (
    KINDS,
    REDUCTIONS,
    assert_grad_close,
    assert_loss_close,
    check_feature,
    features,
    random_mask,
    ref_feature_loss,
    ref_loss_and_grads,
)

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension", "fresh_dynamo")

KIND_CODE = {name: i for i, name in enumerate(KINDS)}
RED_CODE = {name: i for i, name in enumerate(REDUCTIONS)}
FUSED = "kdfast::feature_loss_fused"
BACKWARD = "kdfast::feature_loss_backward"
SCALE = "kdfast::kd_loss_scale_grad_"


def profiled_kdfast_ops(fn) -> list[str]:
    """Names of the kdfast ops that ``fn`` runs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("kdfast::")]


def _op_samples(device):
    """feature_loss_fused arguments: (student, teacher, mask, kind, normalize, reduction,
    student_requires_grad, teacher_requires_grad)."""
    out = []
    for kind in range(4):
        s = features((5, 17), device=device).requires_grad_(True)
        t = features((5, 17), device=device).requires_grad_(True)
        m = random_mask((5,), device)
        out.append((s, t, m, kind, True, 0, True, True))
        out.append((s, t.detach(), None, kind, False, 1, True, False))
        out.append((s.detach(), t, m, kind, kind % 2 == 0, 2, False, True))
        out.append((s.detach(), t.detach(), None, kind, True, 0, False, False))
    s3 = features((2, 3, 9), torch.bfloat16, device).requires_grad_(True)
    t3 = features((2, 3, 9), torch.float32, device)
    out.append((s3, t3, random_mask((2, 3), device), 3, True, 2, True, False))
    s4 = features((9, 6), device=device).t().requires_grad_(True)  # non-contiguous
    t4 = features((6, 9), torch.float16, device)
    out.append((s4, t4, None, 1, True, 0, True, False))
    return out


def test_opcheck_fused(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.kdfast.feature_loss_fused.default, args)


def test_opcheck_backward(device):
    for args in _op_samples(device):
        s, t, m, kind, normalize, reduction, _, _ = args
        with torch.no_grad():
            _, stats, _, _ = torch.ops.kdfast.feature_loss_fused(s, t, m, kind, normalize, reduction,
                                                                 False, False)
        grad_loss = torch.randn(s.shape[:-1], device=device)
        for need_s, need_t in ((True, False), (False, True), (True, True)):
            torch.library.opcheck(
                torch.ops.kdfast.feature_loss_backward.default,
                (grad_loss, s.detach(), t.detach(), m, stats, kind, normalize, need_s, need_t))


@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_fused_op_outputs(device, kind, normalize):
    """Per-row loss, the row sums, and the gradient already times the mean's weight."""
    s, t = features((2, 3, 50), device=device), features((2, 3, 50), device=device)
    m = random_mask((2, 3), device)
    loss, stats, gs, gt = torch.ops.kdfast.feature_loss_fused(s, t, m, KIND_CODE[kind], normalize,
                                                              RED_CODE["none"], True, False)
    assert loss.shape == (2, 3) and loss.dtype == torch.float32
    assert stats.shape == (6, 3) and stats.dtype == torch.float32
    assert gs.shape == s.shape and gt.numel() == 0
    assert_loss_close(loss, ref_feature_loss(s, t, kind=kind, normalize=normalize, mask=m,
                                             reduction="none"), torch.float32)
    selected = m.reshape(6)
    s2, t2 = s.reshape(6, 50).double(), t.reshape(6, 50).double()
    if normalize or kind == "cosine":
        expected = torch.stack([(s2 * s2).sum(-1), (t2 * t2).sum(-1), (s2 * t2).sum(-1)], -1)
        torch.testing.assert_close(stats[selected].double(), expected[selected], rtol=1e-5, atol=1e-5)
    else:
        assert torch.all(stats == 0)
    mean, _, gs_mean, _ = torch.ops.kdfast.feature_loss_fused(s, t, m, KIND_CODE[kind], normalize,
                                                              RED_CODE["mean"], True, False)
    ref_mean, ref_gs, _ = ref_loss_and_grads(s, t, teacher_grad=False, kind=kind, normalize=normalize,
                                             mask=m, reduction="mean")
    assert mean.shape == ()
    assert_loss_close(mean, ref_mean, torch.float32, "mean")
    assert_grad_close(gs_mean, ref_gs, "kept grad_student of the mean")


def test_backward_op_empty_when_not_requested(device):
    s, t = features((4, 20), device=device), features((4, 20), torch.bfloat16, device)
    loss, stats, gs, gt = torch.ops.kdfast.feature_loss_fused(s, t, None, 3, True, 2, False, False)
    assert gs.numel() == 0 and gt.numel() == 0
    gs, gt = torch.ops.kdfast.feature_loss_backward(torch.ones_like(loss), s, t, None, stats, 3, True,
                                                    True, False)
    assert gs.shape == s.shape and gs.dtype == s.dtype and gt.numel() == 0
    gs, gt = torch.ops.kdfast.feature_loss_backward(torch.ones_like(loss), s, t, None, stats, 3, True,
                                                    False, True)
    assert gs.numel() == 0 and gt.shape == t.shape and gt.dtype == torch.bfloat16
    _, ref_gt = ref_loss_and_grads(s, t, kind="cosine", normalize=True, reduction="sum")[1:]
    assert_grad_close(gt, ref_gt, "grad_teacher (bfloat16)")


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(device, kind, normalize, reduction):
    s = features((4, 7), torch.float64, device).requires_grad_(True)
    t = features((4, 7), torch.float64, device).requires_grad_(True)
    m = torch.tensor([True, False, True, True], device=device)

    def fn(student, teacher):
        return kdfast.feature_loss(student, teacher, kind=kind, normalize=normalize, mask=m,
                                   reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_ops_directly_3d(device, kind, normalize):
    s = features((2, 3, 5), torch.float64, device).requires_grad_(True)
    t = features((2, 3, 5), torch.float64, device).requires_grad_(True)

    def fn(student, teacher):
        return torch.ops.kdfast.feature_loss_fused(student, teacher, None, KIND_CODE[kind], normalize,
                                                   RED_CODE["none"], True, True)[0]

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(device, kind):
    """The whole loss (op + reduction + backward) compiles without graph breaks and
    matches eager numbers and the float64 reference."""
    mask = random_mask((6,), device)

    def step(student, teacher):
        return kdfast.feature_loss(student, teacher, kind=kind, normalize=True, mask=mask) * 3.7

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    student, teacher = features((6, 40), device=device), features((6, 40), device=device)
    s_c = student.clone().requires_grad_(True)
    t_c = teacher.clone().requires_grad_(True)
    out_c = compiled(s_c, t_c)
    out_c.backward()
    s_e = student.clone().requires_grad_(True)
    t_e = teacher.clone().requires_grad_(True)
    out_e = step(s_e, t_e)
    out_e.backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_c.grad, s_e.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t_c.grad, t_e.grad, rtol=1e-6, atol=1e-7)
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, grad_output=torch.tensor(3.7), kind=kind,
                                             normalize=True, mask=mask)
    assert_loss_close(out_c / 3.7, ref, torch.float32, "compiled loss")
    assert_grad_close(s_c.grad, ref_gs, "compiled grad_student")
    assert_grad_close(t_c.grad, ref_gt, "compiled grad_teacher")


def test_compile_module_reduction_none_mixed_dtypes(device):
    crit = kdfast.FeatureLoss(kind="smooth_l1", reduction="none")

    def step(student, teacher, weights):
        return (crit(student, teacher) * weights).sum()

    compiled = torch.compile(step, fullgraph=True)
    student = features((3, 5, 33), torch.bfloat16, device)
    teacher = features((3, 5, 33), device=device)
    weights = torch.rand(3, 5, device=device)
    s_c = student.clone().requires_grad_(True)
    compiled(s_c, teacher, weights).backward()
    s_e = student.clone().requires_grad_(True)
    step(s_e, teacher, weights).backward()
    assert s_c.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_c.grad, s_e.grad, rtol=0, atol=0)


def test_compile_float16_recompute(device):
    """float16 student: the backward op runs inside the compiled graph too."""
    def step(student, teacher):
        return kdfast.feature_loss(student, teacher, kind="cosine", normalize=True) * 1024.0

    compiled = torch.compile(step, fullgraph=True)
    student = features((4, 64), torch.float16, device)
    teacher = features((4, 64), device=device)
    s_c = student.clone().requires_grad_(True)
    compiled(s_c, teacher).backward()
    _, ref_gs, _ = ref_loss_and_grads(student, teacher, grad_output=torch.tensor(1024.0),
                                      teacher_grad=False, kind="cosine", normalize=True)
    assert_grad_close(s_c.grad, ref_gs, "compiled float16 grad_student")


def test_compile_dynamic_shapes(device):
    compiled = torch.compile(lambda s, t: kdfast.feature_loss(s, t, kind="l1", reduction="none"),
                             fullgraph=True, dynamic=True)
    for rows, dim in ((3, 17), (5, 17), (4, 29)):
        s, t = features((rows, dim), device=device), features((rows, dim), device=device)
        out = compiled(s, t)
        assert out.shape == (rows,)
        assert_loss_close(out, ref_feature_loss(s, t, kind="l1", reduction="none"), torch.float32)


# ----------------------------------------------------------------------------- kept gradient


@pytest.mark.parametrize("needs", ("student", "teacher", "both"))
def test_first_backward_only_scales_the_kept_gradient(device, needs):
    """Forward: the fused op with the gradient flags; backward: the in-place scaling only
    (no pass over the inputs); no gradient at all under no_grad."""
    student, teacher = features((6, 37), device=device), features((6, 37), device=device)
    s = student.clone().requires_grad_(needs in ("student", "both"))
    t = teacher.clone().requires_grad_(needs in ("teacher", "both"))
    loss = [None]

    def forward():
        loss[0] = kdfast.feature_loss(s, t, kind="cosine", normalize=True)

    assert profiled_kdfast_ops(forward) == [FUSED]
    ops = profiled_kdfast_ops(loss[0].backward)
    assert SCALE in ops and BACKWARD not in ops and FUSED not in ops, ops
    _, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, kind="cosine", normalize=True)
    if s.requires_grad:
        assert_grad_close(s.grad, ref_gs, "grad_student")
    if t.requires_grad:
        assert_grad_close(t.grad, ref_gt, "grad_teacher")


def test_no_gradient_computed_without_autograd(device):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.args = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name() == FUSED:
                self.args.append(args)
            return func(*args, **(kwargs or {}))

    s = features((4, 9), device=device).requires_grad_(True)
    t = features((4, 9), device=device).requires_grad_(True)
    with torch.no_grad(), Recorder() as rec:
        loss = kdfast.feature_loss(s, t, kind="mse", normalize=True, reduction="sum")
    assert len(rec.args) == 1 and rec.args[0][6:] == (False, False), rec.args
    assert not loss.requires_grad
    assert_loss_close(loss, ref_feature_loss(s, t, kind="mse", normalize=True, reduction="sum"),
                      torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_retain_graph_second_backward_doubles(device, kind, reduction):
    student, teacher = features((6, 37), device=device), features((6, 37), device=device)
    m = random_mask((6,), device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = kdfast.feature_loss(s, t, kind=kind, normalize=True, mask=m, reduction=reduction)
    go = torch.rand(loss.shape, device=device) + 0.5
    loss.backward(go, retain_graph=True)
    first_s, first_t = s.grad.clone(), t.grad.clone()
    loss.backward(go)
    _, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, grad_output=go, kind=kind, normalize=True,
                                           mask=m, reduction=reduction)
    assert_grad_close(first_s, ref_gs, "first grad_student")
    assert_grad_close(first_t, ref_gt, "first grad_teacher")
    assert_grad_close(s.grad, 2 * ref_gs, "grad_student after two backwards")
    assert_grad_close(t.grad, 2 * ref_gt, "grad_teacher after two backwards")
    torch.testing.assert_close(s.grad, 2 * first_s, rtol=1e-6, atol=1e-7)


def test_autograd_grad_three_times(device):
    """Each torch.autograd.grad call gets its own tensor; a later call does not change an
    earlier result."""
    student, teacher = features((6, 21), device=device), features((6, 21), device=device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    rows = kdfast.feature_loss(s, t, kind="smooth_l1", reduction="none")
    gos = [torch.rand(6, device=device) for _ in range(3)]
    results = [torch.autograd.grad(rows, (s, t), go, retain_graph=i < 2) for i, go in enumerate(gos)]
    for go, (gs, gt) in zip(gos, results):
        _, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, grad_output=go, kind="smooth_l1",
                                               reduction="none")
        assert_grad_close(gs, ref_gs, "grad_student")
        assert_grad_close(gt, ref_gt, "grad_teacher")
    assert results[0][0].data_ptr() != results[1][0].data_ptr()


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("kind", KINDS)
def test_scalar_grad_output(device, kind, reduction):
    student, teacher = features((5, 4, 19), device=device), features((5, 4, 19), device=device)
    check_feature(student, teacher, grad_output=torch.tensor(-3.7), kind=kind, reduction=reduction,
                  mask=random_mask((5, 4), device))


@pytest.mark.parametrize("kind", KINDS)
def test_per_row_weights(device, kind):
    student, teacher = features((3, 4, 29), device=device), features((3, 4, 29), device=device)
    weights = torch.rand(3, 4, device=device) * 5
    weights.view(-1)[0] = 0.0  # one row weighted 0: exactly zero gradient
    weights.view(-1)[1::2] = 1.0  # rows weighted exactly 1 among the others (left untouched)
    _, gs, gt = check_feature(student, teacher, grad_output=weights, kind=kind, normalize=True,
                              reduction="none")
    assert torch.all(gs[0, 0] == 0) and torch.all(gt[0, 0] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_float16_gradient_is_recomputed(device, kind):
    """A float16 student's gradient is computed in the backward (where a loss scale is
    known), by feature_loss_backward; float16 teacher too."""
    student = features((5, 3, 41), torch.float16, device)
    teacher = features((5, 3, 41), torch.float16, device)
    m = random_mask((5, 3), device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = kdfast.feature_loss(s, t, kind=kind, normalize=True, mask=m)
    ops = profiled_kdfast_ops(lambda: (loss * 1024.0).backward())
    assert BACKWARD in ops and SCALE not in ops, ops
    _, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, grad_output=torch.tensor(1024.0), kind=kind,
                                           normalize=True, mask=m)
    assert_grad_close(s.grad, ref_gs, "float16 grad_student")
    assert_grad_close(t.grad, ref_gt, "float16 grad_teacher")
    check_feature(student, teacher, kind=kind, mask=m, reduction="sum", grad_output=torch.tensor(512.0))
    check_feature(student, teacher, kind=kind, mask=m, reduction="none",
                  grad_output=torch.rand(m.shape, device=device) * 512)


def test_float16_student_with_float32_teacher_keeps_the_teacher_gradient(device):
    """Mixed: the float32 teacher's gradient is kept, the float16 student's recomputed."""
    student = features((4, 30), torch.float16, device)
    teacher = features((4, 30), device=device)
    for kind in KINDS:
        check_feature(student, teacher, kind=kind, normalize=True, grad_output=torch.tensor(8.0))


def test_zero_grad_output_and_loss_used_twice(device):
    student, teacher = features((6, 13), device=device), features((6, 13), device=device)
    for kind in KINDS:
        s = student.clone().requires_grad_(True)
        loss = kdfast.feature_loss(s, teacher, kind=kind)
        (loss * 0.0).backward()
        assert torch.all(s.grad == 0)
        s = student.clone().requires_grad_(True)
        loss = kdfast.feature_loss(s, teacher, kind=kind, normalize=True)
        (loss * 2 + loss * 3).backward()
        _, ref_gs, _ = ref_loss_and_grads(student, teacher, grad_output=torch.tensor(5.0),
                                          teacher_grad=False, kind=kind, normalize=True)
        assert_grad_close(s.grad, ref_gs, f"{kind} grad_student")


def test_student_from_earlier_ops(device):
    """A non-leaf student used by another term too: gradients add up through the graph."""
    student, teacher = features((4, 25), device=device), features((4, 25), device=device)
    w = student.clone().requires_grad_(True)
    x = w * 1.5
    total = kdfast.feature_loss(x, teacher, kind="cosine") + (x**2).sum() * 1e-3
    total.backward()
    _, ref_gs, _ = ref_loss_and_grads(student * 1.5, teacher, teacher_grad=False, kind="cosine")
    assert_grad_close(w.grad, 1.5 * ref_gs + 3e-3 * (student * 1.5).double(), "grad of w")


# ----------------------------------------------------------------------------- CUDA graphs


def test_cuda_graph_capture(device):
    """No host synchronisation: the fused op (with a mask count on the device) and its
    backward capture into a CUDA graph and replay with new inputs."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    s = features((64, 96), device=device).requires_grad_(True)
    t = features((64, 96), device=device)
    m = random_mask((64,), device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        for _ in range(2):
            s.grad = None
            kdfast.feature_loss(s, t, kind="cosine", normalize=True, mask=m).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    s.grad = None
    with torch.cuda.graph(graph):
        loss = kdfast.feature_loss(s, t, kind="cosine", normalize=True, mask=m)
        loss.backward()
    new_s, new_t = features((64, 96), device=device), features((64, 96), device=device)
    with torch.no_grad():
        s.copy_(new_s)
        t.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_gs, _ = ref_loss_and_grads(new_s, new_t, teacher_grad=False, kind="cosine", normalize=True,
                                        mask=m)
    assert_loss_close(loss, ref, torch.float32)
    assert_grad_close(s.grad, ref_gs, "replayed grad_student")


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("case", ("cosine_normalize", "mse_bf16", "cosine_teacher_grad",
                                  "l1_normalize_none_weighted"))
def test_peak_memory_of_forward_backward(case):
    """One forward + backward allocates at most 1.05x the gradient(s) it returns: the
    gradient kept from the forward is handed to .grad, no copy, nothing N x D besides."""
    from kdfast.bench.harness import peak_extra_memory

    n, d = 1024, 4096
    dtype = torch.bfloat16 if case == "mse_bf16" else torch.float32
    kind = case.split("_")[0]
    normalize = "normalize" in case
    reduction = "none" if "none" in case else "mean"
    student = features((n, d), dtype).requires_grad_(True)
    teacher = features((n, d), dtype).requires_grad_(case == "cosine_teacher_grad")
    weights = torch.rand(n)
    leaves = [x for x in (student, teacher) if x.requires_grad]

    def reset():
        for x in leaves:
            x.grad = None

    def step():
        loss = kdfast.feature_loss(student, teacher, kind=kind, normalize=normalize, reduction=reduction)
        loss.backward(weights if reduction == "none" else None)

    step()  # warm up (first-call allocations of the dispatcher and the thread pool)
    extra = peak_extra_memory(step, device="cpu", reset=reset)
    grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
    assert all(x.grad is not None for x in leaves)
    assert grad_bytes <= extra <= 1.05 * grad_bytes, (
        f"{case}: peak extra memory {extra / 2**20:.2f} MiB, gradients {grad_bytes / 2**20:.2f} MiB")


@pytest.mark.parametrize("kind", KINDS)
def test_peak_memory_of_forward_without_gradient(kind):
    """A forward that needs no gradient allocates O(rows), never a gradient-sized buffer."""
    from kdfast.bench.harness import peak_extra_memory

    n, d = 1024, 4096
    student = features((n, d)).requires_grad_(True)
    teacher = features((n, d))

    def step():
        with torch.no_grad():
            return kdfast.feature_loss(student, teacher, kind=kind, normalize=True, reduction="none")

    step()
    extra = peak_extra_memory(step, device="cpu")
    assert extra <= 64 * n + 65536, f"forward allocated {extra / 2**20:.2f} MiB"
