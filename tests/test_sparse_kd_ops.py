"""The kdfast::sparse_kd_loss_fused / sparse_kd_loss_backward ops: torch.library.opcheck,
torch.autograd.gradcheck in float64 (kept and recomputed gradients), torch.compile
(fullgraph=True), which op runs when, the kept-gradient backward (retain_graph,
grad_output != 1, per-row weights, float16 recompute and loss scaling), and peak memory
(no dense teacher, no [N, V] float32 temporary)."""

from __future__ import annotations

import os

import pytest
import torch
from sparse_helpers import (
    REDUCTIONS,
    TAILS,
    VALUES,
    check_sparse,
    labels_for,
    logits,
    random_support,
    ref_sparse,
    ref_sparse_and_grad,
    topk_teacher,
)
from torch.utils._python_dispatch import TorchDispatchMode

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

FUSED = "kdfast::sparse_kd_loss_fused"
BACKWARD = "kdfast::sparse_kd_loss_backward"
SCALE = "kdfast::kd_loss_scale_grad_"


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


def _inputs(device, shape=(5, 37), k=7, dtype=torch.float32, values="logprobs", **kw):
    s = logits(shape, dtype=dtype, device=device)
    idx, val = random_support(shape[:-1], shape[-1], k, values=values, device=device, pad_every=3, **kw)
    return s, idx, val, labels_for(shape[:-1], shape[-1], device=device)


# ----------------------------------------------------------------------------- opcheck


def _op_samples(device):
    """sparse_kd_loss_fused arguments: (student, indices, values, labels, temperature, alpha,
    logprobs, tail, ignore_index, reduction, student_requires_grad)."""
    out = []
    for reduction in range(3):
        for tail in range(2):
            s, idx, val, y = _inputs(device)
            s.requires_grad_(True)
            out.append((s, idx, val, y, 2.0, 0.3, True, tail, -100, reduction, True))
            out.append((s, idx, val.exp(), None, 1.0, 0.0, False, tail, -100, reduction, False))
            out.append((s.detach(), idx.int(), val, y, 0.5, 1.0, True, tail, -100, reduction, False))
    s3 = logits((2, 3, 9), dtype=torch.bfloat16, device=device).requires_grad_(True)
    idx3, val3 = random_support((2, 3), 9, 4, dtype=torch.float16, device=device)
    out.append((s3, idx3, val3, labels_for((2, 3), 9, device=device), 4.0, 0.3, True, 1, -100, 2, True))
    s4 = logits((9, 6), device=device).t().requires_grad_(True)  # non-contiguous
    idx4, val4 = random_support((6,), 9, 6, dtype=torch.bfloat16, device=device)
    out.append((s4, idx4[:, ::2], val4[:, ::2], None, 1.5, 0.0, True, 0, -100, 0, True))
    s5 = logits((4, 2), dtype=torch.float64, device=device).requires_grad_(True)
    idx5, val5 = random_support((4,), 2, 1, dtype=torch.float64, device=device)
    out.append((s5, idx5, val5, torch.tensor([0, 1, -100, 1], device=device), 3.0, 0.5, True, 1, -100, 1,
                True))
    return out


def test_opcheck_fused(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.kdfast.sparse_kd_loss_fused.default, args)


def test_opcheck_backward(device):
    for args in _op_samples(device):
        s, idx, val, y, temperature, alpha, logprobs, tail, ignore, reduction, _ = args
        with torch.no_grad():
            _, stats, _ = torch.ops.kdfast.sparse_kd_loss_fused(s, idx, val, y, temperature, alpha, logprobs,
                                                                tail, ignore, reduction, False)
        grad_loss = torch.randn(s.shape[:-1], device=device, dtype=stats.dtype)
        torch.library.opcheck(torch.ops.kdfast.sparse_kd_loss_backward.default,
                              (grad_loss, s.detach(), idx, val, y, stats, temperature, alpha, logprobs,
                               tail, ignore))


