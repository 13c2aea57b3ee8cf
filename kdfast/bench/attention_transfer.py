"""Benchmark of ``kdfast.attention_transfer_loss`` against eager PyTorch and ``torch.compile``.

Cases: ``[N, C, H, W]`` feature maps of the same shape for student and teacher: a
small CNN stage (N=32, C=64, 32x32) and a ResNet-50 first stage (N=64, C=256, 56x56;
a tiny N=4, C=16, 8x8 with ``--quick`` or ``--shapes tiny``), float32 and bfloat16,
forward and forward + backward, ``p=2`` unless told otherwise (``--at-p``).

Providers:

- ``kdfast``: ``kdfast.attention_transfer_loss`` (the compiled kernels; the
  plain-PyTorch reference, flagged in the notes, when they are not built; skipped,
  with the reason, where this kdfast has no ``attention_transfer_loss``).
- ``eager``: attention transfer as it is written today, in the input dtype:
  ``at(x) = F.normalize(x.pow(p).mean(1).flatten(1))`` (``x.abs().pow(p)`` for
  ``p != 2``) and ``(at(s) - at(t)).pow(2).mean()``.
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``,
  compiled afresh per case; the first call (compile time) is reported apart.

No published library fuses attention transfer, so eager PyTorch and
``torch.compile`` are the baselines. Every provider's loss is checked against a
float64 reference written from the formula.

Run it with ``python -m kdfast bench --op attention_transfer`` (see ``--help``) or
``python benchmarks/bench_attention_transfer.py``. It writes ``attention_transfer.csv``,
``attention_transfer.md``, ``attention_transfer.png`` and ``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import attention_transfer as bench
    >>> bench.main(["--quick", "--out", "/tmp/at-bench", "--providers", "eager", "-q"])
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

NAME = "attention_transfer"
OP = "attention_transfer_loss"

SHAPES = {"small": (32, 64, 32, 32), "resnet": (64, 256, 56, 56)}  # name -> (N, C, H, W)
QUICK_SHAPES = {"tiny": (4, 16, 8, 8)}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
PROVIDERS = ("kdfast", "eager", "torch.compile")

# The targets (2-core CPU, fp32, forward + backward, N=64, C=256, 56x56).
TARGET_CASE = ("resnet", "fp32", "fwd+bwd")
TARGET_SPEEDUP_VS_EAGER = 3.0
TARGET_SPEEDUP_VS_COMPILE = 1.5
TARGET_EXTRA_OVER_GRAD = 1.0  # + O(N * H * W) attention statistics

# ---------------------------------------------------------------------------
# The eager baseline (also what torch.compile compiles) and the fp64 reference
# ---------------------------------------------------------------------------


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, H * W]``: the channel mean of ``|x|^p``, L2-normalised per sample."""
    xp = x.pow(2) if p == 2 else x.abs().pow(p)
    return F.normalize(xp.mean(1).flatten(1), dim=1)


