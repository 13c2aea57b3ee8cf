"""Attention-transfer tests: an independent float64 reference written from the formula
(Zagoruyko & Komodakis, ICLR 2017), input builders and the tolerance rules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import kdfast

LOW_PRECISION = (torch.float16, torch.bfloat16)


def ref_attention(x: torch.Tensor, p: float) -> torch.Tensor:
    """[N, C, H, W] -> [N, H * W] in float64: mean over channels of |x|^p, divided by
    max(its L2 norm over the positions, 1e-12)."""
    x = x.detach().to(torch.float64).requires_grad_(x.requires_grad)
    return _attention64(x, p)


def _attention64(x64: torch.Tensor, p: float) -> torch.Tensor:
    n = x64.shape[0]
    maps = x64.abs().pow(p).sum(dim=1).reshape(n, -1) / x64.shape[1]
    norm = torch.linalg.vector_norm(maps, dim=1, keepdim=True)
    return maps / torch.clamp(norm, min=1e-12)


def ref_loss_and_grads(student, teacher, p: float = 2.0, *, grad_output=None,
                       teacher_grad: bool = False):
    """(loss, d/d student, d/d teacher or None) in float64; student / teacher may be
    lists of feature maps (the losses summed)."""
    students = list(student) if isinstance(student, (list, tuple)) else [student]
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    s64 = [s.detach().to(torch.float64).requires_grad_(True) for s in students]
    t64 = [t.detach().to(torch.float64).requires_grad_(teacher_grad) for t in teachers]
    loss = sum(((_attention64(s, p) - _attention64(t, p)) ** 2).mean() for s, t in zip(s64, t64))
    go = torch.tensor(1.0 if grad_output is None else float(grad_output), dtype=torch.float64)
    wanted = s64 + (t64 if teacher_grad else [])
    grads = torch.autograd.grad(loss, wanted, go)
    gs = list(grads[: len(s64)])
    gt = list(grads[len(s64):]) if teacher_grad else None
    if not isinstance(student, (list, tuple)):
        gs = gs[0]
        gt = gt[0] if teacher_grad else None
    return loss.detach(), gs, gt


def feature_map(shape: Sequence[int], dtype=torch.float32, device="cpu", scale: float = 1.0,
                channels_last: bool = False) -> torch.Tensor:
    x = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def kernel_loss_and_grads(student, teacher, p: float = 2.0, *, grad_output=None,
                          teacher_grad: bool = False, fn=None):
    """(loss, grad_student, grad_teacher or None) of kdfast.attention_transfer_loss (or fn)
    on leaf copies of the inputs (their layouts kept)."""
    fn = kdfast.attention_transfer_loss if fn is None else fn
    is_list = isinstance(student, (list, tuple))
    students = list(student) if is_list else [student]
    teachers = list(teacher) if is_list else [teacher]
    s = [x.detach().clone().requires_grad_(True) for x in students]
    t = [x.detach().clone().requires_grad_(teacher_grad) for x in teachers]
    loss = fn(s if is_list else s[0], t if is_list else t[0], p=p)
    loss.backward(None if grad_output is None else torch.tensor(float(grad_output),
                                                                 device=loss.device,
                                                                 dtype=loss.dtype))
    gs = [x.grad for x in s]
    gt = [x.grad for x in t] if teacher_grad else None
    if not is_list:
        gs = gs[0]
        gt = gt[0] if teacher_grad else None
    return loss.detach(), gs, gt


def assert_loss_close(loss: torch.Tensor, ref: torch.Tensor, positions: int, what: str = "loss"):
    """float32 math: the loss is (1 / (N P)) sum ||a_s - a_t||^2 with ||a|| = 1, so its
    absolute scale is 1 / P; rtol 2e-5 plus an absolute 1e-6 / P."""
    torch.testing.assert_close(loss.detach().to(torch.float64).cpu(), ref.cpu(), rtol=2e-5,
                               atol=1e-6 / positions, msg=lambda m: f"{what}: {m}")


def natural_grad_scale(x: torch.Tensor, other: torch.Tensor, p: float,
                       grad_output: float | None = None) -> float:
    """The size of the two terms of d loss / d x before they cancel (float64):
    2 / (N P) * p / C * max |x|^(p-1) / max(||A||, eps) * (max |d| + max |a| |<a, d>|).

    The gradient is their difference, which can vanish (a zero partner map makes d
    parallel to a): the rounding error of any float computation scales with the terms,
    not with what is left of them, so tolerances are relative to this."""
    x64, o64 = x.detach().to(torch.float64), other.detach().to(torch.float64)
    n, c = x64.shape[:2]
    positions = x64.shape[2] * x64.shape[3]

    def normalised(y):
        maps = y.abs().pow(p).mean(1).flatten(1)
        den = torch.linalg.vector_norm(maps, dim=1).clamp(min=1e-12)
        return maps / den[:, None], den

    a, den = normalised(x64)
    b, _ = normalised(o64)
    d = a - b
    dot = (a * d).sum(1).abs()
    slope = x64.abs().pow(p - 1).flatten(1).amax(1) if p != 1 else torch.ones(n, dtype=torch.float64)
    terms = 2.0 / (n * positions) * p / c * slope / den * (d.abs().amax(1) + a.abs().amax(1) * dot)
    go = 1.0 if grad_output is None else abs(float(grad_output))
    return go * float(terms.max())


def assert_grad_close(g: torch.Tensor, ref: torch.Tensor, what: str = "grad", natural: float = 0.0):
    """A gradient against the float64 one, relative to its largest entry (or to
    ``natural``, natural_grad_scale, when larger); for float16 / bfloat16 gradients also
    one rounding to the gradient's dtype (all math is float32)."""
    assert g is not None, f"{what}: no gradient"
    assert g.shape == ref.shape, (what, g.shape, ref.shape)
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, natural)
    if g.dtype == torch.float64:
        rtol, atol = 1e-10, 1e-12 * max(scale, 1e-30)
    elif g.dtype in LOW_PRECISION:
        # one rounding; below the normal range the spacing of the subnormals is absolute
        info = torch.finfo(g.dtype)
        rtol, atol = info.eps, max(1e-5 * scale, info.smallest_normal * info.eps)
    else:
        rtol, atol = 1e-4, 1e-5 * scale
    torch.testing.assert_close(g.detach().to(torch.float64).cpu(), ref.cpu(), rtol=rtol,
                               atol=max(atol, 1e-30), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check_against_reference(student, teacher, p: float = 2.0, *, grad_output=None,
                            teacher_grad: bool = False, fn=None):
    """Runs attention_transfer_loss (or fn) forward + backward on (lists of) feature maps
    and checks the loss and the gradients against the float64 reference."""
    loss, gs, gt = kernel_loss_and_grads(student, teacher, p, grad_output=grad_output,
                                         teacher_grad=teacher_grad, fn=fn)
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, p, grad_output=grad_output,
                                             teacher_grad=teacher_grad)
    first = student[0] if isinstance(student, (list, tuple)) else student
    want = torch.float64 if first.dtype == torch.float64 else torch.float32
    assert loss.dtype == want and loss.dim() == 0, (loss.dtype, loss.shape)
    positions = min(x.shape[2] * x.shape[3] for x in
                    (student if isinstance(student, (list, tuple)) else [student]))
    if first.dtype == torch.float64:
        torch.testing.assert_close(loss.cpu(), ref.cpu(), rtol=1e-10, atol=1e-14)
    else:
        assert_loss_close(loss, ref, positions)
    pairs = [(gs, ref_gs, "grad_student")]
    if teacher_grad:
        pairs.append((gt, ref_gt, "grad_teacher"))
    students = student if isinstance(student, (list, tuple)) else [student]
    teachers = teacher if isinstance(teacher, (list, tuple)) else [teacher]
    inputs = {"grad_student": (students, teachers), "grad_teacher": (teachers, students)}
    for g, ref_g, name in pairs:
        xs, others = inputs[name]
        gl, rl = (g, ref_g) if isinstance(g, list) else ([g], [ref_g])
        for i, (x, o, a, b) in enumerate(zip(xs, others, gl, rl)):
            assert a is not None and a.dtype == x.dtype, (name, i, None if a is None else a.dtype)
            assert_grad_close(a, b, f"{name}[{i}]", natural_grad_scale(x, o, p, grad_output))
    return loss, gs, gt
