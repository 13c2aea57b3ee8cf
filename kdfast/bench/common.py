"""What every op's benchmark shares beyond the measuring instruments: the command
line, the run, the files, the loss check and the targets.

:mod:`kdfast.bench.harness` measures (time, peak memory, copy bandwidth, machine,
CPU load) and writes (CSV, markdown, PNG, ``machine.json``). This module turns the
description of one op's benchmark, an :class:`OpBench` (its shapes, providers,
inputs, reference loss, options and targets), into a run:

- :func:`add_arguments`: the options every benchmark has (``--quick``, ``--out``,
  ``--device``, ``--providers``, ``--shapes``, ``--dtypes``, ``--modes``,
  ``--budget``, ...) and, with several ops, ``--op`` and one argument group per op
  holding that op's own options;
- :func:`run`: cases x providers of one or several ops into one folder: per op
  ``<name>.csv``, ``<name>.md`` (the table, notes and targets) and ``<name>.png``,
  and ``machine.json`` (the machine, the copy bandwidth, the load of the last op run);
- :func:`flag_mismatches`: notes each row whose loss is off the op's reference;
- :func:`target`, :class:`CaseTargets`, :func:`check_case_targets`,
  :func:`targets_markdown`: the goals, reported as met / missed / not measured;
- building blocks of the op modules: :func:`resolve_shapes`, :func:`shape_cases`,
  :func:`loss_runner`, :func:`compile_fresh`, :func:`kdfast_provider`.

Example::

    >>> import argparse
    >>> from kdfast.bench import common, dkd
    >>> p = argparse.ArgumentParser()
    >>> common.add_arguments(p, [dkd.BENCH])
    >>> args = p.parse_args(["--quick", "--providers", "eager", "--out", "/tmp/dkd-bench", "-q"])
    >>> rows = common.run_one(dkd.BENCH, args)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kdfast.bench import harness
from kdfast.bench.harness import Case, Provider, Row, Runner

MODES = ("fwd", "fwd+bwd")
DTYPES = ("fp32", "bf16")
# (header, legend) of the memory column of the ops whose student input is not logits
GRAD_MEMORY_COLUMN = ("extra / grad", "that over the bytes of the student input (= its gradient)")

# ---------------------------------------------------------------------------
# Description of one op's benchmark
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A command-line option of one op's benchmark. It is parsed with a default of
    None, so that a run can tell it was given; :meth:`OpBench.resolve` fills in
    ``default``."""

    flag: str
    default: object
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class OpBench:
    """One op's benchmark: what :func:`run` needs to run it.

    ``shapes`` / ``quick_shapes``: name -> dimensions, the default set and the
    ``--quick`` set (both selectable with ``--shapes``); ``gpu_only`` names the
    shapes run by default only on GPU. ``make_cases(device, *, quick, shapes,
    dtypes, modes, **options)`` lists the cases (``options``: the resolved
    :attr:`options`); ``make_inputs(case)`` makes a case's inputs (a dict with a
    ``"student"`` tensor that requires grad); ``reference_loss(case, inputs)`` the
    value every provider's loss is checked against (``reference_name`` says what it
    is), within ``loss_tolerance(dtype name)`` relative; ``check_targets(rows,
    device)`` returns the targets; ``notes(options)`` the op's lines in the notes of
    the markdown.
    """

    name: str  # --op value, file names
    op: str  # the function benchmarked, kdfast.<op>; the `op` column
    summary: str  # one line, for --help
    shapes: dict
    quick_shapes: dict
    dim_names: tuple  # e.g. ("N", "V"), for --help
    providers: dict  # name -> harness.Provider, in the order of the tables
    make_cases: Callable
    make_inputs: Callable[[Case], dict]
    reference_loss: Callable[[Case, dict], float]
    reference_name: str
    loss_tolerance: Callable[[str], float]
    check_targets: Callable[[Sequence[Row], str], list]
    notes: Callable[[dict], list]
    options: tuple = ()
    gpu_only: frozenset = frozenset()
    memory_column: tuple = harness.LOGITS_MEMORY_COLUMN

    @property
    def all_shapes(self) -> dict:
        return {**self.shapes, **self.quick_shapes}

    def resolve(self, args: argparse.Namespace) -> dict:
        """This op's options from parsed ``args``, defaults filled in."""
        values = {}
        for opt in self.options:
            value = getattr(args, opt.dest, None)
            values[opt.dest] = opt.default if value is None else value
        return values

    def shape_help(self, name: str, *, mark_quick: bool = True) -> str:
        dims = self.all_shapes[name]
        text = ", ".join(f"{d}={n}" for d, n in zip(self.dim_names, dims))
        if name in self.gpu_only:
            text += ", GPU"
        if mark_quick and name in self.quick_shapes:
            text += ", --quick"
        return f"{name} ({text})"

    def default_shapes_help(self) -> str:
        text = ",".join(n for n in self.shapes if n not in self.gpu_only)
        if self.gpu_only:
            text += " and on GPU " + ",".join(n for n in self.shapes if n in self.gpu_only)
        return f"{text}; {','.join(self.quick_shapes)} with --quick"


