"""Benchmark of ``kdfast.kd_loss`` against eager PyTorch, ``torch.compile`` and Liger-Kernel.

Cases: classification (N=256, V=1000) and LLM shapes (N=4096, V=32000; on GPU also
N=8192, V=128256; a tiny N=64, V=512 with ``--quick`` or ``--shapes tiny``), float32
and bfloat16, forward and forward + backward, at temperature 2 with pure soft-target KD
(``alpha=0``) unless told otherwise.

Providers:

- ``kdfast``: ``kdfast.kd_loss`` (the compiled kernels; the plain-PyTorch
  reference, flagged in the notes, when the extension is not built).
- ``eager``: the usual ``F.kl_div(F.log_softmax(s / T), F.softmax(t / T),
  reduction="batchmean") * T * T`` (+ cross-entropy when ``alpha > 0``), in the
  input dtype.
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``,
  compiled afresh per case; the first call (compile time) is reported apart.
- ``liger``: ``liger_kernel``'s KL-divergence (``jsd`` for ``--divergence jsd``)
  fed by ``log_softmax`` / ``softmax`` in PyTorch; needs Triton and a GPU, so it
  is skipped (with a note) when it cannot be imported or on CPU.

Run it with ``python -m kdfast bench`` (kd_loss is the default ``--op``; see
``--help``) or ``python benchmarks/bench_kd_loss.py``. It writes ``kd_loss.csv``, ``kd_loss.md``,
``kd_loss.png`` (skipped with a note when matplotlib is not installed) and
``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import kd_loss as bench
    >>> bench.main(["--quick", "--out", "/tmp/kd-bench", "--providers", "kdfast,eager"])
    0
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.bench import common, harness
from kdfast.bench.common import Option, resolve_device, targets_markdown  # noqa: F401 (re-exported)
from kdfast.bench.harness import Case, Provider, Runner

OP = "kd_loss"

# name -> (N, V, needs a GPU)
SHAPES = {
    "cls": (256, 1000, False),
    "llm": (4096, 32000, False),
    "llm-large": (8192, 128256, True),
}
QUICK_SHAPES = {"tiny": (64, 512, False)}  # --quick runs these; --shapes tiny selects it anywhere
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
MODES = common.MODES
DTYPES = common.DTYPES
PROVIDERS = ("kdfast", "eager", "torch.compile", "liger")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# The targets, checked in every run's markdown (see check_targets).
CPU_TARGET_CASE = ("llm", "fp32", "fwd+bwd")  # N=4096, V=32000, T=2
CPU_FORWARD_TARGET_CASE = ("llm", "fp32", "fwd")
GPU_TARGET_CASE = ("llm-large", "bf16", "fwd+bwd")  # N=8192, V=128256
SMALL_TARGET_SHAPES = ("cls", "tiny")  # every dtype and mode measured for them
TARGET_SPEEDUP_VS_EAGER = 12.0  # CPU target case
TARGET_SPEEDUP_VS_COMPILE = 3.0  # CPU target case
TARGET_FWD_SPEEDUP_VS_COMPILE = 4.0  # CPU forward only
TARGET_SMALL_SPEEDUP_VS_EAGER = 1.5
TARGET_SMALL_SPEEDUP_VS_COMPILE = 1.0  # no slower than torch.compile
TARGET_EXTRA_OVER_GRAD = 1.05  # peak extra memory of the target case / bytes of the gradient
TARGET_GPU_TIME_OVER_FLOOR = 1.5  # time / (6*N*V bytes at the measured copy bandwidth)
TARGET_GPU_SPEEDUP_VS_LIGER = 3.0


# ---------------------------------------------------------------------------
# The eager baseline (also what torch.compile compiles)
# ---------------------------------------------------------------------------


def eager_kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                  temperature: float = 2.0, alpha: float = 0.0, divergence: str = "forward_kl",
                  beta: float = 0.5) -> torch.Tensor:
    """The KD loss as it is usually written in PyTorch (batchmean over rows)."""
    T = temperature
    log_q = F.log_softmax(student / T, dim=-1)
    if divergence == "forward_kl":
        kd = F.kl_div(log_q, F.softmax(teacher / T, dim=-1), reduction="batchmean")
    elif divergence == "reverse_kl":
        log_p = F.log_softmax(teacher / T, dim=-1)
        kd = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    elif divergence == "jsd":
        log_p = F.log_softmax(teacher / T, dim=-1)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        kd = (beta * F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
              + (1 - beta) * F.kl_div(log_m, log_q, reduction="batchmean", log_target=True))
    else:
        raise ValueError(f"divergence: unknown {divergence!r}")
    kd = kd * T * T
    if alpha > 0:
        return (1 - alpha) * kd + alpha * F.cross_entropy(student, labels)
    return kd


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def _opts(case: Case) -> dict:
    return dict(case.params)


def _runner(case: Case, inputs: dict, loss_fn, note: str = "") -> Runner:
    """Wraps ``loss_fn(student, teacher, labels)`` as a forward or forward + backward step."""
    student, teacher, labels = inputs["student"], inputs["teacher"], inputs["labels"]
    return common.loss_runner(case, student, lambda: loss_fn(student, teacher, labels), note)


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    o = _opts(case)

    def fn(s, t, y):
        return kdfast.kd_loss(s, t, y, temperature=o["temperature"], alpha=o["alpha"],
                              divergence=o["divergence"], beta=o["beta"])
    return _runner(case, inputs, fn, note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    o = _opts(case)

    def fn(s, t, y):
        return eager_kd_loss(s, t, y, **o)
    return _runner(case, inputs, fn)


def _build_compile(case: Case, inputs: dict) -> Runner:
    o = _opts(case)
    compiled = common.compile_fresh(eager_kd_loss)

    def fn(s, t, y):
        return compiled(s, t, y, **o)
    return _runner(case, inputs, fn)


def _liger_unavailable(device: str) -> str | None:
    if not device.startswith("cuda"):
        return "Liger-Kernel is Triton-only (needs a CUDA GPU); not run on CPU"
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception as exc:
        return f"liger_kernel is not importable ({type(exc).__name__}: {exc})"
    return None


def _build_liger(case: Case, inputs: dict) -> Runner:
    from liger_kernel.transformers.functional import liger_jsd, liger_kl_div

    o = _opts(case)
    T = o["temperature"]
    if o["alpha"] > 0:
        raise NotImplementedError("liger: no fused KD + cross-entropy on logits; use --alpha 0")

    def fn(s, t, y):
        log_q = F.log_softmax(s / T, dim=-1)
        if o["divergence"] == "forward_kl":
            return liger_kl_div(log_q, F.softmax(t / T, dim=-1), "batchmean", False, 1e-10) * T * T
        if o["divergence"] == "jsd":
            return liger_jsd(log_q, F.log_softmax(t / T, dim=-1), None, o["beta"], -100) * T * T
        raise NotImplementedError(f"liger: no {o['divergence']} here")
    return _runner(case, inputs, fn)


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider("kd_loss", "kd_loss_fused", _build_kdfast),
    "eager": Provider("eager", _build_eager,
                      description="`F.kl_div(F.log_softmax(s / T), F.softmax(t / T), "
                                  "reduction='batchmean') * T * T`"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function under `torch.compile(dynamic=False)`"),
    "liger": Provider("liger", _build_liger, unavailable=_liger_unavailable,
                      description="Liger-Kernel `liger_kl_div` on PyTorch `log_softmax` / `softmax`"),
}


# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = DTYPES, modes: Sequence[str] = MODES,
               temperature: float = 2.0, alpha: float = 0.0, divergence: str = "forward_kl",
               beta: float = 0.5) -> list:
    """The case list, shapes outermost so that cases sharing inputs run together."""
    params = (("temperature", temperature), ("alpha", alpha), ("divergence", divergence), ("beta", beta))
    cases = []
    for name in common.resolve_shapes(BENCH, device, quick, shapes):
        n, v = BENCH.all_shapes[name]
        # forward reads both inputs; forward + backward also writes the gradient
        cases += common.shape_cases(OP, device, name, (n, v), dtypes=dtypes, modes=modes,
                                    input_elems=2 * n * v, grad_elems=n * v, params=params)
    return cases


def make_inputs(case: Case) -> dict:
    n, v = case.shape
    gen = torch.Generator(device=case.device).manual_seed(0)  # on the device: LLM shapes are large

    def logits():
        return (2 * torch.randn(n, v, generator=gen, device=case.device)).to(case.dtype)
    student, teacher = logits(), logits()
    labels = torch.randint(0, v, (n,), generator=gen, device=case.device)
    return {"student": student.requires_grad_(True), "teacher": teacher, "labels": labels}


def reference_loss(case: Case, inputs: dict) -> float:
    """Eager loss in float32 (the value every provider is checked against)."""
    with torch.no_grad():
        return float(eager_kd_loss(inputs["student"].float(), inputs["teacher"].float(),
                                   inputs["labels"], **_opts(case)))


def loss_tolerance(dtype_name: str) -> float:
    return 1e-4 if dtype_name == "fp32" else 2e-2


REFERENCE_NAME = "the fp32 eager value"


def flag_mismatches(rows: Sequence[harness.Row]) -> None:
    common.flag_mismatches(rows, loss_tolerance, REFERENCE_NAME)


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _worst_small_shape(rows, shape: str, ratio: str):
    """The kdfast row of ``shape`` with the lowest ``ratio`` (a speed-up column), or None."""
    measured = [r for r in rows if r.provider == "kdfast" and r.case == shape and r.status == "ok"
                and not math.isnan(getattr(r, ratio))]
    return min(measured, key=lambda r: getattr(r, ratio), default=None)


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """The targets as ``(name, measured, goal, passed)``; passed is None when not measured.

    CPU: N=4096, V=32000, fp32, T=2, forward + backward >= 12x eager and >= 3x
    torch.compile; forward only >= 4x torch.compile. GPU: bf16 N=8192, V=128256,
    forward + backward within 1.5x of moving 6*N*V bytes at the measured copy
    bandwidth and >= 3x Liger-Kernel. Both: peak extra memory of that case <= 1.05x
    its gradient; on the small shapes (cls 256x1000, tiny 64x512; every dtype and
    mode measured, the worst reported) no slower than torch.compile and >= 1.5x eager.
    """
    find, target = common.find, common.target
    targets = []
    if device.startswith("cuda"):
        case, label = GPU_TARGET_CASE, "GPU N=8192 V=128256 bf16 T=2 fwd+bwd"
        r = find(rows, "kdfast", *case)
        floor_ratio = 1 / r.frac_copy_bw if r and r.frac_copy_bw > 0 else None
        targets += [
            target(f"{label}: time / (6*N*V bytes at the copy bandwidth)", floor_ratio, ".2f",
                   TARGET_GPU_TIME_OVER_FLOOR, False),
            target(f"{label}: speed-up vs Liger-Kernel", common.speedup(rows, "liger", case), ".2f",
                   TARGET_GPU_SPEEDUP_VS_LIGER, True),
        ]
    else:
        case, label = CPU_TARGET_CASE, "CPU N=4096 V=32000 fp32 T=2 fwd+bwd"
        r = find(rows, "kdfast", *case)
        fwd = find(rows, "kdfast", *CPU_FORWARD_TARGET_CASE)
        targets += [
            target(f"{label}: speed-up vs eager", r and r.speedup_vs_eager, ".2f",
                   TARGET_SPEEDUP_VS_EAGER, True),
            target(f"{label}: speed-up vs torch.compile", r and r.speedup_vs_compile, ".2f",
                   TARGET_SPEEDUP_VS_COMPILE, True),
            target("CPU N=4096 V=32000 fp32 T=2 fwd: speed-up vs torch.compile",
                   fwd and fwd.speedup_vs_compile, ".2f", TARGET_FWD_SPEEDUP_VS_COMPILE, True),
        ]
    targets.append(target(f"{label}: peak extra memory / gradient size", r and r.extra_over_logits,
                          ".3f", TARGET_EXTRA_OVER_GRAD, False))
    for shape in SMALL_TARGET_SHAPES:
        n, v, _ = ALL_SHAPES[shape]
        for ratio, baseline, goal in (
                ("speedup_vs_compile", "torch.compile", TARGET_SMALL_SPEEDUP_VS_COMPILE),
                ("speedup_vs_eager", "eager", TARGET_SMALL_SPEEDUP_VS_EAGER)):
            worst = _worst_small_shape(rows, shape, ratio)
            where = f" (worst: {worst.dtype} {worst.mode})" if worst else ""
            targets.append(target(f"{shape} {n}x{v}, every dtype and mode{where}: speed-up vs {baseline}",
                                  worst and getattr(worst, ratio), ".2f", goal, True))
    return targets


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


OPTIONS = (
    Option("--temperature", 2.0, "kd_loss softmax temperature (default 2.0)", type=float),
    Option("--alpha", 0.0, "kd_loss hard-label weight (default 0: pure KD)", type=float),
    Option("--divergence", "forward_kl", "kd_loss divergence (default forward_kl)", choices=DIVERGENCES),
    Option("--beta", 0.5, "kd_loss JSD mixture weight (default 0.5)", type=float),
)


def _notes(o: dict) -> list:
    return [f"loss: divergence={o['divergence']}, T={o['temperature']:g}, alpha={o['alpha']:g}"
            + (f", beta={o['beta']:g}" if o["divergence"] == "jsd" else "")
            + "; eager and torch.compile compute in the input dtype (the usual code), kdfast in fp32"]


BENCH = common.OpBench(
    name=OP, op="kd_loss",
    summary="kdfast.kd_loss (temperature-softmax KL / reverse KL / JSD) against eager PyTorch, "
            "torch.compile and Liger-Kernel.",
    shapes={k: (n, v) for k, (n, v, _) in SHAPES.items()},
    quick_shapes={k: (n, v) for k, (n, v, _) in QUICK_SHAPES.items()},
    gpu_only=frozenset(k for k, (_, _, gpu) in ALL_SHAPES.items() if gpu),
    dim_names=("N", "V"), providers=ALL_PROVIDERS, options=OPTIONS,
    make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name=REFERENCE_NAME, loss_tolerance=loss_tolerance, check_targets=check_targets,
    notes=_notes)


def add_arguments(p) -> None:
    """The options of the kd_loss benchmark (common ones and kd_loss's own)."""
    common.add_arguments(p, [BENCH])


def run(args) -> list:
    """Runs the benchmark described by parsed ``args``; returns the rows and writes the files."""
    return common.run_one(BENCH, args)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-kd-loss", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
