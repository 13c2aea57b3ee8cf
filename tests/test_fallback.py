"""The fallback path: with KDFAST_DISABLE_EXTENSION=1 kdfast imports without kdfast._C,
warns once, and kd_loss (the plain-PyTorch reference) gives the same numbers as the
compiled kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kd_helpers import check_against_reference, labels_for, logits

import kdfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# Cases run in both processes: (shape, s_dtype, t_dtype, options).
CASES = [
    ((6, 37), "float32", "float32", dict(temperature=1.0, divergence="forward_kl")),
    ((6, 37), "float32", "float32", dict(temperature=2.0, alpha=0.3, divergence="reverse_kl",
                                         reduction="sum")),
    ((2, 3, 65), "float32", "float32", dict(temperature=4.0, alpha=0.5, divergence="jsd",
                                            beta=0.3, reduction="none")),
    ((4, 129), "bfloat16", "float32", dict(temperature=0.5, alpha=1.0, divergence="forward_kl")),
    ((5, 1), "float16", "float16", dict(temperature=10.0, divergence="jsd")),
]

CHILD = textwrap.dedent("""
    import sys, warnings
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kdfast
        from test_fallback import CASES, run_cases
        results = run_cases(kdfast.kd_loss)
        run_cases(kdfast.kd_loss)  # second time: no second warning
    fallback_warnings = [w for w in caught if "reference" in str(w.message)]
    torch.save(dict(results=results, has_extension=kdfast.has_extension(),
                    has_kernel=kdfast.has_kernel("kd_loss_fused", "cpu"),
                    n_warnings=len(fallback_warnings),
                    warning=str(fallback_warnings[0].message) if fallback_warnings else ""),
               sys.argv[1])
""")


def run_cases(fn):
    out = []
    for i, (shape, s_dtype, t_dtype, options) in enumerate(CASES):
        g = torch.Generator().manual_seed(100 + i)
        s = (torch.randn(shape, generator=g) * 3).to(getattr(torch, s_dtype)).requires_grad_(True)
        t = (torch.randn(shape, generator=g) * 3).to(getattr(torch, t_dtype)).requires_grad_(True)
        labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
        labels.view(-1)[::3] = -100
        loss = fn(s, t, labels, **options)
        loss.backward(torch.full_like(loss, 1.7))
        out.append((loss.detach(), s.grad, t.grad))
    return out


def test_fallback_matches_extension(tmp_path, needs_extension):
    path = tmp_path / "fallback.pt"
    env = dict(os.environ, KDFAST_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tests=TESTS), str(path)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(path)
    assert child["has_extension"] is False
    assert child["has_kernel"] is False
    assert child["n_warnings"] == 1, child
    assert "KDFAST_DISABLE_EXTENSION" in child["warning"]
    assert kdfast.has_extension()
    ours = run_cases(kdfast.kd_loss)
    for case, (fb, ext) in enumerate(zip(child["results"], ours)):
        for what, a, b in zip(("loss", "grad_student", "grad_teacher"), fb, ext):
            assert a.dtype == b.dtype and a.shape == b.shape, (case, what)
            tol = dict(rtol=1e-5, atol=1e-6) if a.dtype in (torch.float32, torch.float64) else {}
            torch.testing.assert_close(a, b, **tol,
                                       msg=lambda m, c=case, w=what: f"case {c} {w}: {m}")


@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "jsd"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_reference_module_matches_fp64(divergence, dtype):
    """kdfast.reference (the fallback) against the independent float64 reference."""
    student, teacher = logits((7, 45), dtype=dtype), logits((7, 45), dtype=dtype)
    labels = labels_for((7,), 45)
    for reduction in ("batchmean", "sum", "none"):
        go = torch.randn(7) if reduction == "none" else None
        check_against_reference(student, teacher, labels, grad_output=go, teacher_grad=True,
                                fn=kdfast.reference.kd_loss, temperature=2.0, alpha=0.3,
                                divergence=divergence, reduction=reduction)