@pytest.mark.parametrize("tail", TAILS)
def test_fused_op_outputs(device, tail):
    """The op's contract: reduced loss, [rows, 7] stats, the gradient at an incoming gradient
    of 1 (batchmean's 1 / counted rows included), empty when not requested; the
    recomputing backward gives the same gradient from the stats."""
    s, idx, val, y = _inputs(device, (2, 3, 29))
    code = TAILS.index(tail)
    for reduction, name in enumerate(REDUCTIONS):
        loss, stats, gs = torch.ops.kdfast.sparse_kd_loss_fused(s, idx, val, y, 2.0, 0.3, True, code, -100,
                                                                reduction, True)
        ref, ref_gs = ref_sparse_and_grad(s, idx, val, y, temperature=2.0, alpha=0.3, tail=tail,
                                          reduction=name)
        assert stats.shape == (6, 7) and stats.dtype == torch.float32
        torch.testing.assert_close(loss.cpu().double(), ref, rtol=2e-5, atol=1e-5)
        _grad_close(gs, ref_gs, "grad_student")
        _, _, gs0 = torch.ops.kdfast.sparse_kd_loss_fused(s, idx, val, y, 2.0, 0.3, True, code, -100,
                                                          reduction, False)
        assert gs0.numel() == 0
        weights = torch.ones(y.shape, device=device)
        if name == "batchmean":
            weights = weights / (y != -100).sum()
        bs = torch.ops.kdfast.sparse_kd_loss_backward(weights, s, idx, val, y, stats, 2.0, 0.3, True, code,
                                                      -100)
        torch.testing.assert_close(bs, gs, rtol=1e-5, atol=1e-7)
    ignored = (y == -100).reshape(-1)
    assert bool((stats[ignored] == 0).all())


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("values", VALUES)
def test_gradcheck(device, values, tail, reduction):
    s = logits((4, 9), dtype=torch.float64, device=device).requires_grad_(True)
    idx, val = random_support((4,), 9, 4, values=values, dtype=torch.float64, device=device, mass=0.7)
    idx[1, 2] = -1
    y = torch.tensor([0, 8, -100, 3], device=device)

    def fn(s):
        return kdfast.sparse_kd_loss(s, idx, val, y, values=values, tail=tail, alpha=0.3,
                                     temperature=1.7, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("case", ["3d", "v1", "full_support", "masked", "int32"])
def test_gradcheck_cases(device, case):
    shape = {"3d": (2, 3, 5), "v1": (3, 1), "full_support": (3, 6)}.get(case, (3, 10))
    k = {"v1": 1, "full_support": 6}.get(case, 3)
    s = logits(shape, dtype=torch.float64, device=device)
    idx, val = random_support(shape[:-1], shape[-1], k, dtype=torch.float64, device=device,
                              index_dtype=torch.int32 if case == "int32" else torch.int64,
                              mass=1.0 if case == "full_support" else 0.6)
    if case == "masked":
        s[:, 0] = float("-inf")
        idx[idx == 0] = -1
    s.requires_grad_(True)
    for tail in TAILS:
        def fn(s, tail=tail):
            return kdfast.sparse_kd_loss(s, idx, val, tail=tail, temperature=2.0, reduction="none")

        assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("tail", (0, 1))
@pytest.mark.parametrize("reduction", range(3))
def test_gradcheck_recomputing_backward(device, reduction, tail):
    """The fused op called without an in-forward gradient: the backward is
    sparse_kd_loss_backward."""
    s = logits((4, 6), dtype=torch.float64, device=device).requires_grad_(True)
    idx, val = random_support((4,), 6, 3, dtype=torch.float64, device=device, mass=0.8)
    y = torch.tensor([5, -100, 0, 2], device=device)

    def fn(s):
        return torch.ops.kdfast.sparse_kd_loss_fused(s, idx, val, y, 3.0, 0.4, True, tail, -100, reduction,
                                                     False)[0]

    assert torch.autograd.gradcheck(fn, (s,))


# ----------------------------------------------------------------------------- which op runs when


def test_kept_gradient_when_the_student_needs_one(device):
    s0, idx, val, y = _inputs(device, (6, 37))
    s = s0.clone().requires_grad_(True)
    with OpRecorder() as rec:
        loss = kdfast.sparse_kd_loss(s, idx, val, y, alpha=0.5, temperature=2.0, tail="residual",
                                     values="logprobs", reduction="sum", ignore_index=-100)
    assert [n for n, _ in rec.calls] == [FUSED]
    args = rec.calls[0][1]
    assert tuple(args[4:11]) == (2.0, 0.5, True, 1, -100, 1, True), args[4:]
    ops = profiled_kdfast_ops(loss.backward)
    assert SCALE in ops and BACKWARD not in ops and FUSED not in ops, ops
    _, ref_gs = ref_sparse_and_grad(s0, idx, val, y, alpha=0.5, temperature=2.0, tail="residual",
                                    reduction="sum")
    _grad_close(s.grad, ref_gs, "grad_student")


@pytest.mark.parametrize("why", ("no_grad", "inference_mode", "no_input_requires_grad",
                                 "only_values_require_grad"))
def test_loss_only_when_no_gradient_is_needed(device, why):
    s, idx, val, y = _inputs(device, (4, 20))
    s.requires_grad_(why in ("no_grad", "inference_mode"))
    val.requires_grad_(why == "only_values_require_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(why, torch.enable_grad)
    with ctx(), OpRecorder() as rec:
        loss = kdfast.sparse_kd_loss(s, idx, val, y)
    assert [n for n, _ in rec.calls] == [FUSED]
    assert rec.calls[0][1][10] is False, "a gradient computed that nobody needs"
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kdfast.sparse_kd_loss(s.detach(), idx, val.detach(), y), rtol=0, atol=0)


def test_float16_gradient_is_recomputed(device):
    """float16: no kept gradient (it would underflow at scale 1); sparse_kd_loss_backward
    recomputes it in the backward, where the loss scale is known."""
    n, v, scale = 4, 2048, 2.0**16
    s0 = logits((n, v), device=device)
    idx, val = random_support((n,), v, 8, device=device, mass=0.9)
    rows = torch.arange(n, device=device)[:, None]
    s0[rows, idx] += 20  # the rest of the probabilities ~1e-9: tiny gradients
    s = s0.half().requires_grad_(True)
    with OpRecorder() as rec:
        loss = kdfast.sparse_kd_loss(s, idx, val, tail="residual", temperature=1.0)
    assert rec.calls[0][1][10] is False
    ops = profiled_kdfast_ops(lambda: (loss * scale).backward())
    assert BACKWARD in ops, ops
    _, ref_gs = ref_sparse_and_grad(s0.half(), idx, val, grad_output=torch.tensor(scale), tail="residual",
                                    temperature=1.0)
    normal = ref_gs.abs() >= 1e-3  # well inside float16's normal range
    assert int(normal.sum()) > 100
    rel = ((s.grad.cpu().double() - ref_gs).abs() / ref_gs.abs())[normal]
    assert float(rel.max()) <= 1e-3, float(rel.max())


# ----------------------------------------------------------------------------- kept gradient


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail", TAILS)
def test_retain_graph_twice_gives_equal_grads(device, tail, reduction):
    s0, idx, val, y = _inputs(device, (5, 3, 41))
    s = s0.clone().requires_grad_(True)
    loss = kdfast.sparse_kd_loss(s, idx, val, y, tail=tail, alpha=0.2, reduction=reduction)
    go = torch.rand(5, 3, device=device) if reduction == "none" else torch.tensor(1.0, device=device)
    (g1,) = torch.autograd.grad(loss, s, go, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s, go, retain_graph=True)
    loss.backward(go)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, g1, rtol=0, atol=0)
    _, ref_gs = ref_sparse_and_grad(s0, idx, val, y, grad_output=go, tail=tail, alpha=0.2,
                                    reduction=reduction)
    _grad_close(g1, ref_gs, "grad_student")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_output_not_one(device, reduction):
    s, idx, val, y = _inputs(device, (6, 50))
    go = torch.randn(6, device=device) if reduction == "none" else torch.tensor(-2.5, device=device)
    for tail in TAILS:
        check_sparse(s, idx, val, y, grad_output=go, tail=tail, alpha=0.3, reduction=reduction)
        check_sparse(s, idx, val, y, grad_output=torch.zeros_like(go), tail=tail, reduction=reduction)


