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

Run it with ``python -m kdfast bench`` (see ``--help``) or
``python benchmarks/bench_kd_loss.py``. It writes ``kd_loss.csv``, ``kd_loss.md``,
``kd_loss.png`` (skipped with a note when matplotlib is not installed) and
``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import kd_loss as bench
    >>> bench.main(["--quick", "--out", "/tmp/kd-bench", "--providers", "kdfast,eager"])
    0
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from kdfast.bench import harness
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
MODES = ("fwd", "fwd+bwd")
DTYPES = ("fp32", "bf16")
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
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return loss_fn(student, teacher, labels)
        return Runner(step=step, note=note)

    def step_bwd():
        loss = loss_fn(student, teacher, labels)
        loss.backward()
        return loss.detach()

    def reset():
        student.grad = None
    return Runner(step=step_bwd, reset=reset, note=note)


def _build_kdfast(case: Case, inputs: dict) -> Runner:
    import kdfast

    o = _opts(case)
    note = ""
    if not kdfast.has_kernel("kd_loss_fused", case.device.split(":")[0]):
        note = "kdfast ran its plain-PyTorch reference: the compiled kernels are not built for this device"

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
    import torch._dynamo

    o = _opts(case)
    torch._dynamo.reset()  # compile afresh for every case: no recompile limits, no shared guards
    compiled = torch.compile(eager_kd_loss, dynamic=False)

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
    "kdfast": Provider("kdfast", _build_kdfast, description="`kdfast.kd_loss`"),
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
    table = QUICK_SHAPES if quick else SHAPES
    if shapes is None:
        shapes = [n for n, (_, _, gpu) in table.items() if device.startswith("cuda") or not gpu]
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown:
        raise ValueError(f"--shapes: unknown {unknown}; choose from {sorted(ALL_SHAPES)}")
    params = (("temperature", temperature), ("alpha", alpha), ("divergence", divergence), ("beta", beta))
    cases = []
    for name in shapes:
        n, v, _ = ALL_SHAPES[name]
        for dname in dtypes:
            dtype = harness.DTYPES_BY_NAME[dname]
            elem = torch.empty((), dtype=dtype).element_size()
            for mode in modes:
                # forward reads both inputs; forward + backward also writes the gradient
                passes = 2 if mode == "fwd" else 3
                cases.append(Case(op=OP, name=name, shape=(n, v), dtype=dtype, mode=mode,
                                  device=device, min_bytes=passes * n * v * elem,
                                  logits_bytes=n * v * elem, params=params))
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


def flag_mismatches(rows: Sequence[harness.Row]) -> None:
    for r in rows:
        if r.status == "ok" and r.loss_rel_err > loss_tolerance(r.dtype):
            r.note = "; ".join(x for x in (r.note, f"loss differs from the fp32 eager value by "
                                                   f"{r.loss_rel_err:.1e} (relative)") if x)


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _find(rows, provider, case, dtype, mode):
    for r in rows:
        if (r.provider, r.case, r.dtype, r.mode) == (provider, case, dtype, mode) and r.status == "ok":
            return r
    return None


def _target(name: str, value: float | None, fmt: str, goal: float, higher_is_better: bool) -> tuple:
    measured = "-" if value is None or math.isnan(value) else format(value, fmt)
    goal_text = f"{'>=' if higher_is_better else '<='} {goal:g}"
    if value is None or math.isnan(value):
        return name, measured, goal_text, None
    return name, measured, goal_text, (value >= goal) if higher_is_better else (value <= goal)


def _worst_small_shape(rows, shape: str, ratio: str):
    """The kdfast row of ``shape`` with the lowest ``ratio`` (a speed-up column), or None."""
    measured = [r for r in rows if r.provider == "kdfast" and r.case == shape and r.status == "ok"
                and not math.isnan(getattr(r, ratio))]
    return min(measured, key=lambda r: getattr(r, ratio), default=None)


