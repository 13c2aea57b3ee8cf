#!/usr/bin/env python3
"""Bitwise determinism of ``kdfast.kd_loss``: the same inputs twice give the same bits.

For fp32 and bf16 inputs and a few shapes (many rows, few long rows, and two rows of
262147 logits, which takes the split-row path on a GPU), each divergence runs forward
+ backward (alpha > 0 with labels; the teacher's gradient too in every other case)
``--runs`` times on fresh copies of the same inputs; the loss (reduced, or per row with
``reduction="none"``) and the gradients must be bitwise equal across runs (NaN and -0.0
included)::

    python3 scripts/gpu_determinism.py                # on the GPU
    python3 scripts/gpu_determinism.py --device cpu   # on the CPU kernels

Exit status: 0 when every case is bitwise reproducible, 1 when one is not (each is
listed with how many elements differ), 2 when kdfast has no kernels for the device.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import kdfast

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = ((4096, 1000), (8, 32003), (2, 262147))  # many rows; few long rows; the split path
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
HAS_SOFTCAP = "softcap" in inspect.signature(kdfast.kd_loss).parameters
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(x: torch.Tensor) -> torch.Tensor:
    """``x`` reinterpreted as integers of its width: equal bits compare equal, NaN included."""
    return x.detach().contiguous().view(_INT_VIEW[x.element_size()])


def run_once(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, divergence: str,
             reduction: str, softcap: float | None, teacher_grad: bool) -> list:
    """One forward + backward on fresh leaf copies; returns [loss, student grad, teacher grad]."""
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(teacher_grad)
    opts = {"softcap": softcap} if HAS_SOFTCAP else {}
    loss = kdfast.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, divergence=divergence,
                          reduction=reduction, **opts)
    loss.backward(torch.ones_like(loss) if reduction == "none" else None)
    return [loss.detach(), s.grad, t.grad if teacher_grad else torch.empty(0)]


def check_case(device: str, dtype: str, shape: tuple, divergence: str, reduction: str,
               softcap: float | None, teacher_grad: bool, runs: int, seed: int) -> str | None:
    """None when ``runs`` runs agree bit for bit, else what differed."""
    gen = torch.Generator().manual_seed(seed)
    rows, vocab = shape
    student = (3 * torch.randn(shape, generator=gen)).to(DTYPES[dtype]).to(device)
    teacher = (3 * torch.randn(shape, generator=gen)).to(DTYPES[dtype]).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::7] = -100  # some rows ignored
    labels = labels.to(device)
    first = run_once(student, teacher, labels, divergence, reduction, softcap, teacher_grad)
    for run in range(1, runs):
        again = run_once(student, teacher, labels, divergence, reduction, softcap, teacher_grad)
        for name, a, b in zip(("loss", "student gradient", "teacher gradient"), first, again):
            differ = int((bits(a) != bits(b)).sum())
            if differ:
                return f"run {run + 1}: {name} differs from run 1 in {differ} of {a.numel()} elements"
    return None


def kernels_missing(device: str) -> list:
    """The kdfast::kd_loss* ops without a kernel for ``device``."""
    ops = sorted(o for o in torch._C._dispatch_get_all_op_names() if o.startswith("kdfast::kd_loss"))
    if not ops:
        return ["kdfast::kd_loss* (kdfast._C is not built)"]
    return [o for o in ops if not kdfast.has_kernel(o.split("::", 1)[1], device)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--runs", type=int, default=3, help="runs per case to compare (default 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.runs < 2:
        p.error("--runs must be at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_determinism: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    missing = kernels_missing(args.device)
    if missing:
        print(f"gpu_determinism: no {args.device} kernel for {', '.join(missing)}; build kdfast with "
              f"its {args.device} kernels first", file=sys.stderr)
        return 2

    start = time.perf_counter()
    failed = total = 0
    for i, (dtype, shape, divergence) in enumerate(itertools.product(DTYPES, SHAPES, DIVERGENCES)):
        # the options rotate: each reduction, softcap setting and gradient set is seen
        reduction = ("batchmean", "sum", "none")[i % 3]
        softcap = (None, 20.0)[(i // 3) % 2]
        teacher_grad = i % 2 == 0
        grads = "student and teacher gradients" if teacher_grad else "student gradient"
        label = (f"{dtype} {shape[0]}x{shape[1]} {divergence} reduction={reduction} softcap={softcap} "
                 f"fwd+bwd, {grads}")
        why = check_case(args.device, dtype, shape, divergence, reduction, softcap, teacher_grad, args.runs,
                         args.seed + i)
        total += 1
        if why:
            failed += 1
        print(f"{'FAIL' if why else 'ok  '} {label}" + (f": {why}" if why else ""), flush=True)
    print(f"gpu_determinism: {total} cases x {args.runs} runs on {args.device}, {failed} not bitwise "
          f"reproducible, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