def resolve_shapes(bench: OpBench, device: str, quick: bool, shapes: Sequence[str] | None) -> list:
    """The shape names a run measures: ``shapes`` (checked), else the default set for
    ``device`` (the ``--quick`` set with ``quick``), without GPU-only shapes on CPU."""
    table = bench.quick_shapes if quick else bench.shapes
    if shapes is None:
        return [n for n in table if device.startswith("cuda") or n not in bench.gpu_only]
    unknown = [s for s in shapes if s not in bench.all_shapes]
    if unknown:
        raise ValueError(f"--shapes: unknown {unknown}; choose from {sorted(bench.all_shapes)}")
    return list(shapes)


def shape_cases(op: str, device: str, name: str, shape: tuple, *, dtypes: Sequence[str],
                modes: Sequence[str], input_elems: int, grad_elems: int, params: tuple = ()) -> list:
    """The cases of one shape, dtypes outer, modes inner. ``input_elems``: elements the
    forward must read (student and teacher); ``grad_elems``: elements of the student's
    gradient, which forward + backward also writes (the least traffic of a case)."""
    cases = []
    for dname in dtypes:
        dtype = harness.DTYPES_BY_NAME[dname]
        elem = torch.empty((), dtype=dtype).element_size()
        for mode in modes:
            traffic = input_elems + (grad_elems if mode == "fwd+bwd" else 0)
            cases.append(Case(op=op, name=name, shape=tuple(shape), dtype=dtype, mode=mode, device=device,
                              min_bytes=traffic * elem, logits_bytes=grad_elems * elem, params=params))
    return cases


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def loss_runner(case: Case, student: torch.Tensor, loss: Callable[[], torch.Tensor],
                note: str = "") -> Runner:
    """``loss()`` as a timed step: under ``torch.no_grad()`` for ``fwd``; for
    ``fwd+bwd`` followed by ``backward()`` into ``student.grad``, which ``reset``
    drops (untimed) before each step."""
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return loss()
        return Runner(step=step, note=note)

    def step_bwd():
        out = loss()
        out.backward()
        return out.detach()

    def reset():
        student.grad = None
    return Runner(step=step_bwd, reset=reset, note=note)


def compile_fresh(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)`` after ``torch._dynamo.reset()``: compiled
    afresh for every case (no recompile limits, no guards shared between cases)."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def kdfast_provider(op: str, kernel: str, build: Callable[[Case, dict, str], Runner]) -> Provider:
    """The ``kdfast`` provider of ``kdfast.<op>``: skipped (with the reason) where this
    kdfast has no such function; its rows noted where ``kdfast::<kernel>`` has no
    compiled kernel for the device (kdfast then runs its plain-PyTorch reference).
    ``build(case, inputs, note)`` returns the Runner."""

    def unavailable(device: str) -> str | None:
        import kdfast

        if not hasattr(kdfast, op):
            return f"this kdfast (version {kdfast.__version__}) has no `kdfast.{op}`"
        return None

    def build_kdfast(case: Case, inputs: dict) -> Runner:
        import kdfast

        note = ""
        if not kdfast.has_kernel(kernel, case.device.split(":")[0]):
            note = ("kdfast ran its plain-PyTorch reference: the compiled kernels are not built for "
                    "this device")
        return build(case, inputs, note)

    return Provider("kdfast", build_kdfast, unavailable=unavailable, description=f"`kdfast.{op}`")


