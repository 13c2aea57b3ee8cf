"""Benchmark of ``kdfast.topk_logits`` (what a top-k teacher cache stores) against eager
PyTorch, ``torch.compile`` and one read of the logits.

Cases: LLM teacher logits, N=4096 rows of V=32000 (``v32k``) and N=1024 rows of V=128000
(``v128k``; on GPU also N=4096, ``v128k-4k``); a tiny N=64, V=512 with ``--quick`` or
``--shapes tiny``; float32 and bfloat16, forward only (a cache writer runs the teacher under
``torch.no_grad()``), ``k=64`` and ``T=1`` (``--topk-k``, ``--topk-temperature``).

Providers:

- ``kdfast``: ``kdfast.topk_logits`` (the compiled kernels: the top k and the row's
  log-normaliser in one pass; the plain-PyTorch reference, flagged in the notes, when
  they are not built).
- ``eager``: ``torch.topk`` of the logits and ``log_softmax(logits.float() / T)`` gathered
  there (the usual code; it writes an ``[N, V]`` float32 temporary).
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``.
- ``floor``: ``logits.amax(-1)``, one read of the logits: the memory-bandwidth floor any
  top-k must pay. A teacher-cache build must add at most 10 % to the teacher's forward,
  so the ops are held to a small multiple of this read (see the targets).

Every provider's sum of log-probabilities is checked against a float64 reference. Run it
with ``python -m kdfast bench --op topk_logits`` or ``python benchmarks/bench_topk_logits.py``;
it writes ``topk_logits.csv``, ``.md``, ``.png`` and ``machine.json`` into ``--out``.

Example::

    >>> from kdfast.bench import topk_logits as bench
    >>> bench.main(["--quick", "--out", "/tmp/topk-bench", "--providers", "eager,floor", "-q"])
    0
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from kdfast.bench import common, harness
from kdfast.bench.common import Option
from kdfast.bench.harness import Case, Provider, Runner

NAME = "topk_logits"
OP = "topk_logits"

SHAPES = {"v32k": (4096, 32000), "v128k": (1024, 128000), "v128k-4k": (4096, 128000)}  # name -> (N, V)
GPU_ONLY = frozenset({"v128k-4k"})
QUICK_SHAPES = {"tiny": (64, 512)}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
MODES = ("fwd",)

# Targets (every device): kdfast's time at most this many reads of the logits (the floor
# provider), and on the CPU at least this speed-up over eager, fp32, on v32k.
TARGET_CASE = ("v32k", "fp32", "fwd")
TARGET_OVER_FLOOR = 2.0
TARGET_SPEEDUP_VS_EAGER = 5.0

REFERENCE_CHUNK_ROWS = 256


def eager_topk_logits(logits: torch.Tensor, k: int = 64, temperature: float = 1.0) -> torch.Tensor:
    """The top k's log-probabilities as usually written: torch.topk and a gathered log_softmax."""
    idx = logits.topk(k, dim=-1).indices
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, idx)


def reference_loss(case: Case, inputs: dict) -> float:
    """The sum of the top k's log-probabilities, float64."""
    o = dict(case.params)
    x = inputs["logits"]
    total = 0.0
    for i in range(0, x.shape[0], REFERENCE_CHUNK_ROWS):
        rows = x[i:i + REFERENCE_CHUNK_ROWS].double()
        lp = torch.log_softmax(rows / o["temperature"], dim=-1)
        total += float(lp.topk(o["k"], dim=-1).values.sum())
    return total


def loss_tolerance(dtype_name: str) -> float:
    return 1e-5 if dtype_name == "fp32" else 1e-3


# ---------------------------------------------------------------------------
# Providers (the floor is shared with kdfast.bench.sample_logits)
# ---------------------------------------------------------------------------


def no_grad_runner(fn, note: str = "") -> Runner:
    def step():
        with torch.no_grad():
            return fn()
    return Runner(step=step, note=note)