def test_reduction_none_then_torch_reduction(device):
    s0, idx, val, y = _inputs(device, (3, 4, 30))
    s = s0.clone().requires_grad_(True)
    rows = kdfast.sparse_kd_loss(s, idx, val, y, reduction="none", tail="residual")
    (rows[:, 1:].mean() * 3).backward()
    w = torch.zeros(3, 4, device=device)
    w[:, 1:] = 3 / 9
    _, ref_gs = ref_sparse_and_grad(s0, idx, val, y, grad_output=w, reduction="none", tail="residual")
    _grad_close(s.grad, ref_gs, "grad_student")


def test_loss_used_twice_and_accumulation(device):
    s0, idx, val, y = _inputs(device, (4, 30))
    s = s0.clone().requires_grad_(True)
    loss = kdfast.sparse_kd_loss(s, idx, val, y)
    (loss * 2 + loss).backward()
    _, ref_gs = ref_sparse_and_grad(s0, idx, val, y, grad_output=torch.tensor(3.0))
    _grad_close(s.grad, ref_gs, "loss used twice")
    kdfast.sparse_kd_loss(s, idx, val, y).backward()  # accumulates into the existing .grad
    _grad_close(s.grad, ref_gs * 4 / 3, "accumulated")


def test_student_from_earlier_ops(device):
    """The student is not a leaf: the gradient flows on through the ops that made it."""
    w = torch.randn(8, 33, dtype=torch.float64, device=device).requires_grad_(True)
    h = torch.randn(5, 8, dtype=torch.float64, device=device)
    idx, val = random_support((5,), 33, 6, dtype=torch.float64, device=device)

    def fn(w):
        return kdfast.sparse_kd_loss(h @ w, idx, val, tail="residual", temperature=2.0)

    assert torch.autograd.gradcheck(fn, (w,))


