"""Benchmark of ``kdfast.sparse_kd_loss`` (distillation from a top-k teacher) against the
dense ``kdfast.kd_loss``, eager PyTorch and ``torch.compile``.

Cases: an LLM shape (N=4096 rows, V=32000, K=64 teacher entries per row; a tiny N=64,
V=512, K=16 with ``--quick`` or ``--shapes tiny``), float32 and bfloat16 students,
forward and forward + backward, for each tail (``--sparse-tails``, default both: the
case names end in ``-renormalize`` / ``-residual``), at temperature 2
(``--sparse-temperature``). The teacher is the top K of random teacher logits with their
full-vocabulary log-probabilities at T, in float32 (what ``kdfast.topk_logits`` stores).

Providers:

- ``kdfast``: ``kdfast.sparse_kd_loss(student, indices, logprobs, temperature=T,
  tail=...)`` (the compiled kernels; the plain-PyTorch reference, flagged in the notes,
  when they are not built).
- ``kdfast-dense``: ``kdfast.kd_loss(student, teacher_logits, temperature=T)``, the fused
  dense loss on the full teacher logits the top K were taken from: what the sparse
  teacher replaces (its loss is the dense KL, so it is not checked against the sparse
  reference).
- ``eager``: the sparse loss as it is written in PyTorch today, in the student's dtype:
  ``log_softmax(student / T)`` gathered at the indices, the teacher renormalised (or the
  residual term with ``r_s = 1 - sum of the gathered probabilities``).
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``, compiled
  afresh per case; the first call (compile time) is reported apart.

Every sparse provider's loss is checked against a float64 reference written from the
formula. Run it with ``python -m kdfast bench --op sparse_kd`` (see ``--help``) or
``python benchmarks/bench_sparse_kd.py``. It writes ``sparse_kd.csv``, ``sparse_kd.md``,
``sparse_kd.png`` and ``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import sparse_kd as bench
    >>> bench.main(["--quick", "--out", "/tmp/sparse-bench", "--providers", "eager", "-q"])
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

NAME = "sparse_kd"
OP = "sparse_kd_loss"

SHAPES = {"llm": (4096, 32000, 64)}  # name -> (N, V, K)
QUICK_SHAPES = {"tiny": (64, 512, 16)}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
TAILS = ("renormalize", "residual")
PROVIDERS = ("kdfast", "kdfast-dense", "eager", "torch.compile")

# The targets (2-core CPU, fp32, forward + backward, N=4096, V=32000, K=64), each tail.
TARGET_SHAPE, TARGET_DTYPE, TARGET_MODE = "llm", "fp32", "fwd+bwd"
TARGET_SPEEDUP_VS_DENSE = 1.5
TARGET_EXTRA_OVER_GRAD = 1.05

# ---------------------------------------------------------------------------
# The eager baseline (also what torch.compile compiles) and the fp64 reference
# ---------------------------------------------------------------------------


def eager_sparse_kd_loss(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                         temperature: float = 2.0, tail: str = "renormalize") -> torch.Tensor:
    """Sparse-teacher KD as it is usually written in PyTorch (batchmean over rows; every
    index a real token, as top-k gives them)."""
    T = temperature
    log_q = F.log_softmax(student / T, dim=-1).gather(-1, indices)
    p = logprobs.exp()
    if tail == "renormalize":
        mass = p.sum(-1, keepdim=True)
        d = (p / mass * (logprobs - mass.log() - log_q)).sum(-1)
    else:
        r_t = (1 - p.sum(-1)).clamp(min=0)
        r_s = (1 - log_q.exp().sum(-1)).clamp(min=1e-30)
        d = (p * (logprobs - log_q)).sum(-1) + r_t * (r_t.clamp(min=1e-30).log() - r_s.log())
    return d.mean() * T * T


def reference_rows(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, temperature: float,
                   tail: str) -> torch.Tensor:
    """Per-row divergence times T^2, float64, from the formula (no padding)."""
    log_q_all = torch.log_softmax(student.double() / temperature, dim=-1)
    log_q = log_q_all.gather(-1, indices)
    lp = logprobs.double()
    p = lp.exp()
    mass = p.sum(-1)
    if tail == "renormalize":
        d = (p / mass[:, None] * (lp - mass.log()[:, None] - log_q)).sum(-1)
    else:
        r_t = (1 - mass).clamp(min=0)
        # the student's mass off the support, summed directly
        r_s = log_q_all.exp().scatter(-1, indices, 0.0).sum(-1)
        d = (p * (lp - log_q)).sum(-1) + torch.where(r_t > 0, r_t * (r_t.log() - r_s.log()), 0.0)
    return d * temperature**2


REFERENCE_CHUNK_ROWS = 256  # float64 copies of a few rows at a time


def reference_loss(case: Case, inputs: dict) -> float:
    """The batchmean loss in float64 (the value every sparse provider is checked against)."""
    o = dict(case.params)
    s, idx, lp = inputs["student"].detach(), inputs["indices"], inputs["logprobs"]
    step = REFERENCE_CHUNK_ROWS
    total = sum(float(reference_rows(s[i:i + step], idx[i:i + step], lp[i:i + step], o["temperature"],
                                     o["tail"]).sum())
                for i in range(0, s.shape[0], step))
    return total / s.shape[0]


def loss_tolerance(dtype_name: str) -> float:
    return 1e-4 if dtype_name == "fp32" else 2e-2


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def _sparse_runner(case: Case, inputs: dict, loss_fn, note: str = "") -> Runner:
    o = dict(case.params)
    student, idx, lp = inputs["student"], inputs["indices"], inputs["logprobs"]
    return common.loss_runner(case, student,
                              lambda: loss_fn(student, idx, lp, temperature=o["temperature"], tail=o["tail"]),
                              note)


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    return _sparse_runner(case, inputs, kdfast.sparse_kd_loss, note)


def _build_dense(case: Case, inputs: dict) -> Runner:
    import kdfast

    o = dict(case.params)
    student, teacher = inputs["student"], inputs["teacher"]
    note = ""
    if not kdfast.has_kernel("kd_loss_fused", case.device.split(":")[0]):
        note = "kdfast ran its plain-PyTorch reference (no compiled kernel for this device)"
    dense = common.loss_runner(case, student,
                               lambda: kdfast.kd_loss(student, teacher, temperature=o["temperature"]), note)

    def step():
        dense.step()  # the dense KL is another loss: no value to check against the sparse reference

    return Runner(step=step, reset=dense.reset, note=dense.note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    return _sparse_runner(case, inputs, eager_sparse_kd_loss)


def _build_compile(case: Case, inputs: dict) -> Runner:
    return _sparse_runner(case, inputs, common.compile_fresh(eager_sparse_kd_loss))


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider(OP, "sparse_kd_loss_fused", _build_kdfast),
    "kdfast-dense": Provider("kdfast-dense", _build_dense,
                             description="`kdfast.kd_loss` on the dense teacher logits (forward KL)"),
    "eager": Provider("eager", _build_eager,
                      description="`log_softmax(s / T)` gathered at the teacher's indices, the teacher "
                                  "renormalised over them (residual: plus `r_t log(r_t / r_s)`, "
                                  "`r_s = 1 - sum q`), in the student's dtype"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function under `torch.compile(dynamic=False)`"),
}

# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------


def _check_tails(tails: Sequence[str]) -> list:
    tails = [tails] if isinstance(tails, str) else list(tails)
    unknown = [t for t in tails if t not in TAILS]
    if unknown or not tails:
        raise ValueError(f"--sparse-tails: choose from {', '.join(TAILS)}, got {','.join(tails)}")
    return tails


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = common.DTYPES, modes: Sequence[str] = common.MODES,
               sparse_temperature: float = 2.0, sparse_tails: Sequence[str] = TAILS) -> list:
    """The case list, shapes outermost (tails next) so that cases sharing inputs run together."""
    if not (sparse_temperature > 0 and math.isfinite(sparse_temperature)):
        raise ValueError(f"--sparse-temperature: must be positive and finite, got {sparse_temperature}")
    cases = []
    for name in common.resolve_shapes(BENCH, device, quick, shapes):
        n, v, k = ALL_SHAPES[name]
        for tail in _check_tails(sparse_tails):
            params = (("temperature", sparse_temperature), ("tail", tail), ("k", k))
            # forward reads the student (and K entries per row); forward + backward also
            # writes the gradient
            cases += common.shape_cases(OP, device, f"{name}-{tail}", (n, v), dtypes=dtypes, modes=modes,
                                        input_elems=n * v, grad_elems=n * v, params=params)
    return cases


def make_inputs(case: Case) -> dict:
    n, v = case.shape
    o = dict(case.params)
    gen = torch.Generator(device=case.device).manual_seed(0)
    student = (2 * torch.randn(n, v, generator=gen, device=case.device)).to(case.dtype)
    teacher = (2 * torch.randn(n, v, generator=gen, device=case.device)).to(case.dtype)
    indices = torch.empty(n, o["k"], dtype=torch.int64, device=case.device)
    logprobs = torch.empty(n, o["k"], dtype=torch.float32, device=case.device)
    for i in range(0, n, REFERENCE_CHUNK_ROWS):  # top-k with full-vocabulary log-probabilities
        rows = teacher[i:i + REFERENCE_CHUNK_ROWS].float()
        top = torch.topk(rows, o["k"], dim=-1).indices
        indices[i:i + REFERENCE_CHUNK_ROWS] = top
        logprobs[i:i + REFERENCE_CHUNK_ROWS] = torch.log_softmax(rows / o["temperature"], -1).gather(-1, top)
    return {"student": student.requires_grad_(True), "teacher": teacher, "indices": indices,
            "logprobs": logprobs}


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """The targets as ``(name, measured, goal, passed)``; passed is None when not measured.

    For each tail measured, N=4096, V=32000, K=64, fp32, forward + backward: on CPU at
    least 1.5x faster than the dense ``kdfast.kd_loss``; on every device, peak extra
    memory at most 1.05x the student's gradient (no dense teacher, no [N, V] float32
    temporary; the O(rows) statistics included).
    """
    targets = []
    n, v, k = SHAPES[TARGET_SHAPE]
    for tail in TAILS:
        case = f"{TARGET_SHAPE}-{tail}"
        if not any(r.case == case for r in rows):
            continue
        key = (case, TARGET_DTYPE, TARGET_MODE)
        label = f"N={n} V={v} K={k} fp32 {tail} fwd+bwd"
        if not device.startswith("cuda"):
            targets.append(common.target(f"CPU {label}: speed-up vs dense kdfast.kd_loss",
                                         common.speedup(rows, "kdfast-dense", key), ".2f",
                                         TARGET_SPEEDUP_VS_DENSE, True))
        spec = CaseTargets(case, TARGET_DTYPE, TARGET_MODE, label, extra_over_grad=TARGET_EXTRA_OVER_GRAD,
                           row_elems=v, stats_bytes_per_row=0)
        targets += common.check_case_targets(rows, device, [spec])
    return targets


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


OPTIONS = (
    Option("--sparse-temperature", 2.0, "sparse_kd: softmax temperature (default 2.0)", type=float,
           metavar="T"),
    Option("--sparse-tails", list(TAILS),
           "sparse_kd: comma-separated tails, renormalize,residual (default both)",
           type=common.csv_list(TAILS), metavar="TAIL[,TAIL]"),
)


def _notes(o: dict) -> list:
    return [f"loss: T={o['sparse_temperature']:g}, batchmean; teacher: the top K of random logits with "
            "their full-vocabulary log-probabilities at T, float32; tails: " + ", ".join(o["sparse_tails"]),
            "eager and torch.compile compute in the student's dtype (the usual code), kdfast in fp32",
            "`kdfast-dense` is the fused dense loss on the whole teacher row (what a top-K cache "
            "replaces); its loss is the dense KL, so it is not checked against the sparse reference",
            "sparse losses checked against a float64 reference written from the formula"]


BENCH = common.OpBench(
    name=NAME, op=OP,
    summary="kdfast.sparse_kd_loss (distillation from a top-K teacher) against the dense kdfast.kd_loss, "
            "eager PyTorch and torch.compile.",
    shapes=SHAPES, quick_shapes=QUICK_SHAPES, dim_names=("N", "V", "K"), providers=ALL_PROVIDERS,
    options=OPTIONS, make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name="the fp64 reference", loss_tolerance=loss_tolerance, check_targets=check_targets,
    notes=_notes, memory_column=common.GRAD_MEMORY_COLUMN)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-sparse-kd")


if __name__ == "__main__":
    sys.exit(main())
