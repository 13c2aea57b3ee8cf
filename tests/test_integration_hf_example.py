"""examples/hf_trainer_distill.py end to end in a subprocess, with few steps: a teacher trained
with the plain Trainer, then a CE-only and a distilled student trained with DistillationTrainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "hf_trainer_distill.py"


@pytest.mark.parametrize("extra", [[], ["--cache", "--gradient-accumulation", "2"]],
                         ids=["live", "cache_ga2"])
def test_quick_run(tmp_path, extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--steps", "6", "--teacher-steps", "20",
           "--temperature", "2", "--alpha", "0.5", "--out", str(tmp_path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    result = json.loads(last[len("RESULT "):])
    assert result["config"]["steps"] == 6 and result["config"]["cache"] == ("--cache" in extra)
    vocab_guard = 200.0
    assert 1.0 < result["teacher"]["heldout_ppl"] < vocab_guard
    for name in ("ce", "distilled"):
        row = result["students"][name]
        assert len(row["losses"]) == 6 and all(math.isfinite(x) for x in row["losses"])
        assert row["losses"][-1] < row["losses"][0], name
        assert 1.0 < row["heldout_ppl"] < vocab_guard and row["kl_teacher_student"] > 0.0
        assert f"{name:9s} step    6  loss" in proc.stdout
    distilled = result["students"]["distilled"]
    # loss = (1 - alpha) kd + alpha ce at every log, with alpha = 0.5
    for total, kd, ce in zip(distilled["losses"], distilled["kd_losses"], distilled["ce_losses"]):
        assert total == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-4)
    if "--cache" in extra:
        assert (tmp_path / "cache" / "header.json").is_file()
