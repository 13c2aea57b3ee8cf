"""Benchmark of ``kdfast.dkd_loss`` (Decoupled KD) against eager PyTorch and ``torch.compile``.

Cases: classification (N=256, V=1000) and LLM shapes (N=4096, V=32000; a tiny N=64,
V=512 with ``--quick`` or ``--shapes tiny``), float32 and bfloat16, forward and
forward + backward, at the usual ``alpha=1, beta=8, T=4`` (``--dkd-alpha``,
``--dkd-beta``, ``--dkd-temperature``), one label per row, none ignored.

Decoupled KD (Zhao et al., CVPR 2022) splits KD into the target-class part (TCKD:
KL between the binary target / non-target distributions of teacher and student) and
the non-target part (NCKD: KL between the distributions over the non-target
classes, renormalised): ``T^2 * (alpha * TCKD + beta * NCKD)``, averaged over rows.

Providers:

- ``kdfast``: ``kdfast.dkd_loss`` (the compiled kernels; the plain-PyTorch
  reference, flagged in the notes, when they are not built; skipped, with the
  reason, where this kdfast has no ``dkd_loss``).
- ``eager``: DKD as it is written today, in the input dtype: ``F.softmax`` of both
  sides at ``T``, target and non-target masses through a one-hot boolean mask,
  TCKD as ``F.kl_div`` of the two-class distributions, NCKD as ``F.kl_div`` of
  softmaxes whose target logit is pushed down by a large offset (1000).
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``,
  compiled afresh per case; the first call (compile time) is reported apart.

No published library fuses DKD, so eager PyTorch and ``torch.compile`` are the
baselines. Every provider's loss is checked against a float64 reference written
from the formula (log-space, the non-target distribution renormalised directly).

Run it with ``python -m kdfast bench --op dkd`` (see ``--help``) or
``python benchmarks/bench_dkd.py``. It writes ``dkd.csv``, ``dkd.md``, ``dkd.png``
and ``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import dkd as bench
    >>> bench.main(["--quick", "--out", "/tmp/dkd-bench", "--providers", "eager", "-q"])
    0
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.bench import common, harness
from kdfast.bench.common import CaseTargets, Option
from kdfast.bench.harness import Case, Provider, Runner

NAME = "dkd"
OP = "dkd_loss"

SHAPES = {"cls": (256, 1000), "llm": (4096, 32000)}  # name -> (N, V)
QUICK_SHAPES = {"tiny": (64, 512)}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
PROVIDERS = ("kdfast", "eager", "torch.compile")

# The targets (2-core CPU, fp32, forward + backward, N=4096, V=32000).
TARGET_CASE = ("llm", "fp32", "fwd+bwd")
TARGET_SPEEDUP_VS_EAGER = 8.0
TARGET_SPEEDUP_VS_COMPILE = 2.0
TARGET_EXTRA_OVER_GRAD = 1.0  # + O(rows) statistics

# Subtracted from the target logit (after the division by T) so that its softmax
# probability is 0 and the softmax is over the non-target classes only.
NON_TARGET_OFFSET = 1000.0

# ---------------------------------------------------------------------------
# The eager baseline (also what torch.compile compiles) and the fp64 reference
# ---------------------------------------------------------------------------


def eager_dkd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
                   beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD as it is usually written in PyTorch (batchmean over rows)."""
    T = temperature
    target = torch.zeros_like(student, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    p_s = F.softmax(student / T, dim=1)
    p_t = F.softmax(teacher / T, dim=1)
    # two-class distributions: (target mass, non-target mass)
    b_s = torch.cat([(p_s * target).sum(1, keepdim=True), (p_s * ~target).sum(1, keepdim=True)], dim=1)
    b_t = torch.cat([(p_t * target).sum(1, keepdim=True), (p_t * ~target).sum(1, keepdim=True)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="batchmean")
    offset = NON_TARGET_OFFSET * target.to(student.dtype)
    log_q_nt = F.log_softmax(student / T - offset, dim=1)
    p_nt = F.softmax(teacher / T - offset, dim=1)
    nckd = F.kl_div(log_q_nt, p_nt, reduction="batchmean")
    return (alpha * tckd + beta * nckd) * T * T


def reference_rows(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                   beta: float, temperature: float) -> torch.Tensor:
    """Per-row DKD loss in float64, from the formula (every label a valid class)."""
    T = temperature
    log_q = torch.log_softmax(student.double() / T, dim=1)
    log_p = torch.log_softmax(teacher.double() / T, dim=1)
    idx = labels.unsqueeze(1)
    lq_y, lp_y = log_q.gather(1, idx).squeeze(1), log_p.gather(1, idx).squeeze(1)
    lq_rest, lp_rest = torch.log1p(-lq_y.exp()), torch.log1p(-lp_y.exp())  # log(1 - p_target)
    p_y = lp_y.exp()
    tckd = p_y * (lp_y - lq_y) + (1 - p_y) * (lp_rest - lq_rest)
    # non-target distributions: p_j / (1 - p_target) over j != target
    log_q_hat = log_q - lq_rest.unsqueeze(1)
    log_p_hat = log_p - lp_rest.unsqueeze(1)
    terms = log_p_hat.exp() * (log_p_hat - log_q_hat)
    nckd = terms.scatter(1, idx, 0.0).sum(1)
    return T * T * (alpha * tckd + beta * nckd)


REFERENCE_CHUNK_ROWS = 256  # float64 copies of a few rows at a time


def reference_loss(case: Case, inputs: dict) -> float:
    """The batchmean loss in float64 (the value every provider is checked against)."""
    o = dict(case.params)
    s, t, y = inputs["student"].detach(), inputs["teacher"], inputs["labels"]
    total = sum(float(reference_rows(s[i:i + REFERENCE_CHUNK_ROWS], t[i:i + REFERENCE_CHUNK_ROWS],
                                     y[i:i + REFERENCE_CHUNK_ROWS], **o).sum())
                for i in range(0, s.shape[0], REFERENCE_CHUNK_ROWS))
    return total / s.shape[0]


def loss_tolerance(dtype_name: str) -> float:
    return 1e-4 if dtype_name == "fp32" else 2e-2


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def _runner(case: Case, inputs: dict, loss_fn, note: str = "") -> Runner:
    o = dict(case.params)
    student, teacher, labels = inputs["student"], inputs["teacher"], inputs["labels"]
    return common.loss_runner(case, student, lambda: loss_fn(student, teacher, labels, **o), note)


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    return _runner(case, inputs, kdfast.dkd_loss, note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    return _runner(case, inputs, eager_dkd_loss)


def _build_compile(case: Case, inputs: dict) -> Runner:
    return _runner(case, inputs, common.compile_fresh(eager_dkd_loss))


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider(OP, "dkd_loss_fused", _build_kdfast),
    "eager": Provider("eager", _build_eager,
                      description="softmax at T, target / non-target masses via a one-hot mask, "
                                  "`F.kl_div` of the two-class distributions (TCKD) and of softmaxes "
                                  f"with the target logit offset by -{NON_TARGET_OFFSET:g} (NCKD)"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function under `torch.compile(dynamic=False)`"),
}

# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = common.DTYPES, modes: Sequence[str] = common.MODES,
               dkd_alpha: float = 1.0, dkd_beta: float = 8.0, dkd_temperature: float = 4.0) -> list:
    """The case list, shapes outermost so that cases sharing inputs run together."""
    if not (dkd_temperature > 0 and math.isfinite(dkd_temperature)):
        raise ValueError(f"--dkd-temperature: must be positive and finite, got {dkd_temperature}")
    params = (("alpha", dkd_alpha), ("beta", dkd_beta), ("temperature", dkd_temperature))
    cases = []
    for name in common.resolve_shapes(BENCH, device, quick, shapes):
        n, v = ALL_SHAPES[name]
        cases += common.shape_cases(OP, device, name, (n, v), dtypes=dtypes, modes=modes,
                                    input_elems=2 * n * v, grad_elems=n * v, params=params)
    return cases


def make_inputs(case: Case) -> dict:
    n, v = case.shape
    gen = torch.Generator(device=case.device).manual_seed(0)

    def logits():
        return (2 * torch.randn(n, v, generator=gen, device=case.device)).to(case.dtype)
    student, teacher = logits(), logits()
    labels = torch.randint(0, v, (n,), generator=gen, device=case.device)
    return {"student": student.requires_grad_(True), "teacher": teacher, "labels": labels}


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _target_spec() -> CaseTargets:
    n, v = SHAPES[TARGET_CASE[0]]
    return CaseTargets(*TARGET_CASE, f"N={n} V={v} fp32 T=4 fwd+bwd",
                       vs_eager=TARGET_SPEEDUP_VS_EAGER, vs_compile=TARGET_SPEEDUP_VS_COMPILE,
                       extra_over_grad=TARGET_EXTRA_OVER_GRAD, row_elems=v)


TARGETS = (_target_spec(),)


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """The targets as ``(name, measured, goal, passed)``; passed is None when not measured.

    CPU, N=4096, V=32000, fp32, forward + backward: >= 8x eager and >= 2x
    torch.compile. Every device: peak extra memory of that case at most the gradient
    plus 64 bytes per row.
    """
    return common.check_case_targets(rows, device, TARGETS)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


OPTIONS = (
    Option("--dkd-alpha", 1.0, "dkd: weight of TCKD (default 1.0)", type=float, metavar="ALPHA"),
    Option("--dkd-beta", 8.0, "dkd: weight of NCKD (default 8.0)", type=float, metavar="BETA"),
    Option("--dkd-temperature", 4.0, "dkd: softmax temperature (default 4.0)", type=float, metavar="T"),
)


def _notes(o: dict) -> list:
    return [f"loss: alpha={o['dkd_alpha']:g}, beta={o['dkd_beta']:g}, T={o['dkd_temperature']:g}, "
            "batchmean, no ignored rows; eager and torch.compile compute in the input dtype (the usual "
            "code), kdfast in fp32",
            "no published library fuses DKD: eager PyTorch and torch.compile are the baselines",
            "loss checked against a float64 reference written from the formula"]


BENCH = common.OpBench(
    name=NAME, op=OP,
    summary="kdfast.dkd_loss (Decoupled KD: T^2 (alpha TCKD + beta NCKD)) against eager PyTorch and "
            "torch.compile.",
    shapes=SHAPES, quick_shapes=QUICK_SHAPES, dim_names=("N", "V"), providers=ALL_PROVIDERS,
    options=OPTIONS, make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name="the fp64 reference", loss_tolerance=loss_tolerance, check_targets=check_targets,
    notes=_notes, memory_column=common.GRAD_MEMORY_COLUMN)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-dkd")


if __name__ == "__main__":
    sys.exit(main())
