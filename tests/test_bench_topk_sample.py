"""Smoke tests of the topk_logits and sample_logits benchmarks: quick runs write the rows of
every provider (the floor's without a loss), the losses match their references, the targets
table is there; the eager baselines against float64 references; option checks. Timings are
not asserted."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import bench
from kdfast.__main__ import main as kdfast_main
from kdfast.bench import harness, sample_logits, topk_logits

MODULES = {"topk_logits": topk_logits, "sample_logits": sample_logits}


def _quick(name, out, *args):
    argv = ["bench", "--op", name, "--quick", "--device", "cpu", "--out", str(out), "-q", "--no-plot", *args]
    assert kdfast_main(argv) == 0
    return harness.read_csv(out / f"{name}.csv")


def test_registered():
    assert {"topk_logits", "sample_logits"} <= set(bench.BENCHMARKS)
    assert bench.load("topk_logits") is topk_logits.BENCH
    assert bench.load("sample_logits") is sample_logits.BENCH


@pytest.mark.parametrize("name", list(MODULES))
def test_quick_run(tmp_path, name):
    module = MODULES[name]
    providers = "eager,torch.compile,floor" + (",kdfast" if kdfast.has_extension() else "")
    rows = _quick(name, tmp_path / "b", "--providers", providers)
    assert {r["mode"] for r in rows} == {"fwd"} and {r["dtype"] for r in rows} == {"fp32", "bf16"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["min_bytes"] == 64 * 512 * (4 if r["dtype"] == "fp32" else 2)
        if r["provider"] == "floor":
            assert r["loss"] != r["loss"]  # NaN: nothing to check
        else:
            assert r["loss_rel_err"] < module.loss_tolerance(r["dtype"]), r
        if r["provider"] == "kdfast":  # the outputs only: int64 indices and float32 values
            width = 64 if name == "topk_logits" else 12
            logits_bytes = r["min_bytes"]
            assert r["extra_over_logits"] * logits_bytes <= 64 * width * 12 + 4096, r
    md = (tmp_path / "b" / f"{name}.md").read_text()
    assert "## Targets" in md and "one read of the logits" in md


def test_quick_run_without_modes_it_has(tmp_path):
    rows = _quick("topk_logits", tmp_path / "b", "--providers", "floor", "--modes", "fwd+bwd")
    assert rows == []


def test_eager_topk_matches_reference():
    x = torch.randn(5, 300, dtype=torch.float64)
    case = harness.Case(op="topk_logits", name="x", shape=(5, 300), dtype=torch.float64, mode="fwd",
                        device="cpu", min_bytes=0, logits_bytes=0, params=(("k", 7), ("temperature", 2.0)))
    ref = topk_logits.reference_loss(case, {"logits": x})
    assert float(topk_logits.eager_topk_logits(x, k=7, temperature=2.0).sum()) == pytest.approx(ref, rel=1e-6)


def test_eager_sample_counts_draws():
    x = torch.randn(50, 20)
    w = sample_logits.eager_sample_logits(x, num_samples=12, generator=torch.Generator().manual_seed(0))
    assert w.shape == (50, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    assert ((w * 12).round() == w * 12).all()


def test_bad_options():
    with pytest.raises(ValueError, match="--topk-k"):
        topk_logits.make_cases("cpu", quick=True, topk_k=0)
    with pytest.raises(ValueError, match="--sample-temperature"):
        sample_logits.make_cases("cpu", quick=True, sample_temperature=-1.0)


def test_targets_from_rows():
    def row(provider, ms):
        return harness.Row(op="topk_logits", case="v32k", shape="4096x32000", dtype="fp32", mode="fwd",
                           device="cpu", provider=provider, median_ms=ms)
    targets = topk_logits.check_targets([row("kdfast", 30.0), row("floor", 20.0), row("eager", 600.0)], "cpu")
    assert [t[3] for t in targets] == [True, True]
    targets = topk_logits.check_targets([row("kdfast", 50.0), row("floor", 20.0)], "cuda")
    assert len(targets) == 1 and targets[0][3] is False