# ---------------------------------------------------------------------------
# Loss check
# ---------------------------------------------------------------------------


def flag_mismatches(rows: Sequence[Row], tolerance: Callable[[str], float], reference_name: str) -> None:
    """Adds a note to each row whose loss differs from the reference by more than
    ``tolerance(dtype name)`` (relative); the markdown lists the notes under the table."""
    for r in rows:
        if r.status == "ok" and r.loss_rel_err > tolerance(r.dtype):
            r.note = "; ".join(x for x in (r.note, f"loss differs from {reference_name} by "
                                                   f"{r.loss_rel_err:.1e} (relative)") if x)


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def find(rows: Sequence[Row], provider: str, case: str, dtype: str, mode: str) -> Row | None:
    """The measured row of ``provider`` on (case, dtype, mode), or None."""
    for r in rows:
        if (r.provider, r.case, r.dtype, r.mode) == (provider, case, dtype, mode) and r.status == "ok":
            return r
    return None


def target(name: str, value: float | None, fmt: str, goal: float, higher_is_better: bool,
           goal_text: str | None = None) -> tuple:
    """One target as ``(name, measured, goal, passed)``; passed is None when not measured."""
    measured = "-" if value is None or math.isnan(value) else format(value, fmt)
    goal_text = goal_text or f"{'>=' if higher_is_better else '<='} {goal:g}"
    if value is None or math.isnan(value):
        return name, measured, goal_text, None
    return name, measured, goal_text, (value >= goal) if higher_is_better else (value <= goal)


def speedup(rows: Sequence[Row], baseline: str, case: tuple) -> float | None:
    """``baseline``'s median time over kdfast's on ``case`` (the speed-up of kdfast), or None."""
    mine, theirs = find(rows, "kdfast", *case), find(rows, baseline, *case)
    return theirs.median_ms / mine.median_ms if mine and theirs else None


@dataclass(frozen=True)
class CaseTargets:
    """kdfast's goals on one case (shape name, dtype, mode), described by ``label``.

    ``vs_eager`` / ``vs_compile``: least speed-ups, checked on CPU only (they are
    the 2-core CPU's goals). ``extra_over_grad``: most peak extra memory as a
    multiple of the gradient's bytes, on every device, plus ``stats_bytes_per_row``
    for the O(rows) statistics a fused op keeps and the loss it returns
    (``row_elems``: elements of one row of the gradient, so the allowance is
    ``stats_bytes_per_row / (row_elems * element size)`` of the gradient; kd_loss
    keeps 32 bytes per row).
    """

    case: str
    dtype: str
    mode: str
    label: str
    vs_eager: float | None = None
    vs_compile: float | None = None
    extra_over_grad: float | None = None
    row_elems: int = 1
    stats_bytes_per_row: int = 64  # sixteen fp32 values per row


def check_case_targets(rows: Sequence[Row], device: str, specs: Sequence[CaseTargets]) -> list:
    """The targets of ``specs`` as ``(name, measured, goal, passed)`` tuples."""
    targets = []
    cpu = not device.startswith("cuda")
    for spec in specs:
        key = (spec.case, spec.dtype, spec.mode)
        mine = find(rows, "kdfast", *key)
        for goal, baseline in ((spec.vs_eager, "eager"), (spec.vs_compile, "torch.compile")):
            if goal is not None and cpu:
                targets.append(target(f"CPU {spec.label}: speed-up vs {baseline}",
                                      speedup(rows, baseline, key), ".2f", goal, True))
        if spec.extra_over_grad is not None:
            elem = harness.DTYPES_BY_NAME[spec.dtype].itemsize
            slack = spec.stats_bytes_per_row / (spec.row_elems * elem)
            goal = spec.extra_over_grad + slack
            text = f"<= {spec.extra_over_grad:g} + {spec.stats_bytes_per_row} B per row = {goal:.4f}"
            targets.append(target(f"{spec.label}: peak extra memory / gradient size",
                                  mine and mine.extra_over_logits, ".4f", goal, False, goal_text=text))
    return targets


