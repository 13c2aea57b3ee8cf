"""Smoke test of the benchmark harness and ``python -m kdfast bench --quick``.

Checks the measuring instruments on known cases (a 100 MB temporary reads as 100 MB
of peak memory) and that a quick run writes a CSV / markdown / PNG with the
expected providers and sane numbers. Timings themselves are not asserted.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import kdfast
from kdfast.__main__ import main as kdfast_main
from kdfast.bench import harness
from kdfast.bench import kd_loss as kb

MB = 10**6


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert harness.percentile(xs, 50) == 3.0
    assert harness.percentile(xs, 20) == pytest.approx(1.8)
    assert harness.percentile(xs, 80) == pytest.approx(4.2)
    assert math.isnan(harness.percentile([], 50))


def test_peak_memory_cpu_temporary_and_kept():
    def temporary():  # 100 MB allocated, written and freed inside the step
        x = torch.empty(25 * MB, dtype=torch.float32)
        x.fill_(1.0)
        return float(x[0])

    peak = harness.peak_extra_memory(temporary, device="cpu")
    assert peak == pytest.approx(100 * MB, rel=0.01)

    kept = []

    def keep_two():  # 40 MB kept + a 20 MB temporary on top: peak 60 MB
        kept.append(torch.ones(10 * MB))
        tmp = torch.ones(5 * MB)
        return tmp.sum()

    peak = harness.peak_extra_memory(keep_two, device="cpu", reset=kept.clear)
    assert peak == pytest.approx(60 * MB, rel=0.01)


def test_peak_memory_sees_backward():
    x = torch.randn(256, 1000, requires_grad=True)

    def reset():
        x.grad = None

    def step():  # exp saves its output; backward makes the gradient (and a temporary)
        x.exp().sum().backward()

    peak = harness.peak_extra_memory(step, device="cpu", reset=reset)
    grad_bytes = x.numel() * 4
    assert 2 * grad_bytes <= peak <= 4 * grad_bytes


def test_time_step_counts_repeats():
    calls = []
    timing = harness.time_step(lambda: calls.append(1), budget_s=0.01, min_repeats=4, max_repeats=7)
    assert 4 <= len(timing.times_s) <= 7
    assert timing.p20_s <= timing.median_s <= timing.p80_s
    assert len(calls) == 1 + timing.warmup + len(timing.times_s)


def test_machine_tag_is_a_folder_name():
    info = harness.machine_info("cpu")
    tag = harness.machine_tag(info)
    assert tag.startswith("cpu-") and "/" not in tag and " " not in tag


def test_info_command(capsys):
    assert kdfast_main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == kdfast.__version__


def test_quick_bench_writes_csv_md_png(tmp_path):
    out = tmp_path / "bench"
    assert kdfast_main(["bench", "--quick", "--device", "cpu", "--dtypes", "fp32", "--modes", "fwd+bwd",
                        "--out", str(out), "-q"]) == 0
    rows = harness.read_csv(out / "kd_loss.csv")
    by_provider = {r["provider"]: r for r in rows}
    assert set(by_provider) == set(kb.PROVIDERS)
    assert by_provider["liger"]["status"] == "skipped" and by_provider["liger"]["note"]
    n, v = kb.QUICK_SHAPES["tiny"][:2]
    for name in ("kdfast", "eager", "torch.compile"):
        r = by_provider[name]
        assert r["status"] == "ok", r
        assert r["shape"] == f"{n}x{v}" and r["mode"] == "fwd+bwd" and r["dtype"] == "fp32"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] < 10_000
        assert r["repeats"] >= 1
        assert r["loss_rel_err"] < 1e-4
        assert r["min_bytes"] == 3 * n * v * 4
        assert 0 < r["frac_copy_bw"] and r["achieved_gbps"] > 0
        # every provider returns a gradient: at least one gradient's worth of memory
        assert r["extra_over_logits"] >= 0.99
    assert by_provider["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert by_provider["torch.compile"]["speedup_vs_compile"] == pytest.approx(1.0)
    if kdfast.has_kernel("kd_loss_forward", "cpu"):
        # no hidden [N, V] temporaries: the gradient plus O(N) statistics
        assert by_provider["kdfast"]["extra_over_logits"] < 1.25

    md = (out / "kd_loss.md").read_text()
    assert "| provider |" in md and "## Targets" in md and "liger" in md
    png = (out / "kd_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    machine = json.loads((out / "machine.json").read_text())
    assert machine["copy_bandwidth_gbps"] > 0 and machine["kdfast"]["version"] == kdfast.__version__