def floor_provider() -> Provider:
    def build(case: Case, inputs: dict) -> Runner:
        x = inputs["logits"]
        return no_grad_runner(lambda: (x.amax(-1),))  # not a tensor: no loss to check
    return Provider("floor", build, description="`logits.amax(-1)`: one read of the logits, the "
                                                "memory-bandwidth floor")


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    o, x = dict(case.params), inputs["logits"]
    return no_grad_runner(lambda: kdfast.topk_logits(x, o["k"], temperature=o["temperature"])[1], note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    o, x = dict(case.params), inputs["logits"]
    return no_grad_runner(lambda: eager_topk_logits(x, **o))


def _build_compile(case: Case, inputs: dict) -> Runner:
    o, x = dict(case.params), inputs["logits"]
    fn = common.compile_fresh(eager_topk_logits)
    return no_grad_runner(lambda: fn(x, **o))


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider(OP, "topk_logits", _build_kdfast),
    "eager": Provider("eager", _build_eager,
                      description="`logits.topk(k)` and `log_softmax(logits.float() / T)` gathered there"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function under `torch.compile(dynamic=False)`"),
    "floor": floor_provider(),
}

# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------


def logits_cases(bench: common.OpBench, op: str, device: str, quick: bool, shapes, dtypes, modes,
                 params: tuple) -> list:
    """Forward-only cases of a one-input op over [N, V] logits (least traffic: one read)."""
    cases = []
    for name in common.resolve_shapes(bench, device, quick, shapes):
        n, v = bench.all_shapes[name]
        cases += common.shape_cases(op, device, name, (n, v), dtypes=dtypes,
                                    modes=[m for m in modes if m in MODES], input_elems=n * v,
                                    grad_elems=n * v, params=params)
    return cases


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = common.DTYPES, modes: Sequence[str] = MODES,
               topk_k: int = 64, topk_temperature: float = 1.0) -> list:
    if not (topk_temperature > 0 and math.isfinite(topk_temperature)):
        raise ValueError(f"--topk-temperature: must be positive and finite, got {topk_temperature}")
    if not 1 <= topk_k <= 4096:
        raise ValueError(f"--topk-k: must be in [1, 4096], got {topk_k}")
    return logits_cases(BENCH, OP, device, quick, shapes, dtypes, modes,
                        (("k", topk_k), ("temperature", topk_temperature)))


def make_inputs(case: Case) -> dict:
    n, v = case.shape
    gen = torch.Generator(device=case.device).manual_seed(0)
    return {"logits": (3 * torch.randn(n, v, generator=gen, device=case.device)).to(case.dtype)}


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def over_floor(rows: Sequence[harness.Row], key: tuple) -> float | None:
    """kdfast's median time over the floor's (one read of the logits) on ``key``."""
    mine, floor = common.find(rows, "kdfast", *key), common.find(rows, "floor", *key)
    return mine.median_ms / floor.median_ms if mine and floor else None


def logits_targets(rows: Sequence[harness.Row], device: str, op: str, shapes: dict, case: tuple,
                   over: float, vs_eager: float) -> list:
    n, v = shapes[case[0]]
    label = f"N={n} V={v} {case[1]}"
    targets = [common.target(f"{label}: time / one read of the logits (`amax`)", over_floor(rows, case),
                             ".2f", over, False)]
    if not device.startswith("cuda"):
        targets.append(common.target(f"CPU {label}: speed-up vs eager", common.speedup(rows, "eager", case),
                                     ".2f", vs_eager, True))
    return targets


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """kdfast at most 2 reads of the logits (v32k fp32), and on the CPU at least 5x eager."""
    return logits_targets(rows, device, OP, SHAPES, TARGET_CASE, TARGET_OVER_FLOOR, TARGET_SPEEDUP_VS_EAGER)


def floor_notes(rows_name: str) -> list:
    return [f"`floor` reads the logits once (`amax`): {rows_name}'s time over it is the cost of the op "
            "beyond that one read, which a teacher-cache build adds to the teacher's forward",
            "forward only: a cache writer runs the teacher under `torch.no_grad()`"]


OPTIONS = (
    Option("--topk-k", 64, "topk_logits: entries kept per row (default 64)", type=int, metavar="K"),
    Option("--topk-temperature", 1.0, "topk_logits: softmax temperature (default 1.0)", type=float,
           metavar="T"),
)


def _notes(o: dict) -> list:
    return [f"k={o['topk_k']}, T={o['topk_temperature']:g}; logits 3 * randn", *floor_notes("kdfast"),
            "loss column: the sum of the returned log-probabilities, checked against float64"]


BENCH = common.OpBench(
    name=NAME, op=OP,
    summary="kdfast.topk_logits (top k + full-vocabulary log-probabilities) against eager PyTorch, "
            "torch.compile and one read of the logits.",
    shapes=SHAPES, quick_shapes=QUICK_SHAPES, dim_names=("N", "V"), providers=ALL_PROVIDERS,
    options=OPTIONS, make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name="the fp64 reference", loss_tolerance=loss_tolerance, check_targets=check_targets,
    notes=_notes, gpu_only=GPU_ONLY)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-topk-logits")


if __name__ == "__main__":
    sys.exit(main())