def _ratio(rows, baseline: str, case: tuple) -> float | None:
    """``baseline``'s median time over kdfast's on ``case`` (the speed-up of kdfast), or None."""
    mine, theirs = _find(rows, "kdfast", *case), _find(rows, baseline, *case)
    return theirs.median_ms / mine.median_ms if mine and theirs else None


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """The targets as ``(name, measured, goal, passed)``; passed is None when not measured.

    CPU: N=4096, V=32000, fp32, T=2, forward + backward >= 12x eager and >= 3x
    torch.compile; forward only >= 4x torch.compile. GPU: bf16 N=8192, V=128256,
    forward + backward within 1.5x of moving 6*N*V bytes at the measured copy
    bandwidth and >= 3x Liger-Kernel. Both: peak extra memory of that case <= 1.05x
    its gradient; on the small shapes (cls 256x1000, tiny 64x512; every dtype and
    mode measured, the worst reported) no slower than torch.compile and >= 1.5x eager.
    """
    targets = []
    if device.startswith("cuda"):
        case, label = GPU_TARGET_CASE, "GPU N=8192 V=128256 bf16 T=2 fwd+bwd"
        r = _find(rows, "kdfast", *case)
        floor_ratio = 1 / r.frac_copy_bw if r and r.frac_copy_bw > 0 else None
        targets += [
            _target(f"{label}: time / (6*N*V bytes at the copy bandwidth)", floor_ratio, ".2f",
                    TARGET_GPU_TIME_OVER_FLOOR, False),
            _target(f"{label}: speed-up vs Liger-Kernel", _ratio(rows, "liger", case), ".2f",
                    TARGET_GPU_SPEEDUP_VS_LIGER, True),
        ]
    else:
        case, label = CPU_TARGET_CASE, "CPU N=4096 V=32000 fp32 T=2 fwd+bwd"
        r = _find(rows, "kdfast", *case)
        fwd = _find(rows, "kdfast", *CPU_FORWARD_TARGET_CASE)
        targets += [
            _target(f"{label}: speed-up vs eager", r and r.speedup_vs_eager, ".2f",
                    TARGET_SPEEDUP_VS_EAGER, True),
            _target(f"{label}: speed-up vs torch.compile", r and r.speedup_vs_compile, ".2f",
                    TARGET_SPEEDUP_VS_COMPILE, True),
            _target("CPU N=4096 V=32000 fp32 T=2 fwd: speed-up vs torch.compile",
                    fwd and fwd.speedup_vs_compile, ".2f", TARGET_FWD_SPEEDUP_VS_COMPILE, True),
        ]
    targets.append(_target(f"{label}: peak extra memory / gradient size", r and r.extra_over_logits,
                           ".3f", TARGET_EXTRA_OVER_GRAD, False))
    for shape in SMALL_TARGET_SHAPES:
        n, v, _ = ALL_SHAPES[shape]
        for ratio, baseline, goal in (
                ("speedup_vs_compile", "torch.compile", TARGET_SMALL_SPEEDUP_VS_COMPILE),
                ("speedup_vs_eager", "eager", TARGET_SMALL_SPEEDUP_VS_EAGER)):
            worst = _worst_small_shape(rows, shape, ratio)
            where = f" (worst: {worst.dtype} {worst.mode})" if worst else ""
            targets.append(_target(f"{shape} {n}x{v}, every dtype and mode{where}: speed-up vs {baseline}",
                                   worst and getattr(worst, ratio), ".2f", goal, True))
    return targets


