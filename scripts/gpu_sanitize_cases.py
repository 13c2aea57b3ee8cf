#!/usr/bin/env python3
"""Small ``kdfast.kd_loss`` calls that walk every code path of its kernels, for compute-sanitizer.

Run under each compute-sanitizer tool (``scripts/gpu_check.sh`` does)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/gpu_sanitize_cases.py -v
    python3 scripts/gpu_sanitize_cases.py --device cpu        # the same cases on the CPU kernels

The cases are small (the sanitizer slows kernels 10-100x) and together cover:

- vocabulary sizes 1, 7, 8, 9, 33, 1025 (vector-width remainders, one and several
  chunks per thread) and 262147 with two rows (the split-row path);
- every (student, teacher) dtype pair in {fp32, fp16, bf16}^2, and fp64 / fp64, with
  every divergence, alpha 0 and 0.3, softcap None and 20;
- rows whose label is ``ignore_index`` (some rows, all rows), labels given with
  alpha 0, masked (-inf) logits, every reduction;
- views: rows sliced off (storage offsets), ``x[:, 1:, :]`` of a 3-D tensor, transposed
  leading dimensions, a transposed ``[V, N]`` tensor (vocabulary stride != 1), and a
  one-element storage offset (misaligned rows);
- forward only (``torch.no_grad()``, and grad mode with no input requiring grad),
  forward + backward (student; grad_output 1 and != 1), student and teacher, teacher
  only, and a second backward with ``retain_graph=True`` (the recompute path).

Every case is also checked against ``kdfast.reference`` in float64 on the CPU (loss,
gradients, zero gradient on ignored rows and outside the views), so that a kernel that
reads the wrong memory without faulting still shows up. Exit status: 0 when every case
passes, 1 when one fails (each is listed), 2 when kdfast has no kernels for the device
(the sanitizer would then only see PyTorch's own kernels).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import kdfast

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
PAIRS = [(s, t) for s in ("fp32", "fp16", "bf16") for t in ("fp32", "fp16", "bf16")] + [("fp64", "fp64")]
VOCABS = (1, 7, 8, 9, 33, 1025)
SPLIT_VOCAB = 262147  # with two rows: rows alone cannot fill the GPU, so each row is split
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
OPTIONS = ((0.0, None), (0.3, None), (0.0, 20.0), (0.3, 20.0))  # (alpha, softcap)
# fwd: torch.no_grad(); nograd_inputs: grad mode on, nothing requires grad; bwd: student
# only; bwd_scaled: grad_output != 1; teacher: both; retain*: backward twice (recompute).
GRAD_MODES = ("bwd", "bwd_scaled", "teacher", "teacher_only", "retain", "retain_teacher")
MODES = ("fwd", "nograd_inputs", *GRAD_MODES)
LAYOUTS_1D = ("contiguous", "rows_offset", "vocab_strided", "element_offset")
LAYOUTS_2D = ("contiguous", "rows_offset", "slice3d", "transposed", "element_offset")
HAS_SOFTCAP = "softcap" in inspect.signature(kdfast.kd_loss).parameters


@dataclass(frozen=True)
class Case:
    """One kd_loss call: inputs ``[*lead, vocab]`` built with the given layouts, then a mode."""

    vocab: int
    lead: tuple
    student: str  # dtype names
    teacher: str
    divergence: str
    alpha: float
    softcap: float | None
    mode: str
    reduction: str = "batchmean"
    temperature: float = 2.0
    beta: float = 0.5
    ignore: str = "none"  # none | some | all rows ignored
    labels: bool = False  # pass labels even when alpha == 0 and no row is ignored
    ignore_index: int = -100
    student_layout: str = "contiguous"
    teacher_layout: str = "contiguous"
    masked: bool = False  # column 0 is -inf in both inputs

    @property
    def name(self) -> str:
        parts = ["x".join(map(str, (*self.lead, self.vocab))), f"{self.student}/{self.teacher}",
                 self.divergence, f"a={self.alpha:g}", f"cap={self.softcap}", f"T={self.temperature:g}",
                 self.mode, self.reduction, f"ignore={self.ignore}",
                 f"{self.student_layout}/{self.teacher_layout}"]
        if self.divergence == "jsd":
            parts.insert(3, f"beta={self.beta:g}")
        if self.labels:
            parts.append("labels")
        if self.masked:
            parts.append("masked")
        return " ".join(parts)

    @property
    def needs_labels(self) -> bool:
        return self.alpha > 0 or self.ignore != "none" or self.labels

    @property
    def wants(self) -> tuple:
        """(student requires grad, teacher requires grad)."""
        return {"fwd": (True, False), "nograd_inputs": (False, False), "bwd": (True, False),
                "bwd_scaled": (True, False), "teacher": (True, True), "teacher_only": (False, True),
                "retain": (True, False), "retain_teacher": (True, True)}[self.mode]


def _layouts(lead: tuple) -> tuple:
    return LAYOUTS_1D if len(lead) == 1 else LAYOUTS_2D


def make_cases() -> list:
    """The case list: a covering design rather than the full product (which is ~100x larger)."""
    cases = []
    leads = ((3,), (1,), (2, 2), (5,), (2, 3))
    # 1. every dtype pair x divergence x (alpha, softcap) once forward only and once with a
    # gradient mode; vocabulary, shape, layout, reduction and the rest rotate along.
    for i, ((s, t), div, (alpha, cap)) in enumerate(itertools.product(PAIRS, DIVERGENCES, OPTIONS)):
        lead = leads[i % len(leads)]
        layouts = _layouts(lead)
        vocab = VOCABS[i % len(VOCABS)]
        common = dict(vocab=vocab, lead=lead, student=s, teacher=t, divergence=div, alpha=alpha, softcap=cap,
                      reduction=REDUCTIONS[i % 3], temperature=(2.0, 1.0, 0.5)[(i // 3) % 3],
                      beta=(0.5, 0.3)[(i // 2) % 2], ignore=("none", "some")[(i // 4) % 2],
                      labels=i % 3 == 0, ignore_index=(-100, -1)[(i // 5) % 2],
                      student_layout=layouts[i % len(layouts)],
                      teacher_layout=layouts[(i // 2 + 1) % len(layouts)],
                      masked=vocab > 1 and i % 7 == 0)
        cases.append(Case(mode="fwd", **common))
        cases.append(Case(mode=GRAD_MODES[i % len(GRAD_MODES)], **common))
    # 2. the split-row path: every dtype pair x divergence, forward only and with a gradient.
    for i, ((s, t), div) in enumerate(itertools.product(PAIRS, DIVERGENCES)):
        alpha, cap = OPTIONS[i % len(OPTIONS)]
        layout = ("contiguous", "rows_offset", "element_offset")[i % 3]
        common = dict(vocab=SPLIT_VOCAB, lead=(2,), student=s, teacher=t, divergence=div, alpha=alpha,
                      softcap=cap, reduction=REDUCTIONS[i % 3], ignore=("none", "some", "none", "all")[i % 4],
                      student_layout=layout, teacher_layout="contiguous", masked=i % 5 == 0)
        cases.append(Case(mode="fwd", **common))
        cases.append(Case(mode=GRAD_MODES[i % len(GRAD_MODES)], **common))
    # 3. every layout with some and all rows ignored, in each kind of call.
    for i, (layout, ignore, mode) in enumerate(itertools.product(
            LAYOUTS_1D + LAYOUTS_2D, ("some", "all"), ("fwd", "bwd", "teacher", "retain_teacher"))):
        lead = (4,) if i < len(LAYOUTS_1D) * 8 else (2, 3)
        s, t = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"))[i % 3]
        cases.append(Case(vocab=(33, 1025, 8)[i % 3], lead=lead, student=s, teacher=t,
                          divergence=DIVERGENCES[i % 3], alpha=(0.0, 0.3)[(i // 3) % 2], softcap=None,
                          mode=mode, reduction=REDUCTIONS[(i // 2) % 3], ignore=ignore,
                          student_layout=layout, teacher_layout=layout))
    return cases


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _view_maker(layout: str, lead: tuple, vocab: int) -> tuple:
    """(shape of the base tensor, function base -> the ``[*lead, vocab]`` view passed to kd_loss)."""
    rows = math.prod(lead)
    if layout == "contiguous":
        return (*lead, vocab), lambda x: x
    if layout == "rows_offset":  # the first row sliced off: storage offset of a row
        return (lead[0] + 1, *lead[1:], vocab), lambda x: x[1:]
    if layout == "slice3d":
        return (lead[0], lead[1] + 1, vocab), lambda x: x[:, 1:, :]
    if layout == "transposed":  # leading dimensions transposed: rows are not evenly spaced
        return (lead[1], lead[0], vocab), lambda x: x.transpose(0, 1)
    if layout == "vocab_strided":  # [V, N].t(): consecutive logits of a row are N apart
        return (vocab, lead[0]), lambda x: x.t()
    if layout == "element_offset":  # rows start one element past an aligned address
        return (rows * vocab + 1,), lambda x: x[1:].view(*lead, vocab)
    raise ValueError(f"unknown layout {layout!r}")


@dataclass
class Input:
    """A logits tensor: the base (a leaf) and how to get the view kd_loss sees."""

    base_cpu: torch.Tensor
    view_of: Callable[[torch.Tensor], torch.Tensor]


def make_input(case: Case, which: str, gen: torch.Generator) -> Input:
    layout = case.student_layout if which == "student" else case.teacher_layout
    shape, view_of = _view_maker(layout, case.lead, case.vocab)
    base = (3 * torch.randn(shape, generator=gen)).to(DTYPES[getattr(case, which)])
    if case.masked:
        view_of(base)[..., 0] = float("-inf")  # the same column in both inputs: finite loss
    return Input(base, view_of)


def make_labels(case: Case, gen: torch.Generator) -> torch.Tensor | None:
    if not case.needs_labels:
        return None
    low = 1 if case.masked and case.vocab > 1 else 0  # a label on a masked logit would be inf
    labels = torch.randint(low, case.vocab, case.lead, generator=gen)
    flat = labels.view(-1)
    if case.ignore == "all":
        flat.fill_(case.ignore_index)
    elif case.ignore == "some":
        flat[::2] = case.ignore_index
    return labels


# ---------------------------------------------------------------------------
# Running and checking one case
# ---------------------------------------------------------------------------


def _tolerance(dtype_name: str) -> float:
    """Relative tolerance of a gradient stored in ``dtype_name`` (against its largest element)."""
    return {"fp64": 1e-9, "fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}[dtype_name]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, floor: float = 1e-12) -> str | None:
    """None when ``got`` matches ``want`` to ``rtol`` of want's largest magnitude (plus ``floor``),
    else why not."""
    got, want = got.detach().cpu().double(), want.detach().double()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return "non-finite values"
    if want.numel() == 0:
        return None
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    return None if err <= rtol * scale + floor else f"max error {err:.3g} (largest value {scale:.3g})"


def run_case(case: Case, device: str, seed: int) -> list:
    """Runs ``case`` on ``device`` and checks it against the float64 reference; returns the problems."""
    gen = torch.Generator().manual_seed(seed)
    s_in, t_in = make_input(case, "student", gen), make_input(case, "teacher", gen)
    labels = make_labels(case, gen)
    need_s, need_t = case.wants
    scaled = case.mode == "bwd_scaled"
    row_weights = torch.rand(case.lead, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(temperature=case.temperature, alpha=case.alpha, divergence=case.divergence, beta=case.beta,
                ignore_index=case.ignore_index, reduction=case.reduction)
    if HAS_SOFTCAP:
        opts["softcap"] = case.softcap
    elif case.softcap is not None:
        return []  # this kdfast has no softcap yet: nothing to run

    # --- the call under test ---
    s_base = s_in.base_cpu.to(device).requires_grad_(need_s)
    t_base = t_in.base_cpu.to(device).requires_grad_(need_t)
    dev_labels = labels.to(device) if labels is not None else None
    if case.mode == "fwd":
        with torch.no_grad():
            loss = kdfast.kd_loss(s_in.view_of(s_base), t_in.view_of(t_base), dev_labels, **opts)
    else:
        loss = kdfast.kd_loss(s_in.view_of(s_base), t_in.view_of(t_base), dev_labels, **opts)

    def grad_output(like: torch.Tensor) -> torch.Tensor:
        if case.reduction == "none":
            w = row_weights if scaled else torch.ones(case.lead, dtype=torch.float64)
        else:
            w = torch.tensor(0.37 if scaled else 1.0, dtype=torch.float64)
        return w.to(device=like.device, dtype=like.dtype)

    backwards = 2 if case.mode.startswith("retain") else (1 if case.mode in GRAD_MODES else 0)
    for k in range(backwards):
        loss.backward(grad_output(loss), retain_graph=k + 1 < backwards)
    if device.startswith("cuda"):
        torch.cuda.synchronize()

    # --- the float64 reference on the CPU ---
    s_ref = s_in.view_of(s_in.base_cpu).double().detach().requires_grad_(need_s and backwards > 0)
    t_ref = t_in.view_of(t_in.base_cpu).double().detach().requires_grad_(need_t and backwards > 0)
    ref_opts = dict(opts)
    if "softcap" not in inspect.signature(kdfast.reference.kd_loss).parameters:
        ref_opts.pop("softcap", None)
    ref = kdfast.reference.kd_loss(s_ref, t_ref, labels, **ref_opts)

    problems = []
    acc = "fp64" if case.student == "fp64" else "fp32"
    want_dtype = torch.float64 if acc == "fp64" else torch.float32
    if loss.dtype != want_dtype:
        problems.append(f"loss dtype {loss.dtype}, expected {want_dtype}")
    if (why := _close(loss, ref, 1e-9 if acc == "fp64" else 2e-4)) is not None:
        problems.append(f"loss: {why}")
    ignored = labels == case.ignore_index if labels is not None else None
    if case.reduction == "none" and ignored is not None and (loss.detach().cpu()[ignored] != 0).any():
        problems.append("loss of an ignored row is not 0")
    if backwards:
        ref.backward(grad_output(ref))
    for name, base, inp, ref_leaf, needed in (("student", s_base, s_in, s_ref, need_s),
                                              ("teacher", t_base, t_in, t_ref, need_t)):
        if not (needed and backwards):
            if base.grad is not None:
                problems.append(f"{name} got a gradient it did not ask for")
            continue
        if base.grad is None:
            problems.append(f"{name}: no gradient")
            continue
        grad = base.grad.detach().cpu()
        in_view = torch.zeros(grad.shape, dtype=torch.bool)
        inp.view_of(in_view).fill_(True)
        if (grad[~in_view] != 0).any():
            problems.append(f"{name}: gradient written outside the view")
        grad_view = inp.view_of(grad)
        # a second backward (retain_graph) accumulates the same gradient again
        if (why := _close(grad_view, backwards * ref_leaf.grad, _tolerance(getattr(case, name)))) is not None:
            problems.append(f"{name} gradient: {why}")
        if ignored is not None and (grad_view[ignored] != 0).any():
            problems.append(f"{name}: gradient of an ignored row is not 0")
    return problems


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def run_cases(tag: str, cases: Sequence, run: Callable, device: str, seed: int, verbose: bool) -> int:
    """Runs every case (``run(case, device, seed) -> problems``), a crash in one not hiding
    the others; prints each failure and a summary line starting with ``tag``. Returns the
    exit status: 0 when every case passed, else 1."""
    start = time.perf_counter()
    failed = []
    for i, case in enumerate(cases):
        if verbose:
            print(f"[{i + 1}/{len(cases)}] {case.name}", flush=True)
        try:
            problems = run(case, device, seed + i)
        except Exception as exc:  # a crash in one case must not hide the others
            problems = [f"raised {type(exc).__name__}: {exc}".splitlines()[0]]
            if verbose:
                traceback.print_exc()
        if problems:
            failed.append(case)
            print(f"FAIL {case.name}: " + "; ".join(problems), flush=True)
    elapsed = time.perf_counter() - start
    print(f"{tag}: {len(cases)} cases on {device}, {len(failed)} failed, {elapsed:.1f} s")
    return 1 if failed else 0


def kernels_missing(device: str) -> list:
    """The kdfast::kd_loss* ops without a kernel for ``device`` (all of them when none is built)."""
    prefix = "kdfast::kd_loss"
    ops = sorted(o for o in torch._C._dispatch_get_all_op_names() if o.startswith(prefix))
    if not ops:
        return [f"{prefix}* (kdfast._C is not built)"]
    return [o for o in ops if not kdfast.has_kernel(o.split("::", 1)[1], device)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--quick", action="store_true", help="every third case only")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--allow-fallback", action="store_true",
                   help="run even when kdfast has no kernels for the device (the reference runs instead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each case before it runs (attributes sanitizer reports to cases)")
    args = p.parse_args(argv)

    cases = make_cases()
    if args.quick:
        cases = cases[::3]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_cases: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    missing = kernels_missing(args.device)
    if missing and not args.allow_fallback:
        print(f"gpu_sanitize_cases: no {args.device} kernel for {', '.join(missing)}; build kdfast with "
              f"its {args.device} kernels first (or pass --allow-fallback)", file=sys.stderr)
        return 2
    if not HAS_SOFTCAP:
        print("gpu_sanitize_cases: this kdfast.kd_loss has no softcap; skipping the softcap cases")

    return run_cases("gpu_sanitize_cases", cases, run_case, args.device, args.seed, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
