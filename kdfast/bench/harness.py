"""Device-agnostic benchmark harness shared by every ``kdfast.bench.<op>`` module.

(The command line and the run of an op's cases are in :mod:`kdfast.bench.common`.)
It times a step function (median and 20th / 80th percentiles over repeats chosen
by a time budget), measures the peak memory a step allocates beyond what existed
before it, measures the copy bandwidth of the device, and writes the results as a
CSV (one row per case x provider), a markdown table and a PNG plot.

Timing: CUDA events around each repeat (plus ``synchronize``) on GPU, with the L2
cache flushed before each repeat; ``time.perf_counter`` on CPU.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before
  the step, after ``reset_peak_memory_stats()``.
- CPU: one step runs under ``torch.profiler`` with ``profile_memory=True``; the
  allocator's chronological allocation / free records (the ``[memory]`` events of
  the raw Kineto event list, ``nbytes`` signed) are replayed, and the running
  maximum is the peak. Allocations made before the step (the inputs) are not
  seen, so the result is the extra memory of one step. The raw list is used
  because :meth:`profile.events` folds an allocation into the op that made it.
  Checked against known cases in ``tests/test_bench_smoke.py`` (a 100 MB
  temporary reads 100 MB; eager KL forward + backward at N=4096, V=32000 fp32
  reads 2.62 GB = 5 x the gradient).

Achieved bandwidth of a provider is the case's minimum traffic divided by its
median time, reported also as a fraction of the measured copy bandwidth
(``dst.copy_(src)``: 2 x buffer bytes per copy).

Example::

    >>> from kdfast.bench import harness
    >>> x = torch.randn(1000, 1000)
    >>> t = harness.time_step(lambda: x.exp(), device="cpu", budget_s=0.2)
    >>> t.median_s > 0
    True
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark configuration (shape, dtype, mode) of one op on one device.

    ``min_bytes`` is the least memory traffic any implementation needs (used for
    the achieved bandwidth); ``logits_bytes`` the bytes of the student input, which
    is the size of its gradient (memory is reported as a multiple of it, in the
    ``extra_over_logits`` column; the names come from kd_loss, whose inputs are logits).
    """

    op: str
    name: str
    shape: tuple
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"
    device: str
    min_bytes: int
    logits_bytes: int
    params: tuple = ()  # extra (key, value) pairs, e.g. (("temperature", 2.0),)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))

    @property
    def label(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.name} {dims} {self.dtype_name} {self.mode}"

    @property
    def input_key(self) -> tuple:
        """Cases with the same key share one set of inputs."""
        return (self.op, self.shape, self.dtype, self.device, self.params)


@dataclass
class Runner:
    """What a provider does for one case: ``step`` runs one timed iteration and
    returns the loss; ``reset`` runs untimed before each step (drop gradients)."""

    step: Callable[[], torch.Tensor]
    reset: Callable[[], None] = lambda: None
    note: str = ""


@dataclass
class Provider:
    """An implementation to compare. ``build(case, inputs)`` returns a Runner;
    ``unavailable(device)`` returns why it cannot run there, or None."""

    name: str
    build: Callable[[Case, dict], Runner]
    unavailable: Callable[[str], str | None] = lambda device: None
    description: str = ""


@dataclass
class Timing:
    times_s: list
    first_call_s: float
    warmup: int
    last_output: object = None  # what the last timed call returned (e.g. the loss)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def p20_s(self) -> float:
        return percentile(self.times_s, 20)

    @property
    def p80_s(self) -> float:
        return percentile(self.times_s, 80)


@dataclass
class Row:
    """One CSV row: one case x provider."""

    op: str
    case: str
    shape: str
    dtype: str
    mode: str
    device: str
    provider: str
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    repeats: int = 0
    first_call_ms: float = math.nan
    peak_extra_bytes: float = math.nan
    extra_over_logits: float = math.nan
    min_bytes: int = 0
    achieved_gbps: float = math.nan
    frac_copy_bw: float = math.nan
    speedup_vs_eager: float = math.nan
    speedup_vs_compile: float = math.nan
    loss: float = math.nan
    loss_rel_err: float = math.nan
    other_cpu_busy: float = math.nan  # CPU share other processes took while this row ran


