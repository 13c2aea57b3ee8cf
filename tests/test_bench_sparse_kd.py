"""Smoke tests of the sparse_kd_loss benchmark (``kdfast bench --op sparse_kd``): a quick
run, the eager baseline and the float64 reference against the tests' own reference, the
dense provider's rows, the options and the targets."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_helpers import ref_sparse, topk_teacher

import kdfast
from kdfast.__main__ import main as kdfast_main
from kdfast.bench import harness
from kdfast.bench import sparse_kd as bench


def _quick(out, *args):
    argv = ["bench", "--op", "sparse_kd", "--quick", "--device", "cpu", "--out", str(out), "-q", "--no-plot",
            *args]
    assert kdfast_main(argv) == 0
    return harness.read_csv(out / "sparse_kd.csv")


def test_quick_run(tmp_path):
    rows = _quick(tmp_path / "bench", "--providers", "kdfast,kdfast-dense,eager", "--dtypes", "fp32")
    cases = {r["case"] for r in rows}
    assert cases == {"tiny-renormalize", "tiny-residual"}
    assert {r["provider"] for r in rows} == {"kdfast", "kdfast-dense", "eager"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        if r["provider"] == "kdfast-dense":  # another loss: not checked against the sparse reference
            assert math.isnan(r["loss"]) and "differs" not in r["note"]
        else:
            assert r["loss_rel_err"] < bench.loss_tolerance("fp32"), r
            assert "differs" not in r["note"]
        if r["mode"] == "fwd+bwd" and r["provider"] != "eager":
            assert 1.0 <= r["extra_over_logits"] <= 1.1, r
    text = (tmp_path / "bench" / "sparse_kd.md").read_text()
    assert "`kdfast-dense` = `kdfast.kd_loss` on the dense teacher logits" in text


def test_one_tail_and_temperature(tmp_path):
    rows = _quick(tmp_path / "bench", "--providers", "eager", "--modes", "fwd", "--dtypes", "bf16",
                  "--sparse-tails", "residual", "--sparse-temperature", "3")
    assert {r["case"] for r in rows} == {"tiny-residual"}
    assert all(r["loss_rel_err"] < bench.loss_tolerance("bf16") for r in rows)


def test_bad_options():
    with pytest.raises(SystemExit):
        kdfast_main(["bench", "--op", "sparse_kd", "--sparse-tails", "drop", "--quick"])
    with pytest.raises(ValueError, match="--sparse-temperature"):
        bench.make_cases("cpu", quick=True, sparse_temperature=0.0)


@pytest.mark.parametrize("tail", ("renormalize", "residual"))
@pytest.mark.parametrize("temperature", (1.0, 2.5))
def test_eager_and_reference_match_the_definition(tail, temperature):
    n, v, k = 6, 300, 20
    s = torch.randn(n, v, dtype=torch.float64) * 2
    idx, lp, _ = topk_teacher((n,), v, k, temperature=temperature, dtype=torch.float64)
    want = ref_sparse(s, idx, lp, None, values_kind="logprobs", temperature=temperature, tail=tail)
    got_ref = bench.reference_rows(s, idx, lp, temperature, tail).mean()
    got_eager = bench.eager_sparse_kd_loss(s, idx, lp, temperature=temperature, tail=tail)
    torch.testing.assert_close(got_ref, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_eager, want, rtol=1e-9, atol=1e-10)
    kernel = kdfast.sparse_kd_loss(s, idx, lp, temperature=temperature, tail=tail)
    torch.testing.assert_close(kernel, want, rtol=1e-9, atol=1e-10)


def test_targets():
    def row(provider, case, ms, extra):
        return harness.Row(op=bench.OP, case=case, shape="4096x32000", dtype="fp32", mode="fwd+bwd",
                           device="cpu", provider=provider, min_bytes=1, status="ok", median_ms=ms,
                           extra_over_logits=extra)

    rows = [row("kdfast", "llm-renormalize", 60.0, 1.001), row("kdfast-dense", "llm-renormalize", 150.0, 1.0),
            row("kdfast", "llm-residual", 110.0, 1.2), row("kdfast-dense", "llm-residual", 150.0, 1.0)]
    targets = bench.check_targets(rows, "cpu")
    status = {name: passed for name, _, _, passed in targets}
    assert len(targets) == 4
    assert status["CPU N=4096 V=32000 K=64 fp32 renormalize fwd+bwd: speed-up vs dense kdfast.kd_loss"]
    assert not status["CPU N=4096 V=32000 K=64 fp32 residual fwd+bwd: speed-up vs dense kdfast.kd_loss"]
    assert status["N=4096 V=32000 K=64 fp32 renormalize fwd+bwd: peak extra memory / gradient size"]
    assert not status["N=4096 V=32000 K=64 fp32 residual fwd+bwd: peak extra memory / gradient size"]
    assert bench.check_targets(rows[:2], "cuda") == [t for t in bench.check_targets(rows[:2], "cpu")
                                                       if "speed-up" not in t[0]]
