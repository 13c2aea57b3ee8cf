"""``python -m kdfast demo``: an end-to-end check of kdfast on this machine.

1. ``kd_loss`` (kernels) against the plain-PyTorch reference in float64, for every
   divergence, dtypes, reductions, ignored rows and a teacher that needs a gradient;
2. a short distillation run (a small student learning from a fixed teacher on
   synthetic data) whose loss must go down;
3. the quick benchmark table (kdfast vs eager PyTorch vs ``torch.compile``).
Exits non-zero if a check fails.
"""

from __future__ import annotations

import sys
import time

import torch

import kdfast
from kdfast import reference

CHECK_CASES = [
    # (shape, dtype, divergence, temperature, alpha, reduction)
    ((64, 1000), torch.float32, "forward_kl", 4.0, 0.1, "batchmean"),
    ((64, 1000), torch.float32, "reverse_kl", 2.0, 0.0, "sum"),
    ((64, 1000), torch.float32, "jsd", 1.0, 0.5, "none"),
    ((4, 33, 517), torch.bfloat16, "forward_kl", 2.0, 0.3, "batchmean"),
    ((4, 33, 517), torch.float16, "jsd", 0.5, 0.0, "batchmean"),
]


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]


def check_against_reference() -> bool:
    """Loss and both gradients of every case against the float64 reference."""
    gen = torch.Generator().manual_seed(0)
    ok = True
    print("1) kd_loss vs the float64 reference (max relative error)")
    for shape, dtype, div, temp, alpha, red in CHECK_CASES:
        s = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
        t = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
        labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        labels.view(-1)[::7] = -100  # some ignored rows
        kw = dict(temperature=temp, alpha=alpha, divergence=div, reduction=red)
        out = kdfast.kd_loss(s, t, labels, **kw)
        grads = torch.autograd.grad(out.sum(), (s, t))
        s64 = s.detach().double().requires_grad_()
        t64 = t.detach().double().requires_grad_()
        ref = reference.kd_loss(s64, t64, labels, **kw)
        ref_grads = torch.autograd.grad(ref.sum(), (s64, t64))
        errs = [((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()]
        errs += [((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                 for g, r in zip(grads, ref_grads)]
        good = max(errs) <= _tolerance(dtype)
        ok &= good
        print(f"   {div:10s} {dtype!s:15s} {shape!s:15s} T={temp:<4} alpha={alpha:<4} {red:9s} "
              f"loss {errs[0]:.1e}  d/dstudent {errs[1]:.1e}  d/dteacher {errs[2]:.1e}  "
              f"{'ok' if good else 'FAIL'}")
    return ok


def distill_synthetic(steps: int = 150) -> bool:
    """A small student learns a fixed random teacher from its soft labels."""
    gen = torch.Generator().manual_seed(1)
    dim, classes = 64, 100
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.GELU(), torch.nn.Linear(256, classes))
    student = torch.nn.Linear(dim, classes)
    for p in teacher.parameters():
        p.requires_grad_(False)
    crit = kdfast.KDLoss(temperature=4.0, alpha=0.2)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    first = last = None
    print(f"2) distilling a {dim}->256->{classes} MLP teacher into a linear student ({steps} steps)")
    for step in range(steps):
        x = torch.randn(256, dim, generator=gen)
        with torch.no_grad():
            t_logits = teacher(x)
        labels = t_logits.argmax(-1)
        loss = crit(student(x), t_logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"   step {step:4d}  loss {last:.4f}")
    with torch.no_grad():
        x = torch.randn(2048, dim, generator=gen)
        agree = (student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean().item()
    good = last < 0.7 * first
    print(f"   loss {first:.3f} -> {last:.3f}; student agrees with teacher on {agree:.0%} of new inputs"
          f"  {'ok' if good else 'FAIL'}")
    return good


def main(argv: list[str] | None = None) -> int:
    info = kdfast.build_info()
    print(f"kdfast {info['version']} (torch {info['torch']}); compiled kernels: {info['extension']}"
          + (f", CPU {info['cpu_capability']}, CUDA {info['with_cuda']}" if info["extension"] else ""))
    if not info["extension"]:
        print(f"   warning: running the reference fallback ({info.get('extension_error')})")
    t0 = time.perf_counter()
    ok = check_against_reference()
    ok &= distill_synthetic()
    print("3) quick benchmark (kdfast vs eager PyTorch vs torch.compile)")
    import tempfile

    from kdfast.bench import kd_loss as bench_kd_loss

    with tempfile.TemporaryDirectory(prefix="kdfast-demo-") as out:
        bench_kd_loss.main(["--quick", "--out", out, "--no-plot"])
    print(f"demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