def targets_markdown(targets: list) -> str:
    """The ``## Targets`` section (empty without targets)."""
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


def csv_list(choices: Sequence[str]):
    """An argparse ``type``: a comma-separated subset of ``choices``, as a list."""
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def _union(lists) -> list:
    return list(dict.fromkeys(x for xs in lists for x in xs))


def add_arguments(p: argparse.ArgumentParser, benches: Sequence[OpBench], *, select: bool = False,
                  separate: Sequence[str] = ()) -> None:
    """The options of a benchmark command over ``benches``.

    One op (``select=False``): its options next to the common ones, as
    ``python -m kdfast.bench.<op>`` and ``benchmarks/bench_<op>.py`` have them. With
    ``select=True`` (``kdfast bench``): ``--op`` picks among ``benches`` (the first is
    the default) and the ``separate`` benchmarks (their own runners, e.g. ``cache``),
    ``--shapes`` / ``--providers`` take any op's names (each op runs those it has), and
    each op's options form their own group in ``--help``.
    """
    single = len(benches) == 1 and not select
    if select:
        names = [b.name for b in benches] + list(separate)
        p.add_argument("--op", type=csv_list([*names, "all"]), default=[benches[0].name],
                       metavar="OP[,OP...]",
                       help=f"which benchmark(s): {', '.join(names)}, or all (default {names[0]}); "
                            "each op's options and shapes are listed below")
    if single:
        quick = ", ".join(benches[0].shape_help(n, mark_quick=False) for n in benches[0].quick_shapes)
    else:
        quick = "each op's tiny shape"
    p.add_argument("--quick", action="store_true",
                   help=f"{quick}, short time budget: a smoke run in seconds "
                        "(torch.compile still compiles each case)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: ./kdfast-bench/<device>-<machine>)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when a GPU is present, else cpu")
    providers = _union(b.providers for b in benches)
    default = "all" if single else "all of each op's"
    p.add_argument("--providers", type=csv_list(providers), default=None,
                   help=f"comma-separated subset of {','.join(providers)} (default: {default})")
    shapes = _union(b.all_shapes for b in benches)
    if single:
        b = benches[0]
        shape_help = ("comma-separated subset of "
                      + ", ".join(b.shape_help(n, mark_quick=False) for n in b.all_shapes)
                      + f" (default: {b.default_shapes_help()})")
    else:
        shape_help = ("comma-separated shape names, each op running those it has (listed with each op "
                      "below; default: the op's full set, its tiny shape with --quick)")
    p.add_argument("--shapes", type=csv_list(shapes), default=None, help=shape_help)
    p.add_argument("--dtypes", type=csv_list(DTYPES), default=list(DTYPES), help="fp32,bf16 (default both)")
    p.add_argument("--modes", type=csv_list(MODES), default=list(MODES), help="fwd,fwd+bwd (default both)")
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
    for b in benches:
        shapes_text = ", ".join(b.shape_help(n) for n in b.all_shapes)
        group = p if single else p.add_argument_group(f"--op {b.name}", f"{b.summary} Shapes: {shapes_text}.")
        for opt in b.options:
            group.add_argument(opt.flag, dest=opt.dest, type=opt.type, choices=opt.choices, default=None,
                               metavar=opt.metavar, help=opt.help)


def selected_benches(args: argparse.Namespace, benches: Sequence[OpBench]) -> list:
    """The benches ``args.op`` names (``all``: every one), in the order of ``benches``."""
    names = getattr(args, "op", None) or [benches[0].name]
    if "all" in names:
        return list(benches)
    return [b for b in benches if b.name in names]


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without a GPU exits."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kdfast bench: --device cuda but no CUDA GPU is available")
    return name


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


@dataclass
class _Plan:
    bench: OpBench
    options: dict
    cases: list
    providers: list = field(default_factory=list)


