"""Smoke tests of the benchmarks of feature_loss, attention_transfer_loss and dkd_loss,
and of ``kdfast bench --op``.

Quick runs (tiny shapes, seconds) write a CSV / markdown with the expected rows, the
loss of each baseline matches the benchmark's float64 reference, and the targets
table is there; the ``kdfast`` provider is measured where ``kdfast.<op>`` exists and
is reported as skipped, with the reason, where it does not. Also: the eager baselines
against the float64 references on small awkward inputs, op selection and option
checks on the command line, the wrapper scripts, and the target checks on made-up
rows. Timings themselves are not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast import bench
from kdfast.__main__ import build_parser
from kdfast.__main__ import main as kdfast_main
from kdfast.bench import attention_transfer, common, dkd, feature_loss, harness

ROOT = Path(__file__).resolve().parents[1]
NEW_OPS = {  # bench name -> (module, extra arguments of a quick run)
    "feature_loss": (feature_loss, ["--feature-kinds", "cosine-norm"]),
    "attention_transfer": (attention_transfer, []),
    "dkd": (dkd, []),
}
KERNELS = {"feature_loss": "feature_loss_fused", "attention_transfer": "attention_transfer_fused",
           "dkd": "dkd_loss_fused"}


def _quick(name: str, out: Path, *args: str) -> list:
    extra = NEW_OPS[name][1]
    argv = ["bench", "--op", name, "--quick", "--device", "cpu", "--out", str(out), "-q", *extra, *args]
    assert kdfast_main(argv) == 0
    return harness.read_csv(out / f"{name}.csv")


def _case_elems(module, case_name: str) -> int:
    shape = module.QUICK_SHAPES[case_name.split("-")[0]]
    return math.prod(shape)


# ---------------------------------------------------------------------------
# Quick runs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NEW_OPS))
def test_quick_bench_baselines(tmp_path, name):
    """eager and torch.compile, forward + backward fp32: rows, loss check, memory, targets."""
    module = NEW_OPS[name][0]
    out = tmp_path / "bench"
    rows = _quick(name, out, "--providers", "eager,torch.compile", "--dtypes", "fp32",
                  "--modes", "fwd+bwd", "--no-plot")
    assert {r["provider"] for r in rows} == {"eager", "torch.compile"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["op"] == module.OP and r["dtype"] == "fp32" and r["mode"] == "fwd+bwd"
        elems = _case_elems(module, r["case"])
        assert r["shape"] == "x".join(map(str, module.QUICK_SHAPES[r["case"].split("-")[0]]))
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] < 10_000
        assert r["loss_rel_err"] < module.loss_tolerance("fp32"), r
        assert r["min_bytes"] == 3 * elems * 4
        # both return the student's gradient: at least one gradient's worth of memory
        assert r["extra_over_logits"] >= 0.99
    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert by_provider["torch.compile"]["speedup_vs_compile"] == pytest.approx(1.0)
    assert by_provider["eager"]["loss"] == pytest.approx(by_provider["torch.compile"]["loss"], rel=1e-4)

    md = (out / f"{name}.md").read_text()
    assert "| provider |" in md and "| extra / grad |" in md
    assert "no published library fuses" in md and "float64 reference" in md
    assert "## Targets" in md and "| not measured |" in md  # kdfast was not run
    for t_name, _, goal, passed in module.check_targets([], "cpu"):
        assert f"| {t_name} | - | {goal} | not measured |" in md and passed is None
    assert "| kdfast |" not in md
    machine = json.loads((out / "machine.json").read_text())
    assert machine["copy_bandwidth_gbps"] > 0


@pytest.mark.parametrize("name", list(NEW_OPS))
def test_quick_bench_kdfast(tmp_path, name):
    """The kdfast provider against eager, every dtype and mode, once kdfast.<op> exists."""
    module = NEW_OPS[name][0]
    if not hasattr(kdfast, module.OP):
        pytest.skip(f"kdfast.{module.OP} does not exist in this kdfast yet: nothing to measure")
    rows = _quick(name, tmp_path / "bench", "--providers", "kdfast,eager", "--no-plot")
    mine = [r for r in rows if r["provider"] == "kdfast"]
    assert len(mine) == 4  # fp32 / bf16 x fwd / fwd+bwd
    for r in mine:
        assert r["status"] == "ok", r
        assert r["loss_rel_err"] < module.loss_tolerance(r["dtype"]), r
        if r["mode"] == "fwd+bwd":
            assert r["extra_over_logits"] >= 0.99  # the gradient it returns
            if kdfast.has_kernel(KERNELS[name], "cpu"):
                # no hidden input-sized temporaries: the gradient plus O(rows) statistics
                assert r["extra_over_logits"] < 1.25, r


@pytest.mark.parametrize("name", list(NEW_OPS))
def test_kdfast_provider_skipped_without_the_op(tmp_path, monkeypatch, name):
    """Where kdfast has no such function the kdfast rows are skipped with the reason."""
    module = NEW_OPS[name][0]
    monkeypatch.delattr(kdfast, module.OP, raising=False)
    why = module.ALL_PROVIDERS["kdfast"].unavailable("cpu")
    assert why and f"kdfast.{module.OP}" in why
    out = tmp_path / "bench"
    rows = _quick(name, out, "--providers", "kdfast,eager", "--dtypes", "fp32", "--modes", "fwd",
                  "--no-memory", "--no-plot")
    kd = [r for r in rows if r["provider"] == "kdfast"]
    assert kd and all(r["status"] == "skipped" and r["note"] == why for r in kd)
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "eager")
    assert f"- **kdfast** skipped: {why}" in (out / f"{name}.md").read_text()


def _stand_in(name: str):
    """The op's documented signature over the benchmark's eager function."""
    if name == "feature_loss":
        def feature_loss_stand_in(student, teacher, *, kind="mse", normalize=False, mask=None,
                                  reduction="mean"):
            assert mask is None and reduction == "mean"
            return feature_loss.eager_feature_loss(student, teacher, kind=kind, normalize=normalize)
        return feature_loss_stand_in
    if name == "attention_transfer":
        def attention_transfer_stand_in(student_feat, teacher_feat, *, p=2.0):
            return attention_transfer.eager_attention_transfer_loss(student_feat, teacher_feat, p=p)
        return attention_transfer_stand_in

    def dkd_stand_in(student_logits, teacher_logits, labels, *, alpha=1.0, beta=8.0, temperature=4.0,
                     ignore_index=-100, reduction="batchmean"):
        assert reduction == "batchmean" and not (labels == ignore_index).any()
        return dkd.eager_dkd_loss(student_logits, teacher_logits, labels, alpha=alpha, beta=beta,
                                  temperature=temperature)
    return dkd_stand_in


@pytest.mark.parametrize("name", list(NEW_OPS))
def test_kdfast_provider_calls_the_documented_signature(tmp_path, monkeypatch, name):
    """With a stand-in of the documented signature as kdfast.<op>, the kdfast rows are
    measured and checked like the others (and noted while the op has no compiled kernel)."""
    module = NEW_OPS[name][0]
    monkeypatch.setattr(kdfast, module.OP, _stand_in(name), raising=False)
    rows = _quick(name, tmp_path / "bench", "--providers", "kdfast", "--dtypes", "fp32", "--no-plot")
    assert len(rows) == 2
    for r in rows:
        assert r["status"] == "ok", r
        assert r["loss_rel_err"] < module.loss_tolerance("fp32")
        built = kdfast.has_kernel(KERNELS[name], "cpu")
        assert ("plain-PyTorch reference" in r["note"]) == (not built)


def test_quick_bench_writes_png(tmp_path):
    if not harness.can_plot():
        pytest.skip("matplotlib is not installed")
    out = tmp_path / "bench"
    _quick("dkd", out, "--providers", "eager", "--modes", "fwd")
    png = (out / "dkd.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_feature_kinds_make_one_case_each():
    cases = feature_loss.make_cases("cpu", quick=True, dtypes=["fp32"], modes=["fwd"],
                                    feature_kinds=["cosine-norm", "l1", "mse-norm"])
    assert [(c.name, dict(c.params)) for c in cases] == [
        ("tiny-cosine-norm", {"kind": "cosine", "normalize": True}),
        ("tiny-l1", {"kind": "l1", "normalize": False}),
        ("tiny-mse-norm", {"kind": "mse", "normalize": True})]
    with pytest.raises(ValueError, match="--feature-kinds"):
        feature_loss.make_cases("cpu", quick=True, feature_kinds=["huber"])


# ---------------------------------------------------------------------------
# The eager baselines against the float64 references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(feature_loss.KINDS))
def test_eager_feature_loss_matches_reference(kind):
    s, t = torch.randn(2, 7, 33, dtype=torch.float64), torch.randn(2, 7, 33, dtype=torch.float64)
    loss_kind, normalize = feature_loss.KINDS[kind]
    case = harness.Case(op="feature_loss", name="x", shape=tuple(s.shape), dtype=torch.float64, mode="fwd",
                        device="cpu", min_bytes=0, logits_bytes=0,
                        params=(("kind", loss_kind), ("normalize", normalize)))
    ref = feature_loss.reference_loss(case, {"student": s, "teacher": t})
    got = feature_loss.eager_feature_loss(s, t, kind=loss_kind, normalize=normalize)
    assert float(got) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_eager_attention_transfer_matches_reference(p):
    # channel counts may differ between student and teacher; 9 samples span two reference chunks
    s, t = torch.randn(9, 3, 5, 7, dtype=torch.float64), torch.randn(9, 5, 5, 7, dtype=torch.float64)
    case = harness.Case(op="attention_transfer_loss", name="x", shape=tuple(s.shape), dtype=torch.float64,
                        mode="fwd", device="cpu", min_bytes=0, logits_bytes=0, params=(("p", p),))
    ref = attention_transfer.reference_loss(case, {"student": s, "teacher": t})
    got = attention_transfer.eager_attention_transfer_loss(s, t, p=p)
    assert float(got) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_eager_dkd_matches_reference(alpha, beta, temperature):
    n, v = 300, 37  # 300 rows span two reference chunks
    s, t = 3 * torch.randn(n, v, dtype=torch.float64), 3 * torch.randn(n, v, dtype=torch.float64)
    y = torch.randint(0, v, (n,))
    params = (("alpha", alpha), ("beta", beta), ("temperature", temperature))
    case = harness.Case(op="dkd_loss", name="x", shape=(n, v), dtype=torch.float64, mode="fwd",
                        device="cpu", min_bytes=0, logits_bytes=0, params=params)
    ref = dkd.reference_loss(case, {"student": s, "teacher": t, "labels": y})
    got = dkd.eager_dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    assert float(got) == pytest.approx(ref, rel=1e-9)


def test_reference_tolerance_is_relative_to_dtype():
    for module in (feature_loss, attention_transfer, dkd):
        assert module.loss_tolerance("fp32") < module.loss_tolerance("bf16")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _selected(argv):
    args = build_parser().parse_args(argv)
    return [b.name for b in common.selected_benches(args, bench.load_all())]


def test_benchmarks_registry():
    benches = bench.load_all()
    assert [b.name for b in benches] == list(bench.BENCHMARKS)
    for b in benches:
        assert {"kdfast", "eager", "torch.compile"} <= set(b.providers)
        assert b.quick_shapes and b.shapes
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.load("softmax")


def test_op_selection():
    assert _selected(["bench"]) == ["kd_loss"]  # backward compatible default
    assert _selected(["bench", "--quick"]) == ["kd_loss"]
    assert _selected(["bench", "--op", "dkd"]) == ["dkd"]
    assert _selected(["bench", "--op", "dkd,feature_loss"]) == ["feature_loss", "dkd"]
    assert _selected(["bench", "--op", "all"]) == list(bench.BENCHMARKS)


def test_unknown_op_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--op", "softmax"])
    assert exc.value.code == 2
    assert "unknown ['softmax']" in capsys.readouterr().err


def test_help_lists_ops_and_their_options(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for b in bench.load_all():
        assert f"--op {b.name}:" in text and b.summary in text
        for opt in b.options:
            assert opt.flag in text
        for shape in b.all_shapes:
            assert b.shape_help(shape) in text
    assert "or all (default kd_loss)" in text


@pytest.mark.parametrize("argv,message", [
    (["--op", "dkd", "--temperature", "3"], "--temperature is an option of --op kd_loss"),
    (["--dkd-beta", "2"], "--dkd-beta is an option of --op dkd"),
    (["--op", "feature_loss", "--shapes", "llm"], "--shapes: llm is not one of --op feature_loss's"),
    (["--op", "dkd", "--providers", "liger"], "--providers: liger is not one of --op dkd's"),
    (["--op", "attention_transfer", "--at-p", "-1"], "--at-p: must be positive and finite"),
])
def test_options_of_ops_not_run_are_rejected(tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        kdfast_main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "-q", *argv])
    assert message in str(exc.value.code)
    assert not list(tmp_path.iterdir())  # rejected before measuring anything


def test_several_ops_in_one_run(tmp_path):
    """Each op its own files; an op with none of the --shapes is left out."""
    common_args = ["--device", "cpu", "--providers", "eager", "--dtypes", "fp32", "--modes", "fwd",
                   "--no-memory", "--no-plot", "--budget", "0.01", "--min-repeats", "1", "-q"]
    out = tmp_path / "two"
    assert kdfast_main(["bench", "--op", "dkd,attention_transfer", "--quick", "--out", str(out),
                        *common_args]) == 0
    assert {p.name for p in out.iterdir()} == {"dkd.csv", "dkd.md", "attention_transfer.csv",
                                               "attention_transfer.md", "machine.json"}
    assert {r["op"] for r in harness.read_csv(out / "dkd.csv")} == {"dkd_loss"}
    assert "# attention_transfer_loss benchmark" in (out / "attention_transfer.md").read_text()

    out = tmp_path / "cls"
    assert kdfast_main(["bench", "--op", "dkd,feature_loss", "--shapes", "cls", "--out", str(out),
                        *common_args]) == 0
    assert not (out / "feature_loss.csv").exists()
    assert [(r["case"], r["shape"]) for r in harness.read_csv(out / "dkd.csv")] == [("cls", "256x1000")]


def test_op_options_reach_the_cases():
    args = build_parser().parse_args(["bench", "--op", "dkd", "--dkd-alpha", "0.5", "--dkd-temperature", "2"])
    assert dkd.BENCH.resolve(args) == {"dkd_alpha": 0.5, "dkd_beta": 8.0, "dkd_temperature": 2.0}
    cases = dkd.make_cases("cpu", quick=True, **dkd.BENCH.resolve(args))
    assert {dict(c.params)["temperature"] for c in cases} == {2.0}
    args = build_parser().parse_args(["bench", "--op", "attention_transfer", "--at-p", "3"])
    assert attention_transfer.BENCH.resolve(args) == {"at_p": 3.0}


@pytest.mark.parametrize("name", bench.BENCHMARKS)
def test_wrapper_script_help(capsys, name):
    path = ROOT / "benchmarks" / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--op" not in text and "--quick" in text
    for opt in bench.load(name).options:
        assert opt.flag in text


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _row(provider, case, median_ms, dtype="fp32", mode="fwd+bwd", **kw):
    return harness.Row(op="x", case=case, shape="", dtype=dtype, mode=mode, device="cpu",
                       provider=provider, median_ms=median_ms, **kw)


def _status(module, rows, device="cpu"):
    return {name: passed for name, _, _, passed in module.check_targets(rows, device)}


def test_dkd_targets():
    label = "N=4096 V=32000 fp32 T=4 fwd+bwd"
    # 64 B per row over a 32000 x 4 B row of the gradient: allowance 5e-4
    rows = [_row("kdfast", "llm", 100.0, extra_over_logits=1.0004),
            _row("eager", "llm", 850.0), _row("torch.compile", "llm", 190.0)]
    status = _status(dkd, rows)
    assert status[f"CPU {label}: speed-up vs eager"] is True  # 8.5x
    assert status[f"CPU {label}: speed-up vs torch.compile"] is False  # 1.9x
    assert status[f"{label}: peak extra memory / gradient size"] is True
    rows[0].extra_over_logits = 1.0006
    assert _status(dkd, rows)[f"{label}: peak extra memory / gradient size"] is False
    md = common.targets_markdown(dkd.check_targets(rows, "cpu"))
    assert "| >= 8 |" in md and "| >= 2 |" in md and "**missed**" in md and "| 8.50 |" in md
    assert "| <= 1 + 64 B per row = 1.0005 |" in md
    # on GPU only the memory target applies (the speed-ups are the CPU's goals)
    assert list(_status(dkd, rows, "cuda")) == [f"{label}: peak extra memory / gradient size"]


def test_feature_targets():
    rows = [_row("kdfast", "tokens-cosine-norm", 10.0, extra_over_logits=1.0),
            _row("eager", "tokens-cosine-norm", 35.0), _row("torch.compile", "tokens-cosine-norm", 14.0),
            _row("kdfast", "tokens-mse", 10.0, extra_over_logits=1.5),
            _row("torch.compile", "tokens-mse", 9.0)]
    status = _status(feature_loss, rows)
    cos, mse, l1 = ("N=8192 D=4096 fp32 cosine normalize=True fwd+bwd", "N=8192 D=4096 fp32 mse fwd+bwd",
                    "N=8192 D=4096 fp32 l1 fwd+bwd")
    assert status[f"CPU {cos}: speed-up vs eager"] is True  # 3.5x
    assert status[f"CPU {cos}: speed-up vs torch.compile"] is False  # 1.4x
    assert status[f"{cos}: peak extra memory / gradient size"] is True
    assert status[f"CPU {mse}: speed-up vs torch.compile"] is False  # 0.9x: slower
    assert status[f"{mse}: peak extra memory / gradient size"] is False
    assert status[f"CPU {l1}: speed-up vs torch.compile"] is None  # not run
    assert f"CPU {mse}: speed-up vs eager" not in status  # no such goal


def test_attention_transfer_targets():
    label = "N=64 C=256 56x56 fp32 p=2 fwd+bwd"
    # the attention maps are [N, H*W]: 16 B per position over 256 channels x 4 B = 1/64
    rows = [_row("kdfast", "resnet", 10.0, extra_over_logits=1.015),
            _row("eager", "resnet", 31.0), _row("torch.compile", "resnet", 15.0)]
    status = _status(attention_transfer, rows)
    assert status[f"CPU {label}: speed-up vs eager"] is True
    assert status[f"CPU {label}: speed-up vs torch.compile"] is True
    assert status[f"{label}: peak extra memory / gradient size"] is True
    rows[0].extra_over_logits = 1.02
    assert _status(attention_transfer, rows)[f"{label}: peak extra memory / gradient size"] is False
