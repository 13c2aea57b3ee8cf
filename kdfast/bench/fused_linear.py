"""Benchmark of ``kdfast.fused_linear_kd_loss`` (LM-head distillation without full logits)
against the same loss on materialised logits: unfused kdfast, eager PyTorch,
``torch.compile`` and Liger-Kernel's fused linear JSD.

Every provider computes, from the student's and the teacher's last hidden states
``h_s``, ``h_t`` (``[N, H]``) and LM-head weights ``W_s``, ``W_t`` (``[V, H]``), the KD
loss of the logits ``h_s @ W_s.T`` and ``h_t @ W_t.T``, and in forward + backward the
gradients of ``h_s`` and ``W_s`` (the teacher is frozen).

Cases: the SmolLM-135M head (H=576, V=49152) over N = 512, 1024, 2048, 4096 tokens
(``n512`` ... ``n4096``); on GPU also a Llama-3-8B head, N=8192, H=4096, V=128256
(``n8192``); ``--quick`` (or ``--shapes tiny``): N=64, H=32, V=512. Float32 and
bfloat16, forward and forward + backward (a CPU run is meant as ``--dtypes fp32 --modes
fwd+bwd``, a GPU run as ``--dtypes bf16``), at temperature 2 with pure soft-target KD
(``--fl-temperature``, ``--fl-alpha``, ``--fl-divergence``).

Providers:

- ``kdfast``: ``kdfast.fused_linear_kd_loss(h_s, W_s, h_t, W_t, labels, ...)``, chunk by
  chunk (``--fl-chunk-size``, default: its automatic size).
- ``kdfast-unfused``: ``kdfast.kd_loss(h_s @ W_s.T, h_t @ W_t.T, labels, ...)``: the same
  matrix products and the fused loss kernel, on materialised ``[N, V]`` logits.
- ``eager``: the same products and ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T),
  log_target=True, reduction="batchmean") * T * T`` (+ cross-entropy when ``alpha > 0``).
- ``torch.compile``: the eager function under ``torch.compile(dynamic=False)``, compiled
  afresh per case; up to N = ``--fl-compile-max-n`` (default 1024: on a small CPU the
  compile and the run of the larger cases take minutes each), an error row above.
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` (``jsd_beta=0``: forward KL; ``beta``
  for ``--fl-divergence jsd``), its loss times ``T * T``; only where ``liger_kernel``
  imports and a GPU is present, otherwise skipped with a note.

Peak extra memory is measured as for every op (:mod:`kdfast.bench.harness`): on the CPU
by replaying the allocator's records of one step under ``torch.profiler``, on a GPU
with ``torch.cuda.max_memory_allocated``; the gradients the step leaves in ``.grad``
count. The ``extra / logits`` column puts it against the bytes of one ``[N, V]`` logits
matrix in the case's dtype. Every loss is checked against a float64 softmax of the fp32
products, computed in chunks of rows.

Run it with ``python -m kdfast bench --op fused_linear`` (see ``--help``) or
``python benchmarks/bench_fused_linear.py``. It writes ``fused_linear.csv``,
``fused_linear.md``, ``fused_linear.png`` and ``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import fused_linear as bench
    >>> bench.main(["--quick", "--out", "/tmp/fl-bench", "--providers", "kdfast,eager", "-q"])
    0
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.bench import common, harness
from kdfast.bench.common import Option
from kdfast.bench.harness import Case, Provider, Runner

NAME = "fused_linear"
OP = "fused_linear_kd_loss"

# name -> (N, H, V, needs a GPU)
SHAPES = {
    "n512": (512, 576, 49152, False),
    "n1024": (1024, 576, 49152, False),
    "n2048": (2048, 576, 49152, False),
    "n4096": (4096, 576, 49152, False),
    "n8192": (8192, 4096, 128256, True),
}
QUICK_SHAPES = {"tiny": (64, 32, 512, False)}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
PROVIDERS = ("kdfast", "kdfast-unfused", "eager", "torch.compile", "liger")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
JSD_BETA = 0.5

# The targets (checked in every run's markdown, see check_targets).
CPU_TARGET_CASE = ("n4096", "fp32", "fwd+bwd")
GPU_TARGET_CASE = ("n8192", "bf16", "fwd+bwd")
TARGET_CPU_MEMORY_FRACTION_OF_EAGER = 1 / 8  # fused peak extra / eager peak extra
TARGET_CPU_TIME_OVER_UNFUSED = 1.1  # fused time / unfused kdfast time
TARGET_GPU_PEAK_EXTRA_BYTES = 3e9  # 3 GB
TARGET_GPU_TIME_OVER_LIGER = 1.0

LOGITS_COLUMN = ("extra / logits", "that over the bytes of one `[N, V]` logits matrix in the case's dtype")

# ---------------------------------------------------------------------------
# The eager baseline (also what torch.compile compiles) and the reference
# ---------------------------------------------------------------------------


def eager_kd_from_logits(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                         temperature: float = 2.0, alpha: float = 0.0, divergence: str = "forward_kl",
                         beta: float = JSD_BETA) -> torch.Tensor:
    """The KD loss of two ``[N, V]`` logits as it is usually written in PyTorch (batchmean)."""
    T = temperature
    log_q, log_p = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    if divergence == "forward_kl":
        kd = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    elif divergence == "reverse_kl":
        kd = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        kd = (beta * F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
              + (1 - beta) * F.kl_div(log_m, log_q, reduction="batchmean", log_target=True))
    else:
        raise ValueError(f"divergence: unknown {divergence!r}")
    kd = kd * T * T
    if alpha > 0:
        return (1 - alpha) * kd + alpha * F.cross_entropy(s, labels)
    return kd


def eager_fused_linear_kd(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                          labels: torch.Tensor | None = None, temperature: float = 2.0, alpha: float = 0.0,
                          divergence: str = "forward_kl", beta: float = JSD_BETA) -> torch.Tensor:
    """The LM-head products and :func:`eager_kd_from_logits`: the unfused code people write."""
    return eager_kd_from_logits(h_s @ w_s.T, h_t @ w_t.T, labels, temperature, alpha, divergence, beta)


REFERENCE_CHUNK_ROWS = 256  # float64 copies of a few rows of logits at a time


def reference_loss(case: Case, inputs: dict) -> float:
    """The loss in float64 from the products in float32 (for bf16 inputs, of the inputs
    upcast), row chunk by row chunk; what every provider is checked against."""
    o = _opts(case)
    h_s, w_s, h_t, w_t, labels = (inputs[k] for k in ("h_s", "w_s", "h_t", "w_t", "labels"))
    n = h_s.shape[0]
    total = 0.0
    with torch.no_grad():
        ws, wt = w_s.float(), w_t.float()
        for lo in range(0, n, REFERENCE_CHUNK_ROWS):
            hi = min(lo + REFERENCE_CHUNK_ROWS, n)
            s = (h_s[lo:hi].float() @ ws.T).double()
            t = (h_t[lo:hi].float() @ wt.T).double()
            total += float(eager_kd_from_logits(s, t, labels[lo:hi], o["temperature"], o["alpha"],
                                                o["divergence"], JSD_BETA)) * (hi - lo)
    return total / n


def loss_tolerance(dtype_name: str) -> float:
    return 1e-4 if dtype_name == "fp32" else 2e-2


REFERENCE_NAME = "the float64 loss of the fp32 products"

# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


def _opts(case: Case) -> dict:
    return dict(case.params)


def _runner(case: Case, inputs: dict, loss, note: str = "") -> Runner:
    """``loss(h_s, w_s, h_t, w_t, labels)`` as a timed step: under ``torch.no_grad()`` for
    ``fwd``; for ``fwd+bwd`` followed by ``backward()`` into ``h_s.grad`` and ``w_s.grad``,
    which ``reset`` drops (untimed) before each step."""
    args = tuple(inputs[k] for k in ("h_s", "w_s", "h_t", "w_t", "labels"))
    h_s, w_s = args[0], args[1]
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return loss(*args)
        return Runner(step=step, note=note)

    def step_bwd():
        out = loss(*args)
        out.backward()
        return out.detach()

    def reset():
        h_s.grad = None
        w_s.grad = None
    return Runner(step=step_bwd, reset=reset, note=note)


def _kd_kwargs(o: dict) -> dict:
    return dict(temperature=o["temperature"], alpha=o["alpha"], divergence=o["divergence"], beta=JSD_BETA)


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    o = _opts(case)
    chunk = o["chunk_size"] or None

    def fn(h_s, w_s, h_t, w_t, labels):
        return kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, chunk_size=chunk, **_kd_kwargs(o))
    if chunk is None:
        from kdfast.fused_linear import auto_chunk_size

        h_s = inputs["h_s"]
        n, v = case.shape
        rows = auto_chunk_size(n, v, 2 * h_s.element_size() + inputs["w_t"].element_size(), h_s.device)
        chunk_note = f"{rows} rows per chunk (automatic)"
    else:
        chunk_note = f"{min(chunk, case.shape[0])} rows per chunk (--fl-chunk-size)"
    return _runner(case, inputs, fn, "; ".join(x for x in (note, chunk_note) if x))


def _build_unfused(case: Case, inputs: dict) -> Runner:
    import kdfast

    o = _opts(case)
    note = ""
    if not kdfast.has_kernel("kd_loss_fused", case.device.split(":")[0]):
        note = "kdfast ran its plain-PyTorch reference (no compiled kernel for this device)"

    def fn(h_s, w_s, h_t, w_t, labels):
        return kdfast.kd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, **_kd_kwargs(o))
    return _runner(case, inputs, fn, note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    o = _opts(case)

    def fn(h_s, w_s, h_t, w_t, labels):
        return eager_fused_linear_kd(h_s, w_s, h_t, w_t, labels, **_kd_kwargs(o))
    return _runner(case, inputs, fn)


def _build_compile(case: Case, inputs: dict) -> Runner:
    o = _opts(case)
    n = case.shape[0]
    if n > o["compile_max_n"]:
        raise RuntimeError(f"not run at N={n} > --fl-compile-max-n {o['compile_max_n']} (compile time and "
                           "run time); raise it to measure")
    compiled = common.compile_fresh(eager_fused_linear_kd)

    def fn(h_s, w_s, h_t, w_t, labels):
        return compiled(h_s, w_s, h_t, w_t, labels, **_kd_kwargs(o))
    return _runner(case, inputs, fn)


def _liger_unavailable(device: str) -> str | None:
    if not device.startswith("cuda"):
        return "Liger-Kernel is Triton-only (needs a CUDA GPU); not run on CPU"
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401
    except Exception as exc:
        return f"liger_kernel's LigerFusedLinearJSD is not importable ({type(exc).__name__}: {exc})"
    return None


def _build_liger(case: Case, inputs: dict) -> Runner:
    from liger_kernel.transformers import LigerFusedLinearJSD

    o = _opts(case)
    if o["alpha"] > 0:
        raise NotImplementedError("liger: its fused linear JSD has no cross-entropy term; use --fl-alpha 0")
    betas = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": JSD_BETA}
    T = o["temperature"]
    loss_mod = LigerFusedLinearJSD(jsd_beta=betas[o["divergence"]], temperature=T)

    def fn(h_s, w_s, h_t, w_t, labels):
        return loss_mod(h_s, w_s, h_t, w_t) * (T * T)
    return _runner(case, inputs, fn)


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider(OP, "kd_loss_fused", _build_kdfast),
    "kdfast-unfused": Provider("kdfast-unfused", _build_unfused,
                               description="`kdfast.kd_loss(h_s @ W_s.T, h_t @ W_t.T, labels)` on "
                                           "materialised logits"),
    "eager": Provider("eager", _build_eager,
                      description="`h_s @ W_s.T`, `h_t @ W_t.T`, then `F.kl_div(F.log_softmax(s / T), "
                                  "F.log_softmax(t / T), log_target=True, reduction='batchmean') * T * T`"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function (products included) under "
                                          "`torch.compile(dynamic=False)`"),
    "liger": Provider("liger", _build_liger, unavailable=_liger_unavailable,
                      description="Liger-Kernel `LigerFusedLinearJSD` (jsd_beta=0: forward KL), times T * T"),
}

# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = common.DTYPES, modes: Sequence[str] = common.MODES,
               fl_temperature: float = 2.0, fl_alpha: float = 0.0, fl_divergence: str = "forward_kl",
               fl_chunk_size: int = 0, fl_compile_max_n: int = 1024) -> list:
    """The case list, shapes outermost so that cases sharing inputs run together.

    A case's ``shape`` is ``(N, V)`` (the logits the unfused providers materialise); the
    hidden size is its ``hidden`` parameter."""
    if not (fl_temperature > 0 and math.isfinite(fl_temperature)):
        raise ValueError(f"--fl-temperature: must be positive and finite, got {fl_temperature}")
    if not 0 <= fl_alpha <= 1:
        raise ValueError(f"--fl-alpha: must be in [0, 1], got {fl_alpha}")
    if fl_divergence not in DIVERGENCES:
        raise ValueError(f"--fl-divergence: choose from {', '.join(DIVERGENCES)}, got {fl_divergence!r}")
    if fl_chunk_size < 0:
        raise ValueError(f"--fl-chunk-size: must be >= 1 (or 0: automatic), got {fl_chunk_size}")
    cases = []
    for name in common.resolve_shapes(BENCH, device, quick, shapes):
        n, h, v = BENCH.all_shapes[name]
        params = (("hidden", h), ("temperature", fl_temperature), ("alpha", fl_alpha),
                  ("divergence", fl_divergence), ("chunk_size", fl_chunk_size),
                  ("compile_max_n", fl_compile_max_n))
        for dname in dtypes:
            dtype = harness.DTYPES_BY_NAME[dname]
            elem = dtype.itemsize
            for mode in modes:
                # the least traffic: read both hidden states and both heads; write the student's gradients
                elems = 2 * n * h + 2 * v * h + ((n * h + v * h) if mode == "fwd+bwd" else 0)
                cases.append(Case(op=OP, name=name, shape=(n, v), dtype=dtype, mode=mode, device=device,
                                  min_bytes=elems * elem, logits_bytes=n * v * elem, params=params))
    return cases


def make_inputs(case: Case) -> dict:
    """Hidden states ``N(0, 1)`` and heads ``N(0, 4 / H)`` (logits of standard deviation
    about 2); the teacher's head correlates with the student's. Labels uniform."""
    n, v = case.shape
    h = _opts(case)["hidden"]
    dev = case.device
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev)
    scale = 2 / math.sqrt(h)
    w_s = randn(v, h) * scale
    w_t = (0.8 * w_s + 0.6 * randn(v, h) * scale).to(case.dtype)
    h_s = randn(n, h)
    h_t = (0.8 * h_s + 0.6 * randn(n, h)).to(case.dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=dev)
    return {"h_s": h_s.to(case.dtype).requires_grad_(True), "w_s": w_s.to(case.dtype).requires_grad_(True),
            "h_t": h_t, "w_t": w_t, "labels": labels}


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _ratio(a: harness.Row | None, b: harness.Row | None, attr: str) -> float | None:
    if a is None or b is None:
        return None
    x, y = getattr(a, attr), getattr(b, attr)
    if math.isnan(x) or math.isnan(y) or y == 0:
        return None
    return x / y


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """The targets as ``(name, measured, goal, passed)``; passed is None when not measured.

    CPU, fp32, N=4096, H=576, V=49152, forward + backward: peak extra memory of
    ``kdfast`` at most 1/8 of ``eager``'s, time at most 1.1x ``kdfast-unfused``'s (the
    same products plus ``kd_loss``). GPU, bf16, N=8192, H=4096, V=128256: peak extra
    memory at most 3 GB, time at most Liger-Kernel's.
    """
    find, target = common.find, common.target
    if device.startswith("cuda"):
        key, label = GPU_TARGET_CASE, "GPU N=8192 H=4096 V=128256 bf16 fwd+bwd"
        mine = find(rows, "kdfast", *key)
        return [
            target(f"{label}: peak extra memory (GB)", mine and mine.peak_extra_bytes / 1e9, ".2f",
                   TARGET_GPU_PEAK_EXTRA_BYTES / 1e9, False),
            target(f"{label}: time / Liger-Kernel's",
                   _ratio(mine, find(rows, "liger", *key), "median_ms"), ".2f",
                   TARGET_GPU_TIME_OVER_LIGER, False),
        ]
    key, label = CPU_TARGET_CASE, "CPU N=4096 H=576 V=49152 fp32 fwd+bwd"
    mine = find(rows, "kdfast", *key)
    return [
        target(f"{label}: peak extra memory / eager's",
               _ratio(mine, find(rows, "eager", *key), "peak_extra_bytes"), ".3f",
               TARGET_CPU_MEMORY_FRACTION_OF_EAGER, False, goal_text="<= 1/8 = 0.125"),
        target(f"{label}: time / unfused kdfast's",
               _ratio(mine, find(rows, "kdfast-unfused", *key), "median_ms"), ".3f",
               TARGET_CPU_TIME_OVER_UNFUSED, False),
    ]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


OPTIONS = (
    Option("--fl-temperature", 2.0, "fused_linear: softmax temperature (default 2.0)", type=float,
           metavar="T"),
    Option("--fl-alpha", 0.0, "fused_linear: hard-label (cross-entropy) weight (default 0: pure KD)",
           type=float),
    Option("--fl-divergence", "forward_kl", "fused_linear: divergence (default forward_kl)",
           choices=DIVERGENCES),
    Option("--fl-chunk-size", 0, "fused_linear: rows per chunk of the kdfast provider (default 0: automatic)",
           type=int, metavar="ROWS"),
    Option("--fl-compile-max-n", 1024, "fused_linear: largest N torch.compile runs at (default 1024)",
           type=int, metavar="N"),
)


def _notes(o: dict) -> list:
    return [f"loss: divergence={o['fl_divergence']}, T={o['fl_temperature']:g}, alpha={o['fl_alpha']:g}"
            + (f", beta={JSD_BETA:g}" if o["fl_divergence"] == "jsd" else "")
            + "; batchmean over the N rows; the teacher frozen (no gradient), the student's gradients "
            "(`h_s.grad` `[N, H]`, `W_s.grad` `[V, H]`) count in the peak memory",
            "the `shape` column is `N x V` (the logits the unfused providers materialise); H = 576 for the "
            "shapes n512 to n4096, 4096 for n8192, 32 for tiny",
            "eager and torch.compile compute in the input dtype (the usual code), kdfast's loss kernel "
            "in fp32",
            "losses checked against a float64 softmax of the fp32 products (row chunks)"]


BENCH = common.OpBench(
    name=NAME, op=OP,
    summary="kdfast.fused_linear_kd_loss (LM head products and KD loss chunk by chunk) against unfused "
            "kdfast.kd_loss, eager PyTorch, torch.compile and the fused linear JSD of Liger Kernel.",
    shapes={k: (n, h, v) for k, (n, h, v, _) in SHAPES.items()},
    quick_shapes={k: (n, h, v) for k, (n, h, v, _) in QUICK_SHAPES.items()},
    gpu_only=frozenset(k for k, (*_, gpu) in ALL_SHAPES.items() if gpu),
    dim_names=("N", "H", "V"), providers=ALL_PROVIDERS, options=OPTIONS,
    make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name=REFERENCE_NAME, loss_tolerance=loss_tolerance, check_targets=check_targets,
    notes=_notes, memory_column=LOGITS_COLUMN)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-fused-linear")


if __name__ == "__main__":
    sys.exit(main())
