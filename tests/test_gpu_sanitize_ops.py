"""scripts/gpu_sanitize_ops.py on the CPU kernels: every case it would run under
compute-sanitizer on a GPU must pass here too (and the script must catch a wrong kernel)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import kdfast

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_sanitize_ops.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_sanitize_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def available_ops(script) -> list:
    return [name for name, op in script.OPS.items() if kdfast.has_kernel(op, "cpu")]


def test_every_case_passes_on_cpu(script, capsys):
    ops = available_ops(script)
    if not ops:
        pytest.skip("kdfast._C is not built")
    assert script.main(["--device", "cpu", "--ops", ",".join(ops)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert ", 0 failed," in out


def test_cases_cover_every_op_mode_and_dtype(script):
    cases = script.make_cases()
    assert {c.op for c in cases} == set(script.OPS)
    for op in script.OPS:
        mine = [c for c in cases if c.op == op]
        assert {c.mode for c in mine} == set(script.modes_of(op)), op
        assert {(c.student, c.teacher) for c in mine} == set(script.pairs_of(op)), op


@pytest.mark.parametrize("op, fn", [("feature", "feature_loss"), ("sparse", "sparse_kd_loss")])
def test_a_wrong_loss_is_reported(script, monkeypatch, op, fn):
    ops = available_ops(script)
    if op not in ops:
        pytest.skip(f"no {fn} CPU kernel")
    real = getattr(kdfast, fn)
    monkeypatch.setattr(kdfast, fn, lambda *a, **k: real(*a, **k) * 1.01)
    case = next(c for c in script.make_cases() if c.op == op and c.mode == "bwd")
    problems = script.run_case(case, "cpu", seed=0)
    assert any(p.startswith("loss:") for p in problems), problems
    assert any("gradient" in p for p in problems), problems


def test_a_wrong_top_k_is_reported(script, monkeypatch):
    ops = available_ops(script)
    if "topk" not in ops:
        pytest.skip("no topk_logits CPU kernel")
    real = kdfast.topk_logits
    monkeypatch.setattr(kdfast, "topk_logits", lambda *a, **k: tuple(t * 1.01 if t.is_floating_point() else t
                                                                      for t in real(*a, **k)))
    case = next(c for c in script.make_cases() if c.op == "topk" and c.mode == "bwd" and c.shape[-1] > 8)
    problems = script.run_case(case, "cpu", seed=0)
    assert any(p.startswith("logprobs:") for p in problems), problems
    assert any(p.startswith("gradient:") for p in problems), problems


def test_unknown_op_is_refused(script):
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--ops", "nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_exits_2(script):
    assert script.main(["--device", "cuda"]) == 2
