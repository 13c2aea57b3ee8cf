"""Smoke tests of the fused linear benchmark (``kdfast bench --op fused_linear``): a quick run,
the eager baseline and the float64 reference against kdfast.kd_loss on materialised logits,
the cases, the options and the targets."""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast.__main__ import main as kdfast_main
from kdfast.bench import fused_linear as bench
from kdfast.bench import harness


def _quick(out, *args):
    argv = ["bench", "--op", "fused_linear", "--quick", "--device", "cpu", "--out", str(out), "-q",
            "--no-plot", *args]
    assert kdfast_main(argv) == 0
    return harness.read_csv(out / "fused_linear.csv")


def test_quick_run(tmp_path):
    rows = _quick(tmp_path / "bench", "--providers", "kdfast,kdfast-unfused,eager,torch.compile,liger",
                  "--dtypes", "fp32", "--fl-compile-max-n", "32")
    assert {(r["case"], r["shape"]) for r in rows} == {("tiny", "64x512")}
    by = {(r["provider"], r["mode"]): r for r in rows}
    for prov in ("kdfast", "kdfast-unfused", "eager"):
        for mode in ("fwd", "fwd+bwd"):
            r = by[(prov, mode)]
            assert r["status"] == "ok", r
            assert r["loss_rel_err"] < bench.loss_tolerance("fp32"), r
            assert "differs" not in r["note"]
    assert "rows per chunk (automatic)" in by[("kdfast", "fwd")]["note"]
    # torch.compile only up to --fl-compile-max-n; Liger only on a GPU
    assert by[("torch.compile", "fwd")]["status"] == "error"
    assert "--fl-compile-max-n 32" in by[("torch.compile", "fwd")]["note"]
    assert by[("liger", "fwd")]["status"] == "skipped"
    # the fused loss never holds [N, V] student and teacher logits with their softmaxes
    fused, eager = by[("kdfast", "fwd+bwd")], by[("eager", "fwd+bwd")]
    assert fused["peak_extra_bytes"] < eager["peak_extra_bytes"]
    text = (tmp_path / "bench" / "fused_linear.md").read_text()
    assert "`kdfast-unfused` = `kdfast.kd_loss(h_s @ W_s.T, h_t @ W_t.T, labels)`" in text
    assert "time / unfused kdfast's" in text


def test_chunk_size_and_loss_options(tmp_path):
    rows = _quick(tmp_path / "bench", "--providers", "kdfast,eager", "--modes", "fwd+bwd", "--dtypes", "bf16",
                  "--fl-chunk-size", "24", "--fl-temperature", "3", "--fl-alpha", "0.3",
                  "--fl-divergence", "jsd")
    assert all(r["status"] == "ok" for r in rows), rows
    assert all(r["loss_rel_err"] < bench.loss_tolerance("bf16") for r in rows), rows
    assert "24 rows per chunk (--fl-chunk-size)" in next(r for r in rows if r["provider"] == "kdfast")["note"]


