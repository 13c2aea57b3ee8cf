"""The Hugging Face and Lightning integrations under data parallelism: 2 processes (torchrun,
gloo on the CPU) against 1 process with the doubled batch on the same global batches.

Hugging Face: padded causal-LM batches with unequal token counts per process; per-step
``loss`` / ``kd_loss`` / ``ce_loss`` and the final weights equal the one-process run's
(also with gradient accumulation), and each process's own normalisation
(``average_tokens_across_devices=False``) does not. Lightning: ``strategy="ddp"``; the
per-step losses (each process's, averaged, and the logged ``train/loss``) and the final
weights equal the one-process run's, and ``trainer.validate`` gives the metrics of the
whole validation set. Two launches of tests/integration_workers.py in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("integration_workers.py")
BATCH = 4           # per process with 2 processes (Lightning: 8); the one-process run takes twice that


def launch(nproc: int, out: Path, batch: int) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*cmd, "--out", str(out), "--batch", str(batch), "--steps", "4"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world"] == nproc
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    base = tmp_path_factory.mktemp("multi")
    return {"one": (launch(1, base / "one", 2 * BATCH), base / "one"),
            "two": (launch(2, base / "two", BATCH), base / "two")}


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{name}.pt")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def global_batches(seen: list[list], accumulate: int) -> list[list[tuple[int, ...]]]:
    """The samples of each optimizer step over all processes, sorted (``seen[rank][micro]``
    is ``(token ids without padding per sample, rows)``)."""
    steps = len(seen[0]) // accumulate
    return [sorted(tuple(ids) for rank in seen for micro in rank[s * accumulate:(s + 1) * accumulate]
                   for ids in micro[0]) for s in range(steps)]


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("run, accumulate", [("exact", 1), ("ga", 2)])
def test_hf_two_processes_match_one(runs, run: str, accumulate: int) -> None:
    (one, one_dir), (two, two_dir) = runs["one"], runs["two"]
    ref, got = one["hf"]["exact"], two["hf"][run]
    # the same global batches, and the processes' halves hold different numbers of tokens (so
    # a per-process mean averaged over the processes is not the global mean)
    assert global_batches(got["seen"], accumulate) == global_batches(ref["seen"], 1)
    rows = [[micro[1] for micro in rank] for rank in got["seen"]]
    assert any(a != b for a, b in zip(*rows))
    assert len(ref["loss"]) == len(got["loss"]) == 4
    for key in ("loss", "kd", "ce"):                    # logged values are global
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key
    assert got["loss"][-1] < got["loss"][0]
    for total, kd, ce in zip(got["loss"], got["kd"], got["ce"]):
        assert total == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-5)
    diff = max_diff(weights(one_dir, "hf_exact"), weights(two_dir, f"hf_{run}"))
    assert diff < 1e-5


def test_hf_per_process_normalisation_is_not_the_global_batch(runs) -> None:
    """The control: ``average_tokens_across_devices=False`` keeps each process's own mean,
    which differs from the one-process run by far more than the tolerance above."""
    (one, one_dir), (two, two_dir) = runs["one"], runs["two"]
    ref, local = one["hf"]["exact"], two["hf"]["local"]
    assert global_batches(local["seen"], 1) == global_batches(ref["seen"], 1)
    assert max(abs(a - b) for a, b in zip(local["loss"], ref["loss"])) > 1e-4
    assert max_diff(weights(one_dir, "hf_exact"), weights(two_dir, "hf_local")) > 1e-4


# --------------------------------------------------------------------------- Lightning


def test_lightning_two_processes_match_one(runs) -> None:
    (one, one_dir), (two, two_dir) = runs["one"], runs["two"]
    ref, got = one["lightning"], two["lightning"]
    assert ref["steps"] == got["steps"] == 4
    # Lightning's DistributedSampler order, given to the one-process run: the same global batches
    for step in range(4):
        assert sorted(got["batches"][0][step] + got["batches"][1][step]) == sorted(ref["batches"][0][step])
        assert len(got["batches"][0][step]) == len(got["batches"][1][step]) == 2 * BATCH
    averaged = [(a + b) / 2 for a, b in zip(*got["local"])]
    assert averaged == pytest.approx(ref["local"][0], rel=1e-5, abs=1e-5)
    assert got["local"][0] != pytest.approx(ref["local"][0], rel=1e-3)          # each its own share
    logged = [row["train/loss_step"] for row in got["logged"]]
    assert logged == pytest.approx(ref["local"][0], rel=1e-5, abs=1e-5)        # the processes' mean
    assert sum(ref["local"][0][-2:]) < sum(ref["local"][0][:2])
    assert max_diff(weights(one_dir, "lightning"), weights(two_dir, "lightning")) < 1e-5


def test_lightning_validation_metrics_are_those_of_the_whole_set(runs) -> None:
    (one, one_dir), (two, _) = runs["one"], runs["two"]
    ref, got = one["lightning"]["val"], two["lightning"]["val"]
    assert set(ref) == set(got) and {"val/accuracy", "val/nll", "val/agreement"} <= set(got)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    # independently: the saved student on the 356 validation digits
    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_worker import digits, teacher_for

    train, test = digits()
    x, y = test.tensors[0][:356], test.tensors[1][:356]
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    student.load_state_dict(weights(one_dir, "lightning"))
    teacher = teacher_for(train)
    with torch.no_grad():
        logits, teacher_logits = student(x), teacher(x)
    assert got["val/accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert got["val/nll"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    agree = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
    assert got["val/agreement"] == pytest.approx(agree, abs=1e-6)


def test_hf_a_batch_of_padding_only_has_the_parts_of_the_others() -> None:
    """Each process's part sums are gathered for the logs, so a process whose batch has no
    row to distil must report the same parts (zeros) as the others."""
    from kdfast.integrations.hf import distillation_loss
    from kdfast.train import Soft

    mode = Soft(nn.Linear(3, 5), temperature=2.0, alpha=0.5)
    student = torch.randn(2, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 4, 5)
    padding = torch.full((2, 4), -100)
    loss, parts = distillation_loss(mode, student, teacher, padding, task="causal_lm", totals=(7, 7))
    assert sorted(parts) == ["ce", "kd"] and loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    labels = torch.tensor([[1, 2, 3, -100], [4, 0, -100, -100]])
    loss, parts = distillation_loss(mode, student, teacher, labels, task="causal_lm", totals=(7, 7))
    assert sorted(parts) == ["ce", "kd"] and loss.item() > 0