def _plans(benches: Sequence[OpBench], args: argparse.Namespace, device: str,
           known: Sequence[OpBench]) -> list:
    """Checks ``args`` against the selected ``benches`` and lists what each runs.

    An option of an op that is not selected, or a shape / provider name that no
    selected op has, is an error (it would otherwise be silently ignored).
    ``known``: every op whose options may be in ``args``.
    """
    names = ", ".join(b.name for b in benches)
    own = {o.dest for b in benches for o in b.options}
    for other in known:
        for opt in other.options:
            if opt.dest not in own and getattr(args, opt.dest, None) is not None:
                raise SystemExit(f"kdfast bench: {opt.flag} is an option of --op {other.name}, "
                                 f"which this run does not include (--op {names})")
    for flag, given, have in (("--shapes", args.shapes, [b.all_shapes for b in benches]),
                              ("--providers", args.providers, [b.providers for b in benches])):
        unknown = [x for x in (given or []) if not any(x in h for h in have)]
        if unknown:
            raise SystemExit(f"kdfast bench: {flag}: {', '.join(unknown)} is not one of --op {names}'s "
                             f"(they have: {', '.join(_union(have))})")
    plans = []
    for b in benches:
        shapes = None if args.shapes is None else [s for s in args.shapes if s in b.all_shapes]
        if shapes == []:
            continue  # several ops and --shapes names none of this one's
        providers = [b.providers[p] for p in (args.providers or b.providers) if p in b.providers]
        options = b.resolve(args)
        try:
            cases = b.make_cases(device, quick=args.quick, shapes=shapes, dtypes=args.dtypes,
                                 modes=args.modes, **options)
        except ValueError as exc:  # a bad option value: a message, not a traceback
            raise SystemExit(f"kdfast bench: {exc}") from None
        plans.append(_Plan(b, options, cases, providers))
    return plans


def run_one(bench: OpBench, args: argparse.Namespace) -> list:
    """Runs one op's benchmark described by parsed ``args``; returns its rows."""
    return run([bench], args).get(bench.name, [])