def test_second_backward_without_retain_graph_raises(device):
    s, idx, val, y = _inputs(device, (3, 10))
    s.requires_grad_(True)
    loss = kdfast.sparse_kd_loss(s, idx, val, y)
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()


@pytest.mark.parametrize("tail", TAILS)
def test_fp16_loss_scaling_keeps_small_gradients(device, tail):
    """GradScaler-style loss scaling with a bfloat16 student (kept gradient) and a
    float16 one (recomputed): entries far below 1 are float32 math rounded once."""
    for dtype in (torch.float16, torch.bfloat16):
        s0 = logits((3, 1500), device=device)
        idx, val, _ = topk_teacher((3,), 1500, 16, device=device)
        s0[torch.arange(3, device=device)[:, None], idx] += 15
        student = s0.to(dtype)
        s = student.clone().requires_grad_(True)
        (kdfast.sparse_kd_loss(s, idx, val, tail=tail) * 1024.0).backward()
        _, ref_gs = ref_sparse_and_grad(student, idx, val, grad_output=torch.tensor(1024.0), tail=tail)
        normal = ref_gs.abs() >= 1e-3
        rel = ((s.grad.cpu().double() - ref_gs).abs() / ref_gs.abs())[normal]
        assert float(rel.max()) <= torch.finfo(dtype).eps, (dtype, float(rel.max()))


