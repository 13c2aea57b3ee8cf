"""Benchmark of ``kdfast.sample_logits`` (what a sampled teacher cache stores) against eager
PyTorch, ``torch.compile`` and one read of the logits.

Cases: as :mod:`kdfast.bench.topk_logits` (``v32k``: N=4096, V=32000; ``v128k``: N=1024,
V=128000; GPU also ``v128k-4k``; ``--quick``: N=64, V=512), float32 and bfloat16, forward
only, ``num_samples=12`` and ``T=1`` (``--sample-num``, ``--sample-temperature``).

Providers:

- ``kdfast``: ``kdfast.sample_logits`` (the compiled kernels: inverse-CDF draws on the
  row's weights, each distinct token once with its count / S).
- ``eager``: ``softmax(logits.float() / T)``, ``torch.multinomial(..., S, replacement=True)``
  and the draws of each row counted (sort, first-of-run flags, scatter): the same output.
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``.
- ``floor``: ``logits.amax(-1)``, one read of the logits.

The loss column is the sum of the returned weights (1 per row), checked against N. Run it
with ``python -m kdfast bench --op sample_logits`` or
``python benchmarks/bench_sample_logits.py``.

Example::

    >>> from kdfast.bench import sample_logits as bench
    >>> bench.main(["--quick", "--out", "/tmp/sample-bench", "--providers", "eager,floor", "-q"])
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
from kdfast.bench.topk_logits import (
    GPU_ONLY,
    QUICK_SHAPES,
    SHAPES,
    floor_notes,
    floor_provider,
    logits_cases,
    logits_targets,
    make_inputs,
    no_grad_runner,
)

NAME = "sample_logits"
OP = "sample_logits"

TARGET_CASE = ("v32k", "fp32", "fwd")
TARGET_OVER_FLOOR = 2.0
TARGET_SPEEDUP_VS_EAGER = 5.0


def eager_sample_logits(logits: torch.Tensor, num_samples: int = 12, temperature: float = 1.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row's distinct draws' weights count / S, [N, S] (padding 0), as usually written."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator).sort(-1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.long().cumsum(-1) - 1
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    return counts.float() / num_samples


def reference_loss(case: Case, inputs: dict) -> float:
    """Every row's weights sum to 1."""
    return float(case.shape[0])


def loss_tolerance(dtype_name: str) -> float:
    return 1e-5


def _build_kdfast(case: Case, inputs: dict, note: str) -> Runner:
    import kdfast

    o, x = dict(case.params), inputs["logits"]
    gen = torch.Generator(device=case.device).manual_seed(0)
    return no_grad_runner(lambda: kdfast.sample_logits(x, o["num_samples"], temperature=o["temperature"],
                                                       generator=gen)[1], note)


def _build_eager(case: Case, inputs: dict) -> Runner:
    o, x = dict(case.params), inputs["logits"]
    gen = torch.Generator(device=case.device).manual_seed(0)
    return no_grad_runner(lambda: eager_sample_logits(x, **o, generator=gen))


def _build_compile(case: Case, inputs: dict) -> Runner:
    o, x = dict(case.params), inputs["logits"]
    fn = common.compile_fresh(eager_sample_logits)
    return no_grad_runner(lambda: fn(x, **o))


ALL_PROVIDERS = {
    "kdfast": common.kdfast_provider(OP, "sample_logits", _build_kdfast),
    "eager": Provider("eager", _build_eager,
                      description="`softmax(logits.float() / T)`, `torch.multinomial(replacement=True)`, "
                                  "draws counted per row"),
    "torch.compile": Provider("torch.compile", _build_compile,
                              description="the eager function under `torch.compile(dynamic=False)`"),
    "floor": floor_provider(),
}


def make_cases(device: str, *, quick: bool = False, shapes: Sequence[str] | None = None,
               dtypes: Sequence[str] = common.DTYPES, modes: Sequence[str] = ("fwd",),
               sample_num: int = 12, sample_temperature: float = 1.0) -> list:
    if not (sample_temperature > 0 and math.isfinite(sample_temperature)):
        raise ValueError(f"--sample-temperature: must be positive and finite, got {sample_temperature}")
    if not 1 <= sample_num <= 4096:
        raise ValueError(f"--sample-num: must be in [1, 4096], got {sample_num}")
    return logits_cases(BENCH, OP, device, quick, shapes, dtypes, modes,
                        (("num_samples", sample_num), ("temperature", sample_temperature)))


def check_targets(rows: Sequence[harness.Row], device: str) -> list:
    """kdfast at most 2 reads of the logits (v32k fp32), and on the CPU at least 5x eager."""
    return logits_targets(rows, device, OP, SHAPES, TARGET_CASE, TARGET_OVER_FLOOR, TARGET_SPEEDUP_VS_EAGER)


OPTIONS = (
    Option("--sample-num", 12, "sample_logits: draws per row (default 12)", type=int, metavar="S"),
    Option("--sample-temperature", 1.0, "sample_logits: softmax temperature (default 1.0)", type=float,
           metavar="T"),
)


def _notes(o: dict) -> list:
    return [f"num_samples={o['sample_num']}, T={o['sample_temperature']:g}; logits 3 * randn",
            *floor_notes("kdfast"), "loss column: the sum of the returned weights (N)"]


BENCH = common.OpBench(
    name=NAME, op=OP,
    summary="kdfast.sample_logits (draws with replacement, counted) against eager PyTorch, torch.compile "
            "and one read of the logits.",
    shapes=SHAPES, quick_shapes=QUICK_SHAPES, dim_names=("N", "V"), providers=ALL_PROVIDERS,
    options=OPTIONS, make_cases=make_cases, make_inputs=make_inputs, reference_loss=reference_loss,
    reference_name="N (every row's weights sum to 1)", loss_tolerance=loss_tolerance,
    check_targets=check_targets, notes=_notes, gpu_only=GPU_ONLY)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main_for(BENCH, argv, prog="kdfast-bench-sample-logits")


if __name__ == "__main__":
    sys.exit(main())
