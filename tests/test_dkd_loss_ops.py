"""The kdfast::dkd_loss_fused / dkd_loss_backward ops: torch.library.opcheck,
torch.autograd.gradcheck in float64 (student and teacher, kept and recomputed
gradients), torch.compile(fullgraph=True), which op runs when, the kept-gradient
backward (retain_graph, grad_output != 1, per-row weights, float16 recompute), peak
memory, and the AVX2 / portable CPU kernels in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from dkd_helpers import check_dkd, labels_for, logits, ref_dkd_and_grads
from torch.utils._python_dispatch import TorchDispatchMode

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
FUSED = "kdfast::dkd_loss_fused"
BACKWARD = "kdfast::dkd_loss_backward"
SCALE = "kdfast::kd_loss_scale_grad_"
REDUCTIONS = ("batchmean", "sum", "none")


class OpRecorder(TorchDispatchMode):
    """Records the kdfast ops (name and arguments) that reach the kernels."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("kdfast::"):
            self.calls.append((func.name(), args))
        return func(*args, **(kwargs or {}))


def profiled_kdfast_ops(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("kdfast::")]


def _grad_close(actual, expected, what):
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    rtol = torch.finfo(actual.dtype).eps if actual.dtype in (torch.float16, torch.bfloat16) else 1e-4
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=rtol,
                               atol=2e-5 * max(scale, 1e-2), msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- opcheck


def _op_samples(device):
    """dkd_loss_fused arguments: (student, teacher, labels, alpha, beta, temperature,
    ignore_index, reduction, student_requires_grad, teacher_requires_grad)."""
    out = []
    for reduction in range(3):
        s = logits((5, 17), device=device).requires_grad_(True)
        t = logits((5, 17), device=device).requires_grad_(True)
        y = labels_for((5,), 17, device=device)
        out.append((s, t, y, 1.0, 8.0, 4.0, -100, reduction, True, True))
        out.append((s, t.detach(), y, 0.5, 2.0, 1.0, -100, reduction, True, False))
        out.append((s, t.detach(), y, 0.5, 2.0, 1.0, -100, reduction, False, False))  # recompute
        out.append((s.detach(), t, torch.where(y == -100, 3, y), 0.0, 1.0, 2.0, 3, reduction, False,
                    True))
        out.append((s.detach(), t.detach(), y, 1.0, 8.0, 4.0, -100, reduction, False, False))
    s3 = logits((2, 3, 9), dtype=torch.bfloat16, device=device).requires_grad_(True)
    t3 = logits((2, 3, 9), dtype=torch.float32, device=device)
    out.append((s3, t3, labels_for((2, 3), 9, device=device), 1.0, 8.0, 4.0, -100, 2, True, False))
    s4 = logits((9, 6), device=device).t().requires_grad_(True)  # non-contiguous
    t4 = logits((6, 9), dtype=torch.float16, device=device)
    out.append((s4, t4, labels_for((6,), 9, device=device), 1.0, 2.0, 0.5, -100, 0, True, False))
    s5 = logits((4, 2), dtype=torch.float64, device=device).requires_grad_(True)
    t5 = logits((4, 2), dtype=torch.float64, device=device).requires_grad_(True)
    out.append((s5, t5, torch.tensor([0, 1, -100, 1], device=device), 1.0, 8.0, 4.0, -100, 1,
                True, True))
    return out


def test_opcheck_fused(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.kdfast.dkd_loss_fused.default, args)


def test_opcheck_backward(device):
    for args in _op_samples(device):
        s, t, y, alpha, beta, temperature, ignore, reduction, _, _ = args
        with torch.no_grad():
            _, stats, _, _ = torch.ops.kdfast.dkd_loss_fused(s, t, y, alpha, beta, temperature,
                                                             ignore, reduction, False, False)
        grad_loss = torch.randn(s.shape[:-1], device=device, dtype=stats.dtype)
        for need_s, need_t in ((True, False), (False, True), (True, True)):
            torch.library.opcheck(
                torch.ops.kdfast.dkd_loss_backward.default,
                (grad_loss, s.detach(), t.detach(), y, stats, alpha, beta, temperature, ignore,
                 need_s, need_t))