# ----------------------------------------------------------------------------- memory


def _peak_extra_memory(step, reset):
    from kdfast.bench.harness import peak_extra_memory

    return peak_extra_memory(step, device="cpu", reset=reset)


@pytest.mark.parametrize("case", ("fp32_renormalize", "fp32_residual", "bf16_residual", "fp32_none"))
def test_peak_memory_of_forward_backward(case):
    """One forward + backward allocates about the gradient it returns (at most 1.05x): no
    dense teacher, no [N, V] float32 temporary; the kept gradient is scaled in place and
    handed to .grad."""
    n, v, k = 512, 8192, 64
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    student = logits((n, v), dtype=dtype).requires_grad_(True)
    idx, val, _ = topk_teacher((n,), v, k)
    tail = "renormalize" if case.endswith("renormalize") else "residual"
    reduction = "none" if case == "fp32_none" else "batchmean"
    weights = torch.rand(n)

    def reset():
        student.grad = None

    def step():
        loss = kdfast.sparse_kd_loss(student, idx, val, tail=tail, temperature=2.0, reduction=reduction)
        loss.backward(weights if reduction == "none" else None)

    step()  # warm up (first-call allocations of the dispatcher and the thread pool)
    extra = _peak_extra_memory(step, reset)
    grad_bytes = student.numel() * student.element_size()
    assert student.grad is not None
    assert grad_bytes <= extra <= 1.05 * grad_bytes, (
        f"{case}: peak extra memory {extra / 2**20:.2f} MiB vs the gradient's {grad_bytes / 2**20:.2f} MiB")


def test_peak_memory_of_forward_without_gradient():
    """A forward that needs no gradient allocates O(rows), never a gradient-sized buffer."""
    n, v = 512, 8192
    student = logits((n, v)).requires_grad_(True)
    idx, val, _ = topk_teacher((n,), v, 64)

    def step():
        with torch.no_grad():
            return kdfast.sparse_kd_loss(student, idx, val, tail="residual")

    step()
    extra = _peak_extra_memory(step, lambda: None)
    assert extra <= 64 * n + 65536, f"forward allocated {extra / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compile_step_with_backward_inside(device, backend):
    if backend == "inductor" and device == "cpu" and os.environ.get("ATEN_CPU_CAPABILITY"):
        # inductor's C++ kernels assume the CPU's vector width while ATen runs the narrower
        # ISA asked for (kd_loss's and dkd_loss's compile tests skip it the same way).
        pytest.skip("inductor CPU codegen with ATEN_CPU_CAPABILITY forcing a narrower ISA")

    def step(student, indices, values, labels):
        loss = kdfast.sparse_kd_loss(student, indices, values, labels, alpha=0.5, temperature=2.0,
                                     tail="residual")
        (loss * 3.7).backward()
        return loss.detach()

    s0, idx, val, y = _inputs(device, (6, 40))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend=backend)
        results = []
        for _ in range(2):
            s = s0.clone().requires_grad_(True)
            results.append((compiled(s, idx, val, y), s.grad))
    ref, ref_gs = ref_sparse_and_grad(s0, idx, val, y, grad_output=torch.tensor(3.7), alpha=0.5,
                                      temperature=2.0, tail="residual")
    for out, gs in results:
        assert gs is not None
        torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-5, atol=1e-5)
        _grad_close(gs, ref_gs, "compiled grad_student")


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_module_reduction_none(device):
    crit = kdfast.SparseKDLoss(values="probs", temperature=0.5, reduction="none")
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    s0, idx, val, y = _inputs(device, (3, 4, 21), values="probs")
    s = s0.clone().requires_grad_(True)
    rows = compiled(s, idx, val, y)
    w = torch.rand(3, 4, device=device)
    rows.backward(w, retain_graph=True)
    rows.backward(w)
    _, ref_gs = ref_sparse_and_grad(s0, idx, val, y, grad_output=2 * w, values="probs", temperature=0.5,
                                    reduction="none")
    _grad_close(s.grad, ref_gs, "grad_student")


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_float16_recompute(device):
    fn = torch.compile(lambda s, i, v: kdfast.sparse_kd_loss(s, i, v, reduction="sum", tail="residual"),
                       fullgraph=True, backend="aot_eager")
    s0, idx, val, _ = _inputs(device, (5, 33), dtype=torch.float16)
    s = s0.clone().requires_grad_(True)
    fn(s, idx, val).backward()
    _, ref_gs = ref_sparse_and_grad(s0, idx, val, reduction="sum", tail="residual")
    _grad_close(s.grad, ref_gs, "grad_student")