def targets_markdown(targets: list) -> str:
    if not targets:
        return ""
    lines = ["## Targets", "", "| target | measured | goal | status |", "| --- | --- | --- | --- |"]
    for name, measured, goal, passed in targets:
        status = "not measured" if passed is None else ("met" if passed else "**missed**")
        lines.append(f"| {name} | {measured} | {goal} | {status} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _csv_list(choices: Sequence[str]):
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the kd_loss benchmark (shared by ``python -m kdfast bench``)."""
    p.add_argument("--quick", action="store_true",
                   help="tiny shape (N=64, V=512), short time budget: a smoke run in seconds "
                        "(torch.compile still compiles each case)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: ./kdfast-bench/<device>-<machine>)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when a GPU is present, else cpu")
    p.add_argument("--providers", type=_csv_list(PROVIDERS), default=list(PROVIDERS),
                   help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    p.add_argument("--shapes", type=_csv_list(list(ALL_SHAPES)), default=None,
                   help="comma-separated subset of " + ", ".join(
                       f"{k} (N={n}, V={v}{', GPU' if g else ''})" for k, (n, v, g) in ALL_SHAPES.items())
                   + " (default: cls,llm and on GPU llm-large; tiny with --quick)")
    p.add_argument("--dtypes", type=_csv_list(DTYPES), default=list(DTYPES), help="fp32,bf16 (default both)")
    p.add_argument("--modes", type=_csv_list(MODES), default=list(MODES), help="fwd,fwd+bwd (default both)")
    p.add_argument("--temperature", type=float, default=2.0, help="default 2.0")
    p.add_argument("--alpha", type=float, default=0.0, help="hard-label weight (default 0: pure KD)")
    p.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl", help="default forward_kl")
    p.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight (default 0.5)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repeats per case and provider (default 1.0; 0.05 with --quick)")
    p.add_argument("--min-repeats", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="on CPU, first wait up to SECONDS until other processes use < 5%% of the "
                        "CPUs (default 0: do not wait); the run records the load either way")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kdfast bench: --device cuda but no CUDA GPU is available")
    return name


def run(args: argparse.Namespace) -> list:
    """Runs the benchmark described by parsed ``args``; returns the rows and writes the files."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cases = make_cases(device, quick=args.quick, shapes=args.shapes, dtypes=args.dtypes,
                       modes=args.modes, temperature=args.temperature, alpha=args.alpha,
                       divergence=args.divergence, beta=args.beta)
    providers = [ALL_PROVIDERS[name] for name in args.providers]
    config = harness.BenchConfig(
        device=device,
        budget_s=args.budget if args.budget is not None else (0.05 if args.quick else 1.0),
        min_repeats=args.min_repeats if args.min_repeats is not None else (1 if args.quick else 3),
        max_repeats=5 if args.quick else 1000,
        measure_memory=not args.no_memory, verbose=not args.quiet)
    info = harness.machine_info(device)
    out = args.out or Path("kdfast-bench") / harness.machine_tag(info)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    log(f"kdfast bench {OP}: {harness.describe_machine(info)}")
    copy_bw = harness.copy_bandwidth(device, nbytes=(64 if args.quick else 512) * 2**20,
                                     budget_s=0.2 if args.quick else 1.0)
    log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s; {len(cases)} cases x {len(providers)} providers -> {out}")

    if device == "cpu" and args.wait_quiet > 0:
        if not harness.wait_for_quiet(args.wait_quiet, log=log):
            log(f"the machine did not get quiet within {args.wait_quiet:g} s; running anyway")
    if device == "cpu":
        monitor = harness.CpuLoadMonitor().start()
        time.sleep(1.0)
        info["cpu_load_before"] = monitor.stop()
    monitor = harness.CpuLoadMonitor().start()
    rows = harness.run_cases(cases, providers, make_inputs=make_inputs, reference_loss=reference_loss,
                             config=config, copy_bw=copy_bw)
    info["cpu_load_during"] = monitor.stop()
    for line in harness.load_lines(info):
        log(line.replace("**", ""))
    flag_mismatches(rows)
    info["loadavg_after"] = list(os.getloadavg())
    targets = check_targets(rows, device)
    title = f"kd_loss benchmark on {device} ({harness.machine_tag(info)})"
    notes = ["providers: " + "; ".join(f"`{p.name}` = {p.description}" for p in providers)]
    notes += [f"loss: divergence={args.divergence}, T={args.temperature:g}, alpha={args.alpha:g}"
             + (f", beta={args.beta:g}" if args.divergence == "jsd" else "")
             + "; eager and torch.compile compute in the input dtype (the usual code), kdfast in fp32",
             "torch.compile: `dynamic=False`, compiled afresh per case (`torch._dynamo.reset()`)",
             "forward = under `torch.no_grad()`; forward+backward = `loss.backward()` into "
             "`student.grad` (set to None, untimed, before each call)"]
    if device == "cpu":
        big = max(cases, key=lambda c: c.logits_bytes)
        if big.logits_bytes >= 64 * 2**20:
            fresh, reused = harness.first_touch_cost(big.shape, big.dtype, device)
            notes.append(f"writing a freshly allocated {big.shape[0]}x{big.shape[1]} {big.dtype_name} buffer "
                         f"(the size of the gradient) takes {1e3 * fresh:.0f} ms here, an already used one "
                         f"{1e3 * reused:.0f} ms: page faults, which every provider pays for the gradient it "
                         f"returns in fwd+bwd")
    if config.budget_s < 0.5:
        notes.append(f"QUICK run (budget {config.budget_s} s per case and provider): numbers are rough")
    compiled = [r for r in rows if r.provider == "torch.compile" and r.status == "ok"]
    if compiled:
        notes.append("torch.compile first call (compile + run; on-disk inductor cache hits make it "
                     "shorter): " + ", ".join(f"{r.case} {r.dtype} {r.mode} {r.first_call_ms / 1e3:.1f} s"
                                               for r in compiled))
    harness.write_csv(rows, out / f"{OP}.csv")
    harness.write_markdown(rows, out / f"{OP}.md", title=title, info=info, copy_bw=copy_bw,
                           notes=notes, extra_sections=[targets_markdown(targets)])
    harness.write_machine(info, copy_bw, out / "machine.json")
    plot = not args.no_plot
    if plot and not harness.can_plot():
        # the plot is optional: the CSV and the markdown table above are the results
        print("kdfast bench: matplotlib is not installed; skipping the plot (pip install matplotlib)",
              file=sys.stderr, flush=True)
        plot = False
    if plot:
        harness.write_plot(rows, out / f"{OP}.png", title=title)
    if not args.quiet:
        print(harness.markdown_table(rows))
        if targets:
            print()
            print(targets_markdown(targets))
        print(f"\nwrote {out}/{OP}.csv, {OP}.md" + (f", {OP}.png" if plot else "") + ", machine.json")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdfast-bench-kd-loss", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
