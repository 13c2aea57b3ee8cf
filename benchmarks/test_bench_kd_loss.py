"""kd_loss benchmarks as pytest-benchmark tests: ``pytest benchmarks --benchmark-only``.

The same cases and providers as ``python -m kdfast bench`` (``kdfast.bench.kd_loss``),
one test per device x case x provider. The default set is small: classification
shape in fp32 / bf16, forward and forward + backward, plus the CPU target case
(N=4096, V=32000, fp32, forward + backward); ``--kd-bench-all`` runs every case.
CUDA cases skip without a GPU; Liger-Kernel skips when it cannot be imported.

Compare providers with e.g. ``pytest benchmarks --benchmark-only
--benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kdfast.bench import harness
from kdfast.bench import kd_loss as kb

ALL = os.environ.get("KDFAST_BENCH_ALL", "") not in ("", "0")
DEFAULT_SET = {("cls", "fp32", "fwd"), ("cls", "fp32", "fwd+bwd"), ("cls", "bf16", "fwd"),
               ("cls", "bf16", "fwd+bwd"), ("llm", "fp32", "fwd+bwd")}


def _cases():
    params = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")] \
            if device == "cuda" else []
        for case in kb.make_cases(device):
            if not ALL and (case.name, case.dtype_name, case.mode) not in DEFAULT_SET:
                continue
            ident = f"{device}-{case.name}-{case.dtype_name}-{case.mode}"
            params.append(pytest.param(case, id=ident, marks=marks))
    return params


_inputs_cache: dict = {}


def _inputs(case: harness.Case) -> dict:
    """Inputs of the last case key only: LLM-sized inputs are large."""
    if case.input_key not in _inputs_cache:
        _inputs_cache.clear()
        _inputs_cache[case.input_key] = kb.make_inputs(case)
    return _inputs_cache[case.input_key]


@pytest.mark.parametrize("provider", kb.PROVIDERS)
@pytest.mark.parametrize("case", _cases())
def test_kd_loss(benchmark, case: harness.Case, provider: str):
    prov = kb.ALL_PROVIDERS[provider]
    why = prov.unavailable(case.device)
    if why:
        pytest.skip(why)
    runner = prov.build(case, _inputs(case))
    cuda = case.device.startswith("cuda")

    def step():
        out = runner.step()
        if cuda:
            torch.cuda.synchronize()
        return out

    # Warm up (torch.compile compiles here) and size the rounds to about 1 s.
    runner.reset()
    step()
    runner.reset()
    timing = harness.time_step(step, device=case.device, reset=runner.reset, budget_s=0.2,
                               min_repeats=1, max_repeats=5)
    rounds = int(min(200, max(3, 1.0 / timing.median_s)))

    def setup():
        runner.reset()

    benchmark.group = f"{case.device} {case.label}"
    benchmark.extra_info.update(shape=list(case.shape), dtype=case.dtype_name, mode=case.mode,
                                min_bytes=case.min_bytes, device=case.device,
                                peak_extra_bytes=harness.peak_extra_memory(step, device=case.device,
                                                                           reset=runner.reset))
    loss = benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    runner.reset()
    ref = kb.reference_loss(case, _inputs(case))
    assert abs(float(loss) - ref) <= kb.loss_tolerance(case.dtype_name) * max(abs(ref), 1e-6) + 1e-6
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["achieved_gbps"] = case.min_bytes / stats.median / 1e9