def eager_attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor,
                                  p: float = 2.0) -> torch.Tensor:
    """Attention transfer as it is usually written in PyTorch."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def reference_sum(student: torch.Tensor, teacher: torch.Tensor, p: float) -> float:
    """Sum over samples and positions of ``(a_s - a_t)^2`` in float64, from the formula."""
    def a(x):
        m = x.double().abs().pow(p).mean(dim=1).reshape(x.shape[0], -1)
        return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((a(student) - a(teacher)).pow(2).sum())


REFERENCE_CHUNK_SAMPLES = 8  # float64 copies of a few samples at a time


def reference_loss(case: Case, inputs: dict) -> float:
    """The loss in float64 (the value every provider is checked against)."""
    p = dict(case.params)["p"]
    s, t = inputs["student"].detach(), inputs["teacher"]
    total = sum(reference_sum(s[i:i + REFERENCE_CHUNK_SAMPLES], t[i:i + REFERENCE_CHUNK_SAMPLES], p)
                for i in range(0, s.shape[0], REFERENCE_CHUNK_SAMPLES))
    return total / (s.shape[0] * math.prod(s.shape[2:]))


def loss_tolerance(dtype_name: str) -> float:
    return 1e-4 if dtype_name == "fp32" else 2e-2


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def _runner(case: Case, inputs: dict, loss_fn, note: str = "") -> Runner:
    p, student, teacher = dict(case.params)["p"], inputs["student"], inputs["teacher"]
    return common.loss_runner(case, student, lambda: loss_fn(student, teacher, p=p), note)


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    return _runner(case, inputs, kdfast.attention_transfer_loss, note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    return _runner(case, inputs, eager_attention_transfer_loss)


def _build_compile(case: Case, inputs: dict) -> Runner:
    return _runner(case, inputs, common.compile_fresh(eager_attention_transfer_loss))


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider(OP, "attention_transfer_fused", _build_kdfast),
    "eager": Provider("eager", _build_eager,
                      description="`(at(s) - at(t)).pow(2).mean()` with "
                                  "`at(x) = F.normalize(x.pow(p).mean(1).flatten(1))`"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function under `torch.compile(dynamic=False)`"),
}

# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = common.DTYPES, modes: Sequence[str] = common.MODES,
               at_p: float = 2.0) -> list:
    """The case list, shapes outermost so that cases sharing inputs run together."""
    if not (at_p > 0 and math.isfinite(at_p)):
        raise ValueError(f"--at-p: must be positive and finite, got {at_p}")
    cases = []
    for name in common.resolve_shapes(BENCH, device, quick, shapes):
        shape = ALL_SHAPES[name]
        elems = math.prod(shape)
        cases += common.shape_cases(OP, device, name, shape, dtypes=dtypes, modes=modes,
                                    input_elems=2 * elems, grad_elems=elems, params=(("p", at_p),))
    return cases


def make_inputs(case: Case) -> dict:
    gen = torch.Generator(device=case.device).manual_seed(0)
    student = torch.randn(case.shape, generator=gen, device=case.device).to(case.dtype)
    teacher = torch.randn(case.shape, generator=gen, device=case.device).to(case.dtype)
    return {"student": student.requires_grad_(True), "teacher": teacher}


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _target_spec() -> CaseTargets:
    n, c, h, w = SHAPES[TARGET_CASE[0]]
    # a "row" here is one (sample, position): the attention maps are [N, H * W]; four
    # fp32 values per position (e.g. both maps and their channel sums) are allowed
    return CaseTargets(*TARGET_CASE, f"N={n} C={c} {h}x{w} fp32 p=2 fwd+bwd",
                       vs_eager=TARGET_SPEEDUP_VS_EAGER, vs_compile=TARGET_SPEEDUP_VS_COMPILE,
                       extra_over_grad=TARGET_EXTRA_OVER_GRAD, row_elems=c, stats_bytes_per_row=16)


TARGETS = (_target_spec(),)


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """The targets as ``(name, measured, goal, passed)``; passed is None when not measured.

    CPU, N=64, C=256, 56x56, fp32, forward + backward: >= 3x eager and >= 1.5x
    torch.compile. Every device: peak extra memory of that case at most the
    gradient plus 16 bytes per (sample, position).
    """
    return common.check_case_targets(rows, device, TARGETS)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


OPTIONS = (
    Option("--at-p", 2.0, "attention_transfer: exponent p of |x|^p (default 2)", type=float, metavar="P"),
)


def _notes(o: dict) -> list:
    return [f"loss: p={o['at_p']:g}, student and teacher of the same shape; eager and torch.compile "
            "compute in the input dtype (the usual code), kdfast in fp32",
            "no published library fuses attention transfer: eager PyTorch and torch.compile are the "
            "baselines",
            "loss checked against a float64 reference written from the formula"]


BENCH = common.OpBench(
    name=NAME, op=OP,
    summary="kdfast.attention_transfer_loss (attention transfer of [N, C, H, W] feature maps) against "
            "eager PyTorch and torch.compile.",
    shapes=SHAPES, quick_shapes=QUICK_SHAPES, dim_names=("N", "C", "H", "W"), providers=ALL_PROVIDERS,
    options=OPTIONS, make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name="the fp64 reference", loss_tolerance=loss_tolerance, check_targets=check_targets,
    notes=_notes, memory_column=common.GRAD_MEMORY_COLUMN)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-attention-transfer")


if __name__ == "__main__":
    sys.exit(main())
