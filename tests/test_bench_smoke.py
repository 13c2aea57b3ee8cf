"""Smoke test of the benchmark harness and ``python -m kdfast bench --quick``.

Checks the measuring instruments on known cases (a 100 MB temporary reads as 100 MB
of peak memory), that a quick run writes a CSV / markdown / PNG with the expected
providers and sane numbers (and still succeeds, without the PNG, when matplotlib
is missing), and the target checks on made-up rows. Timings themselves are not
asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast.__main__ import build_parser
from kdfast.__main__ import main as kdfast_main
from kdfast.bench import harness
from kdfast.bench import kd_loss as kb

MB = 10**6
ROOT = Path(__file__).resolve().parents[1]


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
    if kdfast.has_kernel("kd_loss_fused", "cpu"):
        # no hidden [N, V] temporaries: the gradient plus O(N) statistics
        assert by_provider["kdfast"]["extra_over_logits"] < 1.25

    md = (out / "kd_loss.md").read_text()
    assert "| provider |" in md and "## Targets" in md and "liger" in md
    png = (out / "kd_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    machine = json.loads((out / "machine.json").read_text())
    assert machine["copy_bandwidth_gbps"] > 0 and machine["kdfast"]["version"] == kdfast.__version__


def test_bench_without_matplotlib_skips_the_plot(tmp_path):
    """A missing matplotlib costs only the PNG: a note, exit status 0, CSV and markdown written."""
    out = tmp_path / "bench"
    # None in sys.modules makes every `import matplotlib` raise ImportError, as if not installed
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "from kdfast.__main__ import main; sys.exit(main(sys.argv[1:]))")
    args = ["bench", "--quick", "--device", "cpu", "--providers", "kdfast,eager", "--dtypes", "fp32",
            "--modes", "fwd", "--no-memory", "--out", str(out)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "matplotlib is not installed; skipping the plot (pip install matplotlib)" in proc.stderr
    assert "kd_loss.png" not in proc.stdout
    assert not (out / "kd_loss.png").exists()
    rows = harness.read_csv(out / "kd_loss.csv")
    assert {r["provider"] for r in rows} == {"kdfast", "eager"}
    assert "| provider |" in (out / "kd_loss.md").read_text()


def test_tiny_shape_selectable_without_quick():
    cases = kb.make_cases("cpu", shapes=["tiny"], dtypes=["fp32"], modes=["fwd"])
    assert [(c.name, c.shape) for c in cases] == [("tiny", kb.QUICK_SHAPES["tiny"][:2])]
    args = build_parser().parse_args(["bench", "--shapes", "tiny,cls"])
    assert args.shapes == ["tiny", "cls"] and not args.quick


def _row(provider, case, dtype, mode, median_ms, **kw):
    return harness.Row(op="kd_loss", case=case, shape="", dtype=dtype, mode=mode, device="cpu",
                       provider=provider, median_ms=median_ms, **kw)


def _ratios(rows):
    for r in rows:
        same_case = [p for p in rows if (p.case, p.dtype, p.mode) == (r.case, r.dtype, r.mode)]
        base = {p.provider: p.median_ms for p in same_case}
        r.speedup_vs_eager = base["eager"] / r.median_ms
        r.speedup_vs_compile = base["torch.compile"] / r.median_ms
    return rows


def test_cpu_targets_met_and_missed():
    rows = _ratios([
        _row("kdfast", "llm", "fp32", "fwd+bwd", 100.0, extra_over_logits=1.01),
        _row("eager", "llm", "fp32", "fwd+bwd", 1300.0),
        _row("torch.compile", "llm", "fp32", "fwd+bwd", 290.0),  # 2.9x: missed
        _row("kdfast", "llm", "fp32", "fwd", 50.0),
        _row("eager", "llm", "fp32", "fwd", 900.0),
        _row("torch.compile", "llm", "fp32", "fwd", 210.0),
        _row("kdfast", "cls", "fp32", "fwd", 1.0),
        _row("eager", "cls", "fp32", "fwd", 2.0),
        _row("torch.compile", "cls", "fp32", "fwd", 1.1),
        _row("kdfast", "cls", "bf16", "fwd+bwd", 1.0),
        _row("eager", "cls", "bf16", "fwd+bwd", 1.4),  # 1.4x eager: missed, and the worst row
        _row("torch.compile", "cls", "bf16", "fwd+bwd", 1.2),
    ])
    status = {name: passed for name, _, _, passed in kb.check_targets(rows, "cpu")}
    fwd_bwd = "CPU N=4096 V=32000 fp32 T=2 fwd+bwd"
    assert status[f"{fwd_bwd}: speed-up vs eager"] is True
    assert status[f"{fwd_bwd}: speed-up vs torch.compile"] is False
    assert status["CPU N=4096 V=32000 fp32 T=2 fwd: speed-up vs torch.compile"] is True
    assert status[f"{fwd_bwd}: peak extra memory / gradient size"] is True
    assert status["cls 256x1000, every dtype and mode (worst: fp32 fwd): speed-up vs torch.compile"] is True
    assert status["cls 256x1000, every dtype and mode (worst: bf16 fwd+bwd): speed-up vs eager"] is False
    assert status["tiny 64x512, every dtype and mode: speed-up vs eager"] is None  # not run
    md = kb.targets_markdown(kb.check_targets(rows, "cpu"))
    assert "| >= 12 |" in md and "| >= 3 |" in md and "| <= 1.05 |" in md and "**missed**" in md


def test_gpu_targets():
    rows = [_row("kdfast", "llm-large", "bf16", "fwd+bwd", 2.0, frac_copy_bw=0.8, extra_over_logits=1.0),
            _row("liger", "llm-large", "bf16", "fwd+bwd", 5.0)]
    targets = {name.split(": ", 1)[1]: (measured, passed) for name, measured, _, passed
               in kb.check_targets(rows, "cuda") if name.startswith("GPU")}
    assert targets["time / (6*N*V bytes at the copy bandwidth)"] == ("1.25", True)  # 1 / 0.8
    assert targets["speed-up vs Liger-Kernel"] == ("2.50", False)
    assert targets["peak extra memory / gradient size"] == ("1.000", True)