@pytest.mark.parametrize("divergence", bench.DIVERGENCES)
@pytest.mark.parametrize("alpha", (0.0, 0.4))
def test_eager_and_reference_match_kd_loss(divergence, alpha):
    gen = torch.Generator().manual_seed(1)
    n, h, v = 300, 16, 200  # more rows than one reference chunk, not a multiple of it
    h_s, h_t = torch.randn(n, h, generator=gen), torch.randn(n, h, generator=gen)
    w_s, w_t = torch.randn(v, h, generator=gen), torch.randn(v, h, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    want = kdfast.kd_loss((h_s @ w_s.T).double(), (h_t @ w_t.T).double(), labels, temperature=1.5,
                          alpha=alpha, divergence=divergence, beta=bench.JSD_BETA)
    d = [x.double() for x in (h_s, w_s, h_t, w_t)]
    eager = bench.eager_fused_linear_kd(*d, labels, temperature=1.5, alpha=alpha, divergence=divergence)
    torch.testing.assert_close(eager, want, rtol=1e-8, atol=1e-10)
    case = bench.make_cases("cpu", quick=True, dtypes=["fp32"], modes=["fwd"], fl_temperature=1.5,
                            fl_alpha=alpha, fl_divergence=divergence)[0]
    inputs = {"h_s": h_s, "w_s": w_s, "h_t": h_t, "w_t": w_t, "labels": labels}
    assert bench.reference_loss(case, inputs) == pytest.approx(float(want), rel=1e-6)


def test_cases_and_inputs():
    cases = bench.make_cases("cpu", dtypes=["fp32"], modes=["fwd+bwd"])
    assert [c.name for c in cases] == ["n512", "n1024", "n2048", "n4096"]  # the GPU shape only on GPU
    c = cases[-1]
    assert c.shape == (4096, 49152) and dict(c.params)["hidden"] == 576
    assert c.logits_bytes == 4096 * 49152 * 4
    assert c.min_bytes == 4 * 3 * (4096 * 576 + 49152 * 576)
    assert [c.name for c in bench.make_cases("cuda", dtypes=["bf16"], modes=["fwd"])][-1] == "n8192"
    tiny = bench.make_cases("cpu", quick=True, dtypes=["bf16"], modes=["fwd"])[0]
    inputs = bench.make_inputs(tiny)
    assert inputs["h_s"].shape == (64, 32) and inputs["w_t"].shape == (512, 32)
    assert inputs["h_s"].dtype == inputs["w_t"].dtype == torch.bfloat16
    assert inputs["h_s"].requires_grad and inputs["w_s"].requires_grad and not inputs["w_t"].requires_grad
    std = float((inputs["h_s"].detach().float() @ inputs["w_s"].detach().float().T).std())
    assert 1.5 < std < 2.5  # logits of standard deviation about 2


@pytest.mark.parametrize("kwargs,message", [
    ({"fl_temperature": 0.0}, "--fl-temperature"),
    ({"fl_alpha": 1.5}, "--fl-alpha"),
    ({"fl_divergence": "tvd"}, "--fl-divergence"),
    ({"fl_chunk_size": -1}, "--fl-chunk-size"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.make_cases("cpu", quick=True, **kwargs)
    with pytest.raises(SystemExit):
        kdfast_main(["bench", "--op", "fused_linear", "--quick", "--fl-divergence", "tvd"])


def _row(provider, case, ms, peak, dtype="fp32"):
    return harness.Row(op=bench.OP, case=case, shape="", dtype=dtype, mode="fwd+bwd", device="cpu",
                       provider=provider, status="ok", median_ms=ms, peak_extra_bytes=peak)


def test_targets():
    rows = [_row("kdfast", "n4096", 1050.0, 400e6), _row("kdfast-unfused", "n4096", 1000.0, 3e9),
            _row("eager", "n4096", 1500.0, 4e9)]
    status = {name: (measured, passed) for name, measured, _, passed in bench.check_targets(rows, "cpu")}
    assert status["CPU N=4096 H=576 V=49152 fp32 fwd+bwd: peak extra memory / eager's"] == ("0.100", True)
    assert status["CPU N=4096 H=576 V=49152 fp32 fwd+bwd: time / unfused kdfast's"] == ("1.050", True)
    rows[0].median_ms, rows[0].peak_extra_bytes = 1200.0, 600e6
    assert [t[3] for t in bench.check_targets(rows, "cpu")] == [False, False]
    assert [t[3] for t in bench.check_targets(rows[1:], "cpu")] == [None, None]

    gpu = [_row("kdfast", "n8192", 90.0, 2.5e9, "bf16"),
           _row("liger", "n8192", 100.0, 5e9, "bf16")]
    status = {name: (measured, passed) for name, measured, _, passed in bench.check_targets(gpu, "cuda")}
    assert status["GPU N=8192 H=4096 V=128256 bf16 fwd+bwd: peak extra memory (GB)"] == ("2.50", True)
    assert status["GPU N=8192 H=4096 V=128256 bf16 fwd+bwd: time / Liger-Kernel's"] == ("0.90", True)
    gpu[0].peak_extra_bytes = math.nan
    assert bench.check_targets(gpu, "cuda")[0][3] is None
