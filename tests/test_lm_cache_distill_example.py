"""Smoke test of examples/lm_cache_distill.py: the quick run end to end, in a subprocess."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "lm_cache_distill.py"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.mark.skipif(not (STDLIB / "argparse.py").is_file(),
                    reason=f"the standard library sources (the corpus) are not under {STDLIB}")
def test_quick_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--seeds", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()

    rows = {row["name"]: row for row in result["students"]}
    assert {"ce", "dense_kd", "sampled12", "top12_renorm", "top12_residual"} <= set(rows)
    vocab = result["tokenizer"]["vocab_size"]
    for name, row in rows.items():
        assert f"| {name} |" in table
        assert math.isfinite(row["heldout_ppl"]) and 1.0 < row["heldout_ppl"] < vocab, name
        assert math.isfinite(row["kl_teacher_student"]) and row["kl_teacher_student"] > 0.0, name
        assert row["train_seconds"] > 0.0
    # 12 draws per token fit the 64 B/token budget; the k=12 cache is of the same order.
    assert 0 < rows["sampled12"]["bytes_per_token"] <= 64
    assert 0 < rows["top12_renorm"]["bytes_per_token"] <= 128
    # The teacher beats the CE-only student, and the students that see the teacher's full
    # distribution, or an unbiased sample of it, end closer to the teacher than the one without it.
    assert result["teacher"]["heldout_ppl"] < rows["ce"]["heldout_ppl"]
    assert rows["dense_kd"]["kl_teacher_student"] < rows["ce"]["kl_teacher_student"]
    assert rows["sampled12"]["kl_teacher_student"] < rows["ce"]["kl_teacher_student"]
    # The second seed: the same three variants again, summarised per variant.
    assert sorted(row["name"] for row in result["repeats"]) == ["ce", "dense_kd", "sampled12"]
    assert all(row["rep"] == 1 for row in result["repeats"])
    for name in ("ce", "dense_kd", "sampled12"):
        spread = result["spread"][name]["heldout_ppl"]
        assert result["spread"][name]["n"] == 2 and math.isfinite(spread["sd"])
        assert min(spread["values"]) <= spread["mean"] <= max(spread["values"])
    assert "Over 2 seeds" in table
    assert (tmp_path / "work" / "teacher.pt").is_file()
    assert (tmp_path / "work" / "cache" / "sampled12" / "header.json").is_file()
