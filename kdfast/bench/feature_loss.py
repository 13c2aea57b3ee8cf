"""Benchmark of ``kdfast.feature_loss`` against eager PyTorch and ``torch.compile``.

Cases: ``[N, D]`` features of a small model (N=512, D=768) and of an LLM's hidden
states (N=8192 tokens, D=4096; a tiny N=64, D=128 with ``--quick`` or ``--shapes
tiny``), float32 and bfloat16, forward and forward + backward, mean reduction, no
mask. Each shape runs every loss of ``--feature-kinds`` (a case is named
``<shape>-<kind>``): ``cosine-norm`` (``kind="cosine", normalize=True``), ``mse``,
``l1`` and ``smooth_l1`` by default; ``cosine`` and ``mse-norm`` on request.

Providers:

- ``kdfast``: ``kdfast.feature_loss`` (the compiled kernels; the plain-PyTorch
  reference, flagged in the notes, when they are not built; skipped, with the
  reason, where this kdfast has no ``feature_loss``).
- ``eager``: what is written today, in the input dtype: ``F.mse_loss(s, t)``,
  ``F.l1_loss``, ``F.smooth_l1_loss`` and ``1 - F.cosine_similarity(s, t,
  dim=-1).mean()``, after ``F.normalize(., dim=-1)`` of both sides for the
  ``-norm`` kinds.
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``,
  compiled afresh per case; the first call (compile time) is reported apart.

No published library fuses these losses (they are a few lines of PyTorch), so
eager PyTorch and ``torch.compile`` are the baselines. Every provider's loss is
checked against a float64 reference written from the formulas.

Run it with ``python -m kdfast bench --op feature_loss`` (see ``--help``) or
``python benchmarks/bench_feature_loss.py``. It writes ``feature_loss.csv``,
``feature_loss.md``, ``feature_loss.png`` and ``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import feature_loss as bench
    >>> bench.main(["--quick", "--out", "/tmp/feature-bench", "--providers", "eager",
    ...             "--feature-kinds", "cosine-norm", "-q"])
    0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.bench import common, harness
from kdfast.bench.common import CaseTargets, Option
from kdfast.bench.harness import Case, Provider, Runner

NAME = "feature_loss"
OP = "feature_loss"

SHAPES = {"small": (512, 768), "tokens": (8192, 4096)}  # name -> (N, D)
QUICK_SHAPES = {"tiny": (64, 128)}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
# name of a case's loss -> (kind, normalize)
KINDS = {
    "cosine-norm": ("cosine", True),
    "mse": ("mse", False),
    "l1": ("l1", False),
    "smooth_l1": ("smooth_l1", False),
    "cosine": ("cosine", False),
    "mse-norm": ("mse", True),
}
DEFAULT_KINDS = ("cosine-norm", "mse", "l1", "smooth_l1")
PROVIDERS = ("kdfast", "eager", "torch.compile")

# The targets (2-core CPU, fp32, forward + backward, N=8192 tokens, D=4096).
TARGET_COSINE_SPEEDUP_VS_EAGER = 3.0
TARGET_COSINE_SPEEDUP_VS_COMPILE = 1.5
TARGET_PLAIN_SPEEDUP_VS_COMPILE = 1.0  # mse and l1: no slower than torch.compile
TARGET_EXTRA_OVER_GRAD = 1.0  # + O(rows) statistics

# ---------------------------------------------------------------------------
# The eager baseline (also what torch.compile compiles) and the fp64 reference
# ---------------------------------------------------------------------------


def eager_feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
                       normalize: bool = False) -> torch.Tensor:
    """Feature matching as it is usually written in PyTorch (mean reduction)."""
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "l1":
        return F.l1_loss(student, teacher)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student, teacher)
    if kind == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
    raise ValueError(f"kind: unknown {kind!r}")


def reference_sum(student: torch.Tensor, teacher: torch.Tensor, kind: str, normalize: bool) -> float:
    """Sum of the per-element (mse, l1, smooth_l1) or per-row (cosine) losses of ``[rows, D]``
    features, in float64, from the formulas."""
    s, t = student.double(), teacher.double()
    if normalize:
        s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if kind == "cosine":
        cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)).clamp_min(1e-8)
        return float((1 - cos).sum())
    d = s - t
    if kind == "mse":
        return float((d * d).sum())
    if kind == "l1":
        return float(d.abs().sum())
    if kind == "smooth_l1":  # beta = 1
        return float(torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).sum())
    raise ValueError(f"kind: unknown {kind!r}")


REFERENCE_CHUNK_ROWS = 1024  # float64 copies of a few rows at a time, not of the whole input


def reference_loss(case: Case, inputs: dict) -> float:
    """The mean loss in float64 (the value every provider is checked against)."""
    o = dict(case.params)
    s, t = inputs["student"].detach(), inputs["teacher"]
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    total = sum(reference_sum(s2[i:i + REFERENCE_CHUNK_ROWS], t2[i:i + REFERENCE_CHUNK_ROWS],
                              o["kind"], o["normalize"])
                for i in range(0, s2.shape[0], REFERENCE_CHUNK_ROWS))
    return total / (s2.shape[0] if o["kind"] == "cosine" else s2.numel())


def loss_tolerance(dtype_name: str) -> float:
    return 1e-4 if dtype_name == "fp32" else 2e-2


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def _runner(case: Case, inputs: dict, loss_fn, note: str = "") -> Runner:
    o, student, teacher = dict(case.params), inputs["student"], inputs["teacher"]
    return common.loss_runner(
        case, student, lambda: loss_fn(student, teacher, kind=o["kind"], normalize=o["normalize"]), note)


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    return _runner(case, inputs, kdfast.feature_loss, note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    return _runner(case, inputs, eager_feature_loss)


def _build_compile(case: Case, inputs: dict) -> Runner:
    return _runner(case, inputs, common.compile_fresh(eager_feature_loss))


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider(OP, "feature_loss_fused", _build_kdfast),
    "eager": Provider("eager", _build_eager,
                      description="`F.mse_loss` / `F.l1_loss` / `F.smooth_l1_loss` / "
                                  "`1 - F.cosine_similarity(s, t, dim=-1).mean()`, after `F.normalize` "
                                  "for the -norm kinds"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function under `torch.compile(dynamic=False)`"),
}

# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = common.DTYPES, modes: Sequence[str] = common.MODES,
               feature_kinds: Sequence[str] = DEFAULT_KINDS) -> list:
    """The case list, shapes outermost, then losses, dtypes and modes."""
    unknown = [k for k in feature_kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"--feature-kinds: unknown {unknown}; choose from {list(KINDS)}")
    cases = []
    for shape in common.resolve_shapes(BENCH, device, quick, shapes):
        n, d = ALL_SHAPES[shape]
        for name in feature_kinds:
            kind, normalize = KINDS[name]
            cases += common.shape_cases(OP, device, f"{shape}-{name}", (n, d), dtypes=dtypes, modes=modes,
                                        input_elems=2 * n * d, grad_elems=n * d,
                                        params=(("kind", kind), ("normalize", normalize)))
    return cases


def make_inputs(case: Case) -> dict:
    """Unit-variance features; the teacher's correlate with the student's (cosine about 0.8)."""
    gen = torch.Generator(device=case.device).manual_seed(0)
    student = torch.randn(case.shape, generator=gen, device=case.device)
    teacher = 0.8 * student + 0.6 * torch.randn(case.shape, generator=gen, device=case.device)
    return {"student": student.to(case.dtype).requires_grad_(True), "teacher": teacher.to(case.dtype)}


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _tokens_target(kind: str, label: str, **goals) -> CaseTargets:
    n, d = SHAPES["tokens"]
    return CaseTargets(f"tokens-{kind}", "fp32", "fwd+bwd", f"N={n} D={d} fp32 {label} fwd+bwd",
                       extra_over_grad=TARGET_EXTRA_OVER_GRAD, row_elems=d, **goals)


TARGETS = (
    _tokens_target("cosine-norm", "cosine normalize=True", vs_eager=TARGET_COSINE_SPEEDUP_VS_EAGER,
                   vs_compile=TARGET_COSINE_SPEEDUP_VS_COMPILE),
    _tokens_target("mse", "mse", vs_compile=TARGET_PLAIN_SPEEDUP_VS_COMPILE),
    _tokens_target("l1", "l1", vs_compile=TARGET_PLAIN_SPEEDUP_VS_COMPILE),
)


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """The targets as ``(name, measured, goal, passed)``; passed is None when not measured.

    CPU, N=8192, D=4096, fp32, forward + backward: cosine with ``normalize=True``
    >= 3x eager and >= 1.5x torch.compile; mse and l1 no slower than torch.compile.
    Every device: peak extra memory of those cases at most the gradient plus 64 bytes
    per row.
    """
    return common.check_case_targets(rows, device, TARGETS)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


OPTIONS = (
    Option("--feature-kinds", list(DEFAULT_KINDS),
           "comma-separated feature losses: cosine-norm (kind=cosine, normalize=True), mse, l1, smooth_l1, "
           f"cosine, mse-norm (default {','.join(DEFAULT_KINDS)})",
           type=common.csv_list(list(KINDS)), metavar="KIND[,KIND...]"),
)


def _notes(o: dict) -> list:
    return [f"loss: {', '.join(o['feature_kinds'])}; reduction mean, no mask; eager and torch.compile "
            "compute in the input dtype (the usual code), kdfast in fp32",
            "no published library fuses feature-matching losses: eager PyTorch and torch.compile are "
            "the baselines",
            "loss checked against a float64 reference written from the formulas"]


BENCH = common.OpBench(
    name=NAME, op=OP,
    summary="kdfast.feature_loss (mse / l1 / smooth_l1 / cosine feature matching) against eager "
            "PyTorch and torch.compile.",
    shapes=SHAPES, quick_shapes=QUICK_SHAPES, dim_names=("N", "D"), providers=ALL_PROVIDERS,
    options=OPTIONS, make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name="the fp64 reference", loss_tolerance=loss_tolerance, check_targets=check_targets,
    notes=_notes, memory_column=common.GRAD_MEMORY_COLUMN)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-feature-loss")


if __name__ == "__main__":
    sys.exit(main())