CSV_FIELDS = list(Row.__dataclass_fields__)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass
class BenchConfig:
    """Knobs of one run."""

    device: str = "cpu"
    budget_s: float = 1.0  # time spent on the timed repeats of one case x provider
    min_repeats: int = 3
    max_repeats: int = 1000
    warmup: int = 1  # warm-up calls after the first (compiling) call
    measure_memory: bool = True
    verbose: bool = True
    baselines: dict = field(default_factory=lambda: {"eager": "speedup_vs_eager",
                                                     "torch.compile": "speedup_vs_compile"})


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _L2Flusher:
    """Writes a buffer larger than the GPU's L2 cache so each repeat starts cold."""

    def __init__(self, device: str):
        self.buf = None
        if device.startswith("cuda"):
            self.buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def time_step(step: Callable[[], object], *, device: str = "cpu",
              reset: Callable[[], None] = lambda: None, budget_s: float = 1.0,
              min_repeats: int = 3, max_repeats: int = 1000, warmup: int = 1,
              flusher: Callable[[], None] | None = None) -> Timing:
    """Times ``step``: one first call (compiles, caches), warm-up calls (at least
    ``warmup``, more for a fast step until two agree), then as many repeats as fit in
    ``budget_s`` (within ``[min_repeats, max_repeats]``).
    ``reset`` (and, on GPU, an L2 flush) runs before every call, outside the timing.
    """
    cuda = device.startswith("cuda")
    flusher = flusher or (lambda: None)

    last = [None]

    def one() -> float:
        last[0] = None  # drop the previous output before the next call allocates
        reset()
        flusher()
        synchronize(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            last[0] = step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        last[0] = step()
        return time.perf_counter() - t0

    first = one()
    # Warm up until two consecutive calls agree (lazy init, compile caches, allocator
    # and CPU clocks settle); a step slower than 0.5 s needs no more than `warmup`.
    warm: list = []
    while True:
        warm.append(one())
        if len(warm) < warmup:
            continue
        if warm[-1] > max(0.3 * budget_s, 0.5) or sum(warm) > max(0.5 * budget_s, 1.0) or len(warm) >= 50:
            break
        if len(warm) >= 2 and max(warm[-2:]) <= 1.5 * min(warm[-2:]):
            break
    est = min(warm[-2:])
    repeats = int(max(min_repeats, min(max_repeats, budget_s / max(est, 1e-9))))
    times = [one() for _ in range(repeats)]
    return Timing(times_s=times, first_call_s=first, warmup=len(warm), last_output=last[0])


def first_touch_cost(shape: tuple, dtype: torch.dtype = torch.float32, device: str = "cpu",
                     repeats: int = 5) -> tuple:
    """Seconds to ``fill_`` a freshly allocated buffer and an already used one, medians.

    On CPU a fresh large buffer is new pages from the kernel (glibc ``mmap``s it), so
    the first write page-faults; every provider pays this for the gradient it returns.
    """
    reused = torch.empty(shape, dtype=dtype, device=device)
    reused.fill_(0)
    fresh_t, reused_t = [], []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        torch.empty(shape, dtype=dtype, device=device).fill_(1)
        synchronize(device)
        t1 = time.perf_counter()
        reused.fill_(1)
        synchronize(device)
        fresh_t.append(t1 - t0)
        reused_t.append(time.perf_counter() - t1)
    return statistics.median(fresh_t), statistics.median(reused_t)


def _replay_cpu_memory(prof) -> int:
    """Peak of the running sum of the allocator's records in a CPU profile."""
    events = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_extra_memory(step: Callable[[], object], *, device: str = "cpu",
                      reset: Callable[[], None] = lambda: None) -> int:
    """Peak bytes allocated by one ``step`` beyond what was allocated before it.

    Memory that ``step`` leaves allocated (e.g. a ``.grad``) counts, as it was
    allocated during the step. See the module docstring for the method.
    """
    reset()
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = step()
            del out
    return _replay_cpu_memory(prof)


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (Kineto prints profiler start / stop lines from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_bandwidth(device: str = "cpu", nbytes: int = 512 * 2**20, budget_s: float = 1.0) -> float:
    """Measured copy bandwidth in bytes/s: ``dst.copy_(src)`` moves 2 x ``nbytes``."""
    if device.startswith("cuda"):
        nbytes = max(nbytes, 2 * 2**30)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_step(lambda: dst.copy_(src), device=device, budget_s=budget_s,
                       min_repeats=5, warmup=2)
    return 2 * src.numel() * src.element_size() / timing.median_s


# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuLoadMonitor:
    """How busy the CPUs were with *other* processes between ``start()`` and ``stop()``.

    System-wide busy time from ``/proc/stat`` minus this process's CPU time, as a
    fraction of elapsed time x CPU count (0 = nothing else ran; on 2 cores, 0.5 =
    one core was taken by something else). Also the hypervisor's steal fraction.
    """

    def __init__(self):
        self._t0 = self._stat0 = self._own0 = None

    @staticmethod
    def _stat():
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6]  # user nice system irq softirq
        steal = vals[7] if len(vals) > 7 else 0
        return busy, steal

    def start(self) -> CpuLoadMonitor:
        self._t0, self._stat0, self._own0 = time.perf_counter(), self._stat(), time.process_time()
        return self

    def stop(self) -> dict:
        stat, own = self._stat(), time.process_time()
        elapsed = time.perf_counter() - self._t0
        if stat is None or self._stat0 is None or elapsed <= 0:
            return {}
        hz = os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        busy_s = (stat[0] - self._stat0[0]) / hz
        other = max(0.0, busy_s - (own - self._own0)) / (elapsed * ncpu)
        steal = (stat[1] - self._stat0[1]) / hz / (elapsed * ncpu)
        return {"other_cpu_busy": round(other, 3), "cpu_steal": round(steal, 3),
                "seconds": round(elapsed, 1)}


def wait_for_quiet(max_wait_s: float, *, threshold: float = 0.05, window_s: float = 3.0,
                   windows: int = 2, log: Callable[[str], None] = lambda m: None) -> bool:
    """Waits (up to ``max_wait_s``) until other processes use under ``threshold`` of the
    CPUs for ``windows`` consecutive ``window_s`` windows; returns whether they did."""
    start = time.perf_counter()
    quiet, next_log = 0, start
    while time.perf_counter() < start + max_wait_s:
        monitor = CpuLoadMonitor().start()
        time.sleep(window_s)
        busy = monitor.stop().get("other_cpu_busy", 0.0)
        quiet = quiet + 1 if busy < threshold else 0
        if quiet >= windows:
            return True
        if time.perf_counter() >= next_log:
            log(f"waiting for a quiet machine: other processes use {100 * busy:.0f}% of the CPUs")
            next_log += 60.0
    return False


def _mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return math.nan


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def machine_info(device: str) -> dict:
    """Facts that make a result reproducible: CPU / GPU, threads, versions, load."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _mem_total_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "loadavg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_name=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}",
                    gpu_sm_count=props.multi_processor_count)
    try:
        import kdfast

        info["kdfast"] = kdfast.build_info()
    except Exception as exc:  # the harness must describe a broken install too
        info["kdfast"] = {"error": repr(exc)}
    return info


def machine_tag(info: dict) -> str:
    """Short name for a results folder, e.g. ``cpu-amd-epyc-2c`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    if info["device"].startswith("cuda") and "gpu_name" in info:
        name = info["gpu_name"]
        suffix = ""
    else:
        name = re.sub(r"\((R|TM)\)|CPU|Processor|@.*$|\d+-Core", "", info["cpu_model"], flags=re.I)
        suffix = f"-{info['cpu_count']}c"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{info['device'].split(':')[0]}-{slug}{suffix}"


def describe_machine(info: dict) -> str:
    parts = [f"{info['cpu_model']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads, "
             f"{info['memory_gb']} GB RAM)"]
    if "gpu_name" in info:
        parts.append(f"GPU {info['gpu_name']} ({info['gpu_memory_gb']} GB, sm_{info['gpu_capability']})")
    parts.append(f"torch {info['torch']}" + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else ""))
    kd = info.get("kdfast", {})
    if kd.get("extension"):
        parts.append(f"kdfast {kd.get('version')} (extension, CPU kernel {kd.get('cpu_capability')}, "
                     f"CUDA {'yes' if kd.get('with_cuda') else 'no'})")
    else:
        parts.append(f"kdfast {kd.get('version')} WITHOUT the compiled extension (reference fallback)")
    parts.append(f"python {info['python']}, {info['platform']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _log(cfg: BenchConfig, msg: str) -> None:
    if cfg.verbose:
        print(msg, file=sys.stderr, flush=True)


def run_cases(cases: Iterable[Case], providers: Sequence[Provider], *,
              make_inputs: Callable[[Case], dict],
              reference_loss: Callable[[Case, dict], float] | None = None,
              config: BenchConfig, copy_bw: float) -> list:
    """Runs every provider on every case and returns one :class:`Row` each.

    Inputs are made once per ``case.input_key`` and shared by the providers (and
    by consecutive cases with the same key). ``reference_loss`` gives the value
    each provider's loss is checked against. A provider that raises gets a row
    with ``status="error"`` and the run goes on.
    """
    rows = []
    inputs, inputs_key, ref = None, None, math.nan
    for case in cases:
        if case.input_key != inputs_key:
            inputs = None
            synchronize(case.device)
            inputs, inputs_key = make_inputs(case), case.input_key
            ref = reference_loss(case, inputs) if reference_loss else math.nan
        case_rows = []
        for prov in providers:
            row = Row(op=case.op, case=case.name, shape="x".join(map(str, case.shape)),
                      dtype=case.dtype_name, mode=case.mode, device=case.device,
                      provider=prov.name, min_bytes=case.min_bytes)
            why = prov.unavailable(case.device)
            if why:
                row.status, row.note = "skipped", why
                case_rows.append(row)
                continue
            monitor = CpuLoadMonitor().start()
            try:
                _measure(case, prov, inputs, row, ref, config, copy_bw)
            except Exception as exc:  # one failing provider must not end the run
                if case.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                row.status, row.note = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            if not case.device.startswith("cuda"):
                row.other_cpu_busy = monitor.stop().get("other_cpu_busy", math.nan)
            _log(config, _progress_line(case, row))
            case_rows.append(row)
        _fill_ratios(case_rows, config)
        rows.extend(case_rows)
    return rows


def _measure(case: Case, prov: Provider, inputs: dict, row: Row, ref: float,
             config: BenchConfig, copy_bw: float) -> None:
    runner = prov.build(case, inputs)
    try:
        flusher = _L2Flusher(case.device)
        timing = time_step(runner.step, device=case.device, reset=runner.reset, flusher=flusher,
                           budget_s=config.budget_s, min_repeats=config.min_repeats,
                           max_repeats=config.max_repeats, warmup=config.warmup)
        del flusher
        row.median_ms, row.p20_ms, row.p80_ms = (1e3 * timing.median_s, 1e3 * timing.p20_s,
                                                 1e3 * timing.p80_s)
        row.repeats = len(timing.times_s)
        row.first_call_ms = 1e3 * timing.first_call_s
        row.achieved_gbps = case.min_bytes / timing.median_s / 1e9
        row.frac_copy_bw = case.min_bytes / timing.median_s / copy_bw
        loss = timing.last_output
        row.loss = float(loss.detach().float().sum()) if isinstance(loss, torch.Tensor) else math.nan
        timing.last_output = loss = None
        if not math.isnan(ref) and not math.isnan(row.loss):
            row.loss_rel_err = abs(row.loss - ref) / max(abs(ref), 1e-12)
        if config.measure_memory:
            row.peak_extra_bytes = peak_extra_memory(runner.step, device=case.device, reset=runner.reset)
            row.extra_over_logits = row.peak_extra_bytes / case.logits_bytes
        row.note = runner.note
    finally:
        runner.reset()  # free the gradient before the next provider runs


def _fill_ratios(case_rows: list, config: BenchConfig) -> None:
    by_name = {r.provider: r for r in case_rows if r.status == "ok"}
    for base, column in config.baselines.items():
        if base not in by_name:
            continue
        for r in case_rows:
            if r.status == "ok":
                setattr(r, column, by_name[base].median_ms / r.median_ms)


def _progress_line(case: Case, row: Row) -> str:
    if row.status != "ok":
        return f"  {case.label:<40} {row.provider:<14} {row.status}: {row.note}"
    mem = "" if math.isnan(row.peak_extra_bytes) else f"  +{row.peak_extra_bytes / 2**20:9.1f} MiB"
    return (f"  {case.label:<40} {row.provider:<14} {row.median_ms:10.3f} ms "
            f"[{row.p20_ms:.3f}, {row.p80_ms:.3f}] x{row.repeats:<4}{mem}  "
            f"{100 * row.frac_copy_bw:5.1f}% copy BW{_contention_mark(row)}")


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})


def read_csv(path: Path) -> list:
    """Reads a results CSV back into dicts (numbers as float / int)."""
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            for k, v in rec.items():
                kind = Row.__dataclass_fields__[k].type
                if kind in ("float", float):
                    rec[k] = float(v) if v not in ("", None) else math.nan
                elif kind in ("int", int):
                    rec[k] = int(v)
            out.append(rec)
    return out


def _fmt(x: float, spec: str, suffix: str = "") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def _fmt_bytes(n: float) -> str:
    if n is None or math.isnan(n):
        return "-"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def load_lines(info: dict) -> list:
    """Markdown lines on other processes' CPU use before / during the run, with a warning."""
    lines = []
    for key, when in (("cpu_load_before", "in the second before the run"),
                      ("cpu_load_during", "during the run")):
        load = info.get(key)
        if not load:
            continue
        text = (f"other processes used {100 * load['other_cpu_busy']:.0f}% of the CPU time {when}"
                f" (hypervisor steal {100 * load['cpu_steal']:.0f}%)")
        if load["other_cpu_busy"] > 0.05:
            text = f"**WARNING: {text}: CPU times are inflated by contention**"
        lines.append(text)
    return lines


CONTENTION_MARK_ABOVE = 0.05


def _contention_mark(row: Row) -> str:
    busy = row.other_cpu_busy
    return "" if math.isnan(busy) or busy <= CONTENTION_MARK_ABOVE else f" (!{100 * busy:.0f}%)"


# (header, legend) of the column that puts the peak extra memory against the gradient size
LOGITS_MEMORY_COLUMN = ("extra / logits",
                        "that over the bytes of one `[N, V]` input (= the gradient)")


def markdown_table(rows: Sequence[Row], *, memory_header: str = LOGITS_MEMORY_COLUMN[0]) -> str:
    head = ("| case | shape | dtype | mode | provider | median ms | p20 - p80 ms | x vs eager "
            f"| x vs compile | peak extra | {memory_header} | GB/s | % copy BW | reps |")
    lines = [head, "|" + " --- |" * 14]
    for r in rows:
        if r.status != "ok":
            continue
        lines.append(
            f"| {r.case} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} "
            f"| {_fmt(r.median_ms, '.3f')}{_contention_mark(r)} "
            f"| {_fmt(r.p20_ms, '.3f')} - {_fmt(r.p80_ms, '.3f')} | {_fmt(r.speedup_vs_eager, '.2f')} "
            f"| {_fmt(r.speedup_vs_compile, '.2f')} | {_fmt_bytes(r.peak_extra_bytes)} "
            f"| {_fmt(r.extra_over_logits, '.2f', 'x')} | {_fmt(r.achieved_gbps, '.1f')} "
            f"| {_fmt(100 * r.frac_copy_bw, '.1f')} | {r.repeats} |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[Row], path: Path, *, title: str, info: dict, copy_bw: float,
                   notes: Sequence[str] = (), extra_sections: Sequence[str] = (),
                   memory_column: tuple = LOGITS_MEMORY_COLUMN) -> None:
    """The results page: machine and load, notes, the table, rows not measured or
    flagged, then ``extra_sections`` (e.g. the targets). ``memory_column`` is the
    (header, legend) of the memory-over-gradient column."""
    memory_header, memory_legend = memory_column
    skipped = sorted({f"- **{r.provider}** skipped: {r.note}" for r in rows if r.status == "skipped"})
    errors = [f"- **{r.provider}** failed on {r.case} {r.shape} {r.dtype} {r.mode}: {r.note}"
              for r in rows if r.status == "error"]
    flagged = [f"- {r.provider} on {r.case} {r.shape} {r.dtype} {r.mode}: {r.note}"
               for r in rows if r.status == "ok" and r.note]
    parts = [f"# {title}", "",
             f"- machine: {describe_machine(info)}",
             f"- measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (`dst.copy_(src)`, 2 x bytes)",
             f"- date: {info['date']}, git {info['git_commit']}",
             f"- load average before the run: {info.get('loadavg_before')}"]
    parts += [f"- {line}" for line in load_lines(info)]
    parts += [f"- {n}" for n in notes]
    parts += ["", "Median over the repeats; `x vs eager` / `x vs compile` = that provider's median "
              "divided by this one's (higher is faster); `peak extra` = peak memory allocated by one "
              f"call beyond its inputs (gradient included); `{memory_header}` = {memory_legend}; "
              "`GB/s` = minimum traffic / median time; "
              "`(!N%)` after a time = other processes took N% of the CPUs while that row ran.", "",
              markdown_table(rows, memory_header=memory_header), ""]
    if skipped or errors:
        parts += ["## Not measured", "", *skipped, *errors, ""]
    if flagged:
        parts += ["## Notes on rows", "", *flagged, ""]
    parts += list(extra_sections)
    path.write_text("\n".join(parts).rstrip() + "\n")


def can_plot() -> bool:
    """Whether matplotlib can be imported (:func:`write_plot` needs it; nothing else does)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(rows: Sequence[Row], path: Path, *, title: str) -> None:
    """Grouped bars per case: time (log scale) and peak extra memory per provider.

    Needs matplotlib (check with :func:`can_plot`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    cases = list(dict.fromkeys(f"{r.case} {r.shape}\n{r.dtype} {r.mode}" for r in ok))
    providers = list(dict.fromkeys(r.provider for r in ok))
    width = 0.8 / max(len(providers), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(cases) + 2), 8), sharex=True)
    for ax, metric, ylabel in ((axes[0], "median_ms", "median time per call (ms)"),
                               (axes[1], "peak_extra_bytes", "peak extra memory (MiB)")):
        for i, prov in enumerate(providers):
            xs, ys = [], []
            for j, c in enumerate(cases):
                for r in ok:
                    if r.provider == prov and f"{r.case} {r.shape}\n{r.dtype} {r.mode}" == c:
                        v = getattr(r, metric)
                        if metric == "peak_extra_bytes":
                            v = v / 2**20
                        if not math.isnan(v) and v > 0:
                            xs.append(j + (i - (len(providers) - 1) / 2) * width)
                            ys.append(v)
            ax.bar(xs, ys, width=width, label=prov)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(ncol=len(providers), loc="upper left", fontsize="small")
    axes[0].set_title(title, fontsize="medium")
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels(cases, rotation=45, ha="right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_machine(info: dict, copy_bw: float, path: Path) -> None:
    path.write_text(json.dumps({**info, "copy_bandwidth_gbps": round(copy_bw / 1e9, 2)},
                               indent=2, default=str) + "\n")