def test_reference_agrees_on_the_op_outputs(device):
    """The fused op's per-row loss is the reference's, for every (values, tail)."""
    s, idx, val, y = _inputs(device, (4, 3, 50))
    for values in VALUES:
        v = val if values == "logprobs" else val.exp()
        for tail in TAILS:
            loss, _, _ = torch.ops.kdfast.sparse_kd_loss_fused(s, idx, v, y, 1.3, 0.2, values == "logprobs",
                                                               TAILS.index(tail), -100, 2, False)
            ref = ref_sparse(s.cpu(), idx.cpu(), v.cpu(), y.cpu(), values_kind=values, temperature=1.3,
                             alpha=0.2, tail=tail, reduction="none")
            torch.testing.assert_close(loss.cpu().double(), ref, rtol=2e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fallback

FALLBACK_CHILD = """
import sys, warnings
sys.path[:0] = [{root!r}, {tests!r}]
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import kdfast
    from test_sparse_kd_ops import fallback_cases
    results = fallback_cases()
torch.save(dict(results=results, has_extension=kdfast.has_extension(),
                warned=any("reference" in str(w.message) for w in caught)), sys.argv[1])
"""


def fallback_cases():
    """(loss, grad) of a few sparse_kd_loss calls on fixed inputs."""
    out = []
    for i, (tail, values, alpha, dtype) in enumerate([("renormalize", "logprobs", 0.0, torch.float32),
                                                      ("residual", "probs", 0.3, torch.float32),
                                                      ("residual", "logprobs", 0.5, torch.bfloat16)]):
        g = torch.Generator().manual_seed(7 + i)
        s = (torch.randn(3, 4, 50, generator=g) * 3).to(dtype).requires_grad_(True)
        idx = torch.stack([torch.randperm(50, generator=g)[:6] for _ in range(12)]).reshape(3, 4, 6)
        idx[..., ::4] = -1
        w = torch.rand(3, 4, 6, generator=g) * 0.15
        val = w.log() if values == "logprobs" else w
        y = torch.randint(0, 50, (3, 4), generator=g)
        y.view(-1)[::5] = -100
        loss = kdfast.sparse_kd_loss(s, idx, val, y, values=values, tail=tail, alpha=alpha, temperature=2.0)
        loss.backward()
        out.append((loss.detach(), s.grad))
    return out


def test_fallback_without_the_extension_matches_the_kernels(tmp_path):
    """KDFAST_DISABLE_EXTENSION=1: kdfast.sparse_kd_loss runs kdfast.reference (with a warning)
    and gives the kernels' numbers."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "fallback.pt"
    env = dict(os.environ, KDFAST_DISABLE_EXTENSION="1")
    code = FALLBACK_CHILD.format(root=root, tests=os.path.join(root, "tests"))
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(out)
    assert not child["has_extension"] and child["warned"]
    for (ref_loss, ref_grad), (loss, grad) in zip(child["results"], fallback_cases()):
        torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=1e-5)
        scale = float(ref_grad.abs().max())
        rtol = torch.finfo(grad.dtype).eps if grad.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=rtol, atol=2e-5 * scale)