def test_fused_op_outputs(device):
    """The op's contract: reduced loss, [rows, 8] stats, gradients at an incoming
    gradient of 1 (batchmean's 1 / counted rows included), empty where not requested."""
    s, t = logits((2, 3, 29), device=device), logits((2, 3, 29), device=device)
    y = labels_for((2, 3), 29, device=device)
    for reduction, name in enumerate(REDUCTIONS):
        loss, stats, gs, gt = torch.ops.kdfast.dkd_loss_fused(s, t, y, 1.0, 8.0, 2.0, -100,
                                                              reduction, True, True)
        ref, ref_gs, ref_gt = ref_dkd_and_grads(s, t, y, teacher_grad=True, temperature=2.0,
                                                reduction=name)
        assert stats.shape == (6, 8) and stats.dtype == torch.float32
        torch.testing.assert_close(loss.cpu().double(), ref, rtol=2e-5, atol=1e-5)
        _grad_close(gs, ref_gs, "grad_student")
        _grad_close(gt, ref_gt, "grad_teacher")
        _, _, gs0, gt0 = torch.ops.kdfast.dkd_loss_fused(s, t, y, 1.0, 8.0, 2.0, -100, reduction,
                                                         False, False)
        assert gs0.numel() == 0 and gt0.numel() == 0
        # The recomputing backward from the stats, with the row weights the reduction gives.
        counted = (y != -100).sum()
        weights = torch.ones(y.shape, device=device)
        if name == "batchmean":
            weights = weights / counted
        bs, bt = torch.ops.kdfast.dkd_loss_backward(weights, s, t, y, stats, 1.0, 8.0, 2.0, -100,
                                                    True, True)
        torch.testing.assert_close(bs, gs, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(bt, gt, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_student_and_teacher(device, reduction):
    s = logits((4, 7), dtype=torch.float64, device=device).requires_grad_(True)
    t = logits((4, 7), dtype=torch.float64, device=device).requires_grad_(True)
    y = torch.tensor([0, 6, -100, 3], device=device)

    def fn(s, t):
        return kdfast.dkd_loss(s, t, y, alpha=0.7, beta=2.0, temperature=1.5, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("case", ["3d", "v2", "masked", "student_only", "teacher_only"])
def test_gradcheck_cases(device, case):
    shape = {"3d": (2, 3, 5), "v2": (5, 2)}.get(case, (3, 9))
    s = logits(shape, dtype=torch.float64, device=device)
    t = logits(shape, dtype=torch.float64, device=device)
    y = labels_for(shape[:-1], shape[-1], device=device, ignore_every=4)
    if case == "masked":
        s[:, [1, 4]] = float("-inf")
        t[:, [1, 4]] = float("-inf")
        y = torch.tensor([0, 2, 8], device=device)
    s.requires_grad_(case != "teacher_only")
    t.requires_grad_(case != "student_only")
    inputs = tuple(x for x in (s, t) if x.requires_grad)

    def fn(*xs):
        it = iter(xs)
        a = next(it) if s.requires_grad else s
        b = next(it) if t.requires_grad else t
        return kdfast.dkd_loss(a, b, y, alpha=1.0, beta=3.0, temperature=2.0, reduction="none")

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", range(3))
def test_gradcheck_recomputing_backward(device, reduction):
    """The fused op called without in-forward gradients: the backward is dkd_loss_backward."""
    s = logits((4, 6), dtype=torch.float64, device=device).requires_grad_(True)
    t = logits((4, 6), dtype=torch.float64, device=device).requires_grad_(True)
    y = torch.tensor([5, -100, 0, 2], device=device)

    def fn(s, t):
        return torch.ops.kdfast.dkd_loss_fused(s, t, y, 0.8, 4.0, 3.0, -100, reduction, False,
                                               False)[0]

    assert torch.autograd.gradcheck(fn, (s, t))


# ----------------------------------------------------------------------------- which op runs when


@pytest.mark.parametrize("needs", ("student", "teacher", "both"))
def test_kept_gradient_when_a_gradient_is_needed(device, needs):
    s0, t0 = logits((6, 37), device=device), logits((6, 37), device=device)
    y = labels_for((6,), 37, device=device)
    s = s0.clone().requires_grad_(needs in ("student", "both"))
    t = t0.clone().requires_grad_(needs in ("teacher", "both"))
    with OpRecorder() as rec:
        loss = kdfast.dkd_loss(s, t, y, alpha=0.5, beta=3.0, temperature=2.0, reduction="sum")
    assert [n for n, _ in rec.calls] == [FUSED]
    args = rec.calls[0][1]
    assert tuple(args[3:8]) == (0.5, 3.0, 2.0, -100, 1), args[3:]
    assert (args[8], args[9]) == (s.requires_grad, t.requires_grad)
    ops = profiled_kdfast_ops(loss.backward)
    assert SCALE in ops and BACKWARD not in ops and FUSED not in ops, ops
    _, ref_gs, ref_gt = ref_dkd_and_grads(s0, t0, y, teacher_grad=True, alpha=0.5, beta=3.0,
                                          temperature=2.0, reduction="sum")
    if s.requires_grad:
        _grad_close(s.grad, ref_gs, "grad_student")
    if t.requires_grad:
        _grad_close(t.grad, ref_gt, "grad_teacher")


@pytest.mark.parametrize("why", ("no_grad", "inference_mode", "no_input_requires_grad"))
def test_loss_only_when_no_gradient_is_needed(device, why):
    s, t = logits((4, 20), device=device), logits((4, 20), device=device)
    y = labels_for((4,), 20, device=device)
    s.requires_grad_(why != "no_input_requires_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(why, torch.enable_grad)
    with ctx(), OpRecorder() as rec:
        loss = kdfast.dkd_loss(s, t, y)
    assert [n for n, _ in rec.calls] == [FUSED]
    assert rec.calls[0][1][8:10] == (False, False), "a gradient computed that nobody needs"
    torch.testing.assert_close(loss, kdfast.dkd_loss(s.detach(), t, y), rtol=0, atol=0)


def test_float16_gradient_is_recomputed(device):
    """float16: no kept gradient (it would underflow at scale 1); dkd_loss_backward
    recomputes it in the backward, where the loss scale is known."""
    s0 = logits((4, 300), device=device)
    t0 = logits((4, 300), device=device)
    s0[:, :4] += 12  # most non-target probabilities ~1e-7: tiny gradients
    t0[:, :4] += 12
    y = torch.tensor([0, 1, 2, 3], device=device)
    s = s0.half().requires_grad_(True)
    with OpRecorder() as rec:
        loss = kdfast.dkd_loss(s, t0.half(), y, temperature=1.0)
    assert rec.calls[0][1][8] is False
    scale = 2.0**10  # GradScaler-like, below float16 overflow for the largest entries
    ops = profiled_kdfast_ops(lambda: (loss * scale).backward())
    assert BACKWARD in ops, ops
    _, ref_gs, _ = ref_dkd_and_grads(s0.half(), t0.half(), y, grad_output=torch.tensor(scale),
                                     temperature=1.0)
    normal = ref_gs.abs() >= 1e-3
    assert int(normal.sum()) > 100
    rel = ((s.grad.cpu().double() - ref_gs).abs() / ref_gs.abs())[normal]
    assert float(rel.max()) <= 1e-3


# ----------------------------------------------------------------------------- kept gradient


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_twice_gives_equal_grads(device, reduction):
    s0, t0 = logits((5, 3, 41), device=device), logits((5, 3, 41), device=device)
    y = labels_for((5, 3), 41, device=device)
    s = s0.clone().requires_grad_(True)
    t = t0.clone().requires_grad_(True)
    loss = kdfast.dkd_loss(s, t, y, reduction=reduction)
    go = torch.rand(5, 3, device=device) if reduction == "none" else torch.tensor(1.0, device=device)
    g1 = torch.autograd.grad(loss, (s, t), go, retain_graph=True)
    g2 = torch.autograd.grad(loss, (s, t), go, retain_graph=True)
    loss.backward(go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, g1[0], rtol=0, atol=0)
    torch.testing.assert_close(t.grad, g1[1], rtol=0, atol=0)
    _, ref_gs, ref_gt = ref_dkd_and_grads(s0, t0, y, grad_output=go, teacher_grad=True,
                                          reduction=reduction)
    _grad_close(g1[0], ref_gs, "grad_student")
    _grad_close(g1[1], ref_gt, "grad_teacher")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_output_not_one(device, reduction):
    s, t = logits((6, 50), device=device), logits((6, 50), device=device)
    y = labels_for((6,), 50, device=device)
    go = torch.randn(6, device=device) if reduction == "none" else torch.tensor(-2.5, device=device)
    check_dkd(s, t, y, grad_output=go, teacher_grad=True, reduction=reduction)
    check_dkd(s, t, y, grad_output=torch.zeros_like(go), teacher_grad=True, reduction=reduction)


def test_loss_used_twice_and_accumulation(device):
    s0, t0 = logits((4, 30), device=device), logits((4, 30), device=device)
    y = labels_for((4,), 30, device=device)
    s = s0.clone().requires_grad_(True)
    loss = kdfast.dkd_loss(s, t0, y)
    (loss * 2 + loss.exp() * 0 + loss).backward()
    _, ref_gs, _ = ref_dkd_and_grads(s0, t0, y, grad_output=torch.tensor(3.0))
    _grad_close(s.grad, ref_gs, "loss used twice")
    kdfast.dkd_loss(s, t0, y).backward()  # accumulates into the existing .grad
    _grad_close(s.grad, ref_gs * 4 / 3, "accumulated")


def test_second_backward_without_retain_graph_raises(device):
    s = logits((3, 10), device=device).requires_grad_(True)
    loss = kdfast.dkd_loss(s, logits((3, 10), device=device), labels_for((3,), 10, device=device))
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()


def test_peak_memory_of_forward_backward():
    """One forward + backward allocates about the gradient it returns: the kept gradient
    is scaled in place and handed to .grad, no copy, no [N, V] float32 temporary."""
    from torch.profiler import ProfilerActivity, profile

    n, v = 256, 8192
    student = logits((n, v), dtype=torch.bfloat16).requires_grad_(True)
    teacher = logits((n, v), dtype=torch.bfloat16)
    labels = labels_for((n,), v)

    def step():
        kdfast.dkd_loss(student, teacher, labels).backward()

    step()
    student.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    grad_bytes = student.numel() * student.element_size()
    assert grad_bytes <= peak <= 1.05 * grad_bytes, (peak, grad_bytes)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compile_step_with_backward_inside(device, backend):
    if backend == "inductor" and device == "cpu" and os.environ.get("ATEN_CPU_CAPABILITY"):
        # Seen here: inductor's C++ kernels assume 16-lane vectors (the CPU's AVX-512) while
        # ATen runs the narrower ISA asked for, and scale only every other 8-lane chunk of a
        # plain multiply (kd_loss's compile test fails the same way); aot_eager still runs.
        pytest.skip("inductor CPU codegen with ATEN_CPU_CAPABILITY forcing a narrower ISA")

    def step(student, teacher, labels):
        loss = kdfast.dkd_loss(student, teacher, labels, alpha=0.5, beta=4.0, temperature=2.0)
        (loss * 3.7).backward()
        return loss.detach()

    s0, t0 = logits((6, 40), device=device), logits((6, 40), device=device)
    y = labels_for((6,), 40, device=device)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend=backend)
        results = []
        for _ in range(2):
            s = s0.clone().requires_grad_(True)
            t = t0.clone().requires_grad_(True)
            results.append((compiled(s, t, y), s.grad, t.grad))
    ref, ref_gs, ref_gt = ref_dkd_and_grads(s0, t0, y, grad_output=torch.tensor(3.7),
                                            teacher_grad=True, alpha=0.5, beta=4.0,
                                            temperature=2.0)
    for out, gs, gt in results:
        assert gs is not None and gt is not None
        torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-5, atol=1e-5)
        _grad_close(gs, ref_gs, "compiled grad_student")
        _grad_close(gt, ref_gt, "compiled grad_teacher")


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_module_reduction_none(device):
    crit = kdfast.DKDLoss(alpha=1.0, beta=2.0, temperature=0.5, reduction="none")
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    s0, t0 = logits((3, 4, 21), device=device), logits((3, 4, 21), device=device)
    y = labels_for((3, 4), 21, device=device)
    s = s0.clone().requires_grad_(True)
    rows = compiled(s, t0, y)
    w = torch.rand(3, 4, device=device)
    rows.backward(w, retain_graph=True)
    rows.backward(w)
    _, ref_gs, _ = ref_dkd_and_grads(s0, t0, y, grad_output=2 * w, alpha=1.0, beta=2.0,
                                     temperature=0.5, reduction="none")
    _grad_close(s.grad, ref_gs, "grad_student")


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_float16_recompute(device):
    fn = torch.compile(lambda s, t, y: kdfast.dkd_loss(s, t, y, reduction="sum"),
                       fullgraph=True, backend="aot_eager")
    s0 = logits((5, 33), dtype=torch.float16, device=device)
    t0 = logits((5, 33), dtype=torch.bfloat16, device=device)
    y = labels_for((5,), 33, device=device)
    s = s0.clone().requires_grad_(True)
    fn(s, t0, y).backward()
    _, ref_gs, _ = ref_dkd_and_grads(s0, t0, y, reduction="sum")
    _grad_close(s.grad, ref_gs, "grad_student")


# ----------------------------------------------------------------------------- CPU kernels per ISA

CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import kdfast
    from dkd_helpers import check_dkd, labels_for, logits

    print(kdfast.build_info()["cpu_capability"])
    torch.manual_seed(0)
    cases = [
        ((5, 37), torch.float32, torch.float32, dict(temperature=2.0)),
        ((3, 2049), torch.float32, torch.float32, dict(alpha=0.5, beta=2.0, temperature=0.5)),
        ((2, 4100), torch.float32, torch.float32, dict(reduction="sum")),
        ((2, 3, 301), torch.bfloat16, torch.float32, dict(temperature=4.0, reduction="none")),
        ((4, 129), torch.float16, torch.bfloat16, dict(reduction="none")),
        ((3, 77), torch.float64, torch.float64, dict(alpha=2.0, beta=1.0)),
        ((6, 2), torch.float32, torch.float32, dict()),
        ((4, 3), torch.bfloat16, torch.bfloat16, dict(temperature=1.0)),
    ]
    for i, (shape, s_dtype, t_dtype, options) in enumerate(cases):
        s, t = logits(shape, dtype=s_dtype), logits(shape, dtype=t_dtype)
        labels = labels_for(shape[:-1], shape[-1])
        if shape[-1] > 6:
            s[..., 5] = float("-inf")
            t[..., 5] = float("-inf")
            labels[labels == 5] = 6
            labels.view(-1)[0] = shape[-1] - 1
        check_dkd(s, t, labels, teacher_grad=i % 2 == 0, **options)
        check_dkd(s, t, labels, teacher_grad=i % 2 == 1, **options)
    # A certain teacher (non-target mass far below float32's range), denormals flushed or not.
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        s, t = logits((4, 70)), logits((4, 70))
        y = torch.tensor([0, 15, 16, 69])
        t[torch.arange(4), y] += 150
        check_dkd(s, t, y, teacher_grad=True, temperature=1.0, reduction="none")
    torch.set_flush_denormal(False)
    print("ok")
""")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability):
    built = [c.lower() for c in kdfast.build_info()["cpu_capabilities_built"]]
    if capability not in built:
        pytest.skip(f"kdfast was built without the {capability} CPU kernels ({built})")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tests=TESTS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.split()
    assert lines[0] == capability.upper(), f"kernels in use: {lines[0]}, asked for {capability}"
    assert lines[-1] == "ok"


def test_cpu_kernels_in_use_match_reference():
    """The same cases in this process (AVX-512 where the CPU and build have it)."""
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tests=TESTS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.split()[-1] == "ok"