def run(benches: Sequence[OpBench], args: argparse.Namespace, *,
        known: Sequence[OpBench] | None = None) -> dict:
    """Runs the benchmarks of ``benches`` with the parsed ``args`` into one folder.

    Returns ``{op name: rows}``. The machine description and the copy bandwidth are
    measured once; each op gets its own CPU-load record, files and targets.
    ``known``: every op whose options ``args`` may hold (to reject an option of an
    op not run).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    plans = _plans(benches, args, device, known or benches)
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
    log(f"kdfast bench {', '.join(p.bench.name for p in plans)}: {harness.describe_machine(info)}")
    copy_bw = harness.copy_bandwidth(device, nbytes=(64 if args.quick else 512) * 2**20,
                                     budget_s=0.2 if args.quick else 1.0)
    if len(plans) == 1:
        log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s; {len(plans[0].cases)} cases x "
            f"{len(plans[0].providers)} providers -> {out}")
    else:
        log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
            + "; ".join(f"{p.bench.name}: {len(p.cases)} cases x {len(p.providers)} providers" for p in plans)
            + f" -> {out}")
    if device == "cpu" and args.wait_quiet > 0:
        if not harness.wait_for_quiet(args.wait_quiet, log=log):
            log(f"the machine did not get quiet within {args.wait_quiet:g} s; running anyway")
    results = {}
    for plan in plans:
        results[plan.bench.name] = _run_plan(plan, args, device, dict(info), config, copy_bw, out, log,
                                             heading=len(plans) > 1)
    return results


def _run_plan(plan: _Plan, args: argparse.Namespace, device: str, info: dict, config: harness.BenchConfig,
              copy_bw: float, out: Path, log: Callable[[str], None], *, heading: bool) -> list:
    bench, cases, providers = plan.bench, plan.cases, plan.providers
    if heading:
        log(f"{bench.op}: {len(cases)} cases x {len(providers)} providers")
    if device == "cpu":
        monitor = harness.CpuLoadMonitor().start()
        time.sleep(1.0)
        info["cpu_load_before"] = monitor.stop()
    monitor = harness.CpuLoadMonitor().start()
    rows = harness.run_cases(cases, providers, make_inputs=bench.make_inputs,
                             reference_loss=bench.reference_loss, config=config, copy_bw=copy_bw)
    info["cpu_load_during"] = monitor.stop()
    for line in harness.load_lines(info):
        log(line.replace("**", ""))
    flag_mismatches(rows, bench.loss_tolerance, bench.reference_name)
    info["loadavg_after"] = list(os.getloadavg())
    targets = bench.check_targets(rows, device)
    title = f"{bench.op} benchmark on {device} ({harness.machine_tag(info)})"
    notes = _notes(plan, rows, device, config)
    name = bench.name
    harness.write_csv(rows, out / f"{name}.csv")
    harness.write_markdown(rows, out / f"{name}.md", title=title, info=info, copy_bw=copy_bw,
                           notes=notes, extra_sections=[targets_markdown(targets)],
                           memory_column=bench.memory_column)
    harness.write_machine(info, copy_bw, out / "machine.json")
    plot = not args.no_plot
    if plot and not harness.can_plot():
        # the plot is optional: the CSV and the markdown table above are the results
        print("kdfast bench: matplotlib is not installed; skipping the plot (pip install matplotlib)",
              file=sys.stderr, flush=True)
        plot = False
    if plot:
        harness.write_plot(rows, out / f"{name}.png", title=title)
    if not args.quiet:
        if heading:
            print(f"# {title}\n")
        print(harness.markdown_table(rows, memory_header=bench.memory_column[0]))
        if targets:
            print()
            print(targets_markdown(targets))
        print(f"\nwrote {out}/{name}.csv, {name}.md" + (f", {name}.png" if plot else "") + ", machine.json")
        if heading:
            print()
    return rows


def _notes(plan: _Plan, rows: Sequence[Row], device: str, config: harness.BenchConfig) -> list:
    """The notes above a markdown table: providers, the op's own lines, how it was run."""
    cases = plan.cases
    notes = ["providers: " + "; ".join(f"`{p.name}` = {p.description}" for p in plan.providers)]
    notes += plan.bench.notes(plan.options)
    notes += ["torch.compile: `dynamic=False`, compiled afresh per case (`torch._dynamo.reset()`)",
              "forward = under `torch.no_grad()`; forward+backward = `loss.backward()` into "
              "`student.grad` (set to None, untimed, before each call)"]
    if device == "cpu" and cases:
        big = max(cases, key=lambda c: c.logits_bytes)
        if big.logits_bytes >= 64 * 2**20:
            fresh, reused = harness.first_touch_cost(big.shape, big.dtype, device)
            notes.append(f"writing a freshly allocated {'x'.join(map(str, big.shape))} {big.dtype_name} "
                         f"buffer (the size of the gradient) takes {1e3 * fresh:.0f} ms here, an already "
                         f"used one {1e3 * reused:.0f} ms: page faults, which every provider pays for the "
                         f"gradient it returns in fwd+bwd")
    if config.budget_s < 0.5:
        notes.append(f"QUICK run (budget {config.budget_s} s per case and provider): numbers are rough")
    compiled = [r for r in rows if r.provider == "torch.compile" and r.status == "ok"]
    if compiled:
        notes.append("torch.compile first call (compile + run; on-disk inductor cache hits make it "
                     "shorter): " + ", ".join(f"{r.case} {r.dtype} {r.mode} {r.first_call_ms / 1e3:.1f} s"
                                               for r in compiled))
    return notes


def main_for(bench: OpBench, argv: Sequence[str] | None = None, *, prog: str | None = None,
             description: str | None = None, default_out: Callable[[str], Path] | None = None) -> int:
    """A command line that runs one op's benchmark (``python -m kdfast.bench.<op>``,
    ``benchmarks/bench_<op>.py``). ``default_out(device)`` gives the folder when
    ``--out`` is not given (default: ``./kdfast-bench/<device>-<machine>``)."""
    p = argparse.ArgumentParser(prog=prog, description=description or bench.summary)
    add_arguments(p, [bench])
    args = p.parse_args(argv)
    if args.out is None and default_out is not None:
        args.out = default_out(resolve_device(args.device))
    run_one(bench, args)
    return 0


def machine_folder(root: Path) -> Callable[[str], Path]:
    """A ``default_out`` for :func:`main_for`: ``root / <device>-<machine>``."""
    return lambda device: Path(root) / harness.machine_tag(harness.machine_info(device))
