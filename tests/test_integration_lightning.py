"""kdfast.integrations.lightning: the DistillationModule wrapper and the DistillationCallback,
driven through Lightning's own Trainer on scikit-learn's bundled 8x8 digit images with a
teacher MLP trained here; losses go down, agreement with the teacher rises, the wrapper's
steps equal kdfast.train.Distiller's, the teacher stays out of optimizer and checkpoint,
and a crashed run resumed from Lightning's checkpoint ends where a straight run does."""

from __future__ import annotations

import copy
import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")

import kdfast  # noqa: E402
from kdfast import train  # noqa: E402
from kdfast.integrations.lightning import DistillationCallback, DistillationModule  # noqa: E402
from kdfast.train import metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning",
                                        "ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 1,797 8x8 digits in [0, 1]: 1,200 to train on, 597 held out, and an
    MLP teacher (4,810 parameters) trained on the 1,200 for a moment (about 93 % held out)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(teacher(x[:1200]), y[:1200])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.zero_grad(set_to_none=True)
    teacher.requires_grad_(False).eval()
    acc = (teacher(x[1200:]).argmax(1) == y[1200:]).float().mean().item()
    assert acc > 0.85
    return {"x": x[:1200], "y": y[:1200], "x_test": x[1200:], "y_test": y[1200:], "teacher": teacher}


def student(seed: int = 1, hidden: int = 12) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def loaders(d, batch_size: int = 64, shuffle: bool = False):
    train_dl = DataLoader(TensorDataset(d["x"], d["y"]), batch_size=batch_size, shuffle=shuffle)
    test_dl = DataLoader(TensorDataset(d["x_test"], d["y_test"]), batch_size=300)
    return train_dl, test_dl


def trainer(**kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, **kw)


def agreement(model: nn.Module, d) -> float:
    with torch.no_grad():
        return metrics.agreement(model(d["x_test"]), d["teacher"](d["x_test"]))


class StepLosses(pl.Callback):
    """Records the loss of every training step as Lightning back-propagated it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------ wrapper


def test_wrapper_trains_logs_and_agreement_rises(digits, tmp_path):
    d = digits
    s = student()                                          # seeds the global generator (shuffling)
    before = agreement(s, d)
    teacher_before = params(d["teacher"])
    module = DistillationModule(s, "soft", teacher=d["teacher"], temperature=2.0, alpha=0.3, lr=1e-2,
                                scheduler="cosine", warmup_steps=3)
    train_dl, test_dl = loaders(d, shuffle=True)
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    t = trainer(max_steps=60, logger=logger, val_check_interval=20, check_val_every_n_epoch=None)
    t.fit(module, train_dl, test_dl)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10
    assert all(r.get("train/kd_step") for r in rows if r.get("train/loss_step"))   # the mode's part
    after = agreement(s, d)
    assert after > before + 0.4
    # the logged validation metrics are those of kdfast.train.metrics on the held-out set
    vals = [r for r in rows if r.get("val/accuracy")]
    assert len(vals) == 3
    with torch.no_grad():
        logits, t_logits = s(d["x_test"]), d["teacher"](d["x_test"])
    assert float(vals[-1]["val/accuracy"]) == pytest.approx(metrics.accuracy(logits, d["y_test"]), abs=1e-6)
    assert float(vals[-1]["val/agreement"]) == pytest.approx(metrics.agreement(logits, t_logits), abs=1e-6)
    assert float(vals[-1]["val/nll"]) == pytest.approx(F.cross_entropy(logits, d["y_test"]).item(), rel=1e-5)
    assert {"val/ece", "val/f1", "val/top5_accuracy"} <= set(t.callback_metrics)
    assert all(torch.equal(a, b) for a, b in zip(d["teacher"].parameters(), teacher_before))
    assert all(p.grad is None for p in d["teacher"].parameters())


@pytest.mark.parametrize("case", ["soft", "consistency_accum"])
def test_wrapper_steps_equal_the_distillers(digits, case):
    """Same mode, optimizer, schedule and batches (no shuffle): the Lightning run takes
    the same steps as kdfast.train.Distiller, to the bit on the CPU."""
    d = digits
    steps = 12
    train_dl, _ = loaders(d, batch_size=100)

    def make_mode():
        if case == "soft":
            return train.Soft(d["teacher"], temperature=3.0, alpha=0.4)
        return train.Consistency(ema_decay=0.9, noise_std=0.1, weight=2.0, rampup_steps=4)

    accum = 2 if case == "consistency_accum" else 1
    opts = dict(optimizer="adamw", lr=5e-3, weight_decay=0.01, scheduler="cosine", warmup_steps=3)
    ref_student, lit_student = student(3), student(3)
    torch.manual_seed(11)
    distiller = train.Distiller(ref_student, make_mode(), max_steps=steps, epochs=100, grad_accum=accum,
                                progress=False, log_every=1, **opts)
    distiller.fit(train_dl)
    torch.manual_seed(11)
    module = DistillationModule(lit_student, make_mode(), **opts)
    recorder = StepLosses()
    trainer(max_steps=steps, callbacks=[recorder], accumulate_grad_batches=accum).fit(module, train_dl)
    for a, b in zip(ref_student.parameters(), lit_student.parameters()):
        assert torch.equal(a, b)
    for (ka, a), (kb, b) in zip(distiller.mode.state_dict().items(), module.mode.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    if case == "soft":
        assert recorder.losses == [h["loss"] for h in distiller.history]
    else:
        assert int(module.mode.steps) == steps            # end_step once per optimizer step
        assert len(recorder.losses) == steps * accum


def test_teacher_outside_optimizer_and_checkpoint_and_moved(digits, tmp_path):
    d = digits
    teacher = copy.deepcopy(d["teacher"])
    module = DistillationModule(student(), "feature", teacher=teacher, pairs={"1": "1"}, kind="hint", lr=1e-2)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    t = trainer(max_steps=5, enable_checkpointing=True, callbacks=[ckpt_cb])
    t.fit(module, loaders(d)[0])
    teacher_ids = {id(p) for p in teacher.parameters()}
    in_opt = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert not teacher_ids & {id(p) for p in in_opt}
    # the lazily built hint regressor (64 -> 12 on the hidden layer) is trained with the student
    assert {id(p) for p in module.mode.adapters.parameters()} <= {id(p) for p in in_opt}
    assert len(in_opt) == len(list(module.student.parameters())) + 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)     # plain types only (random states too)
    assert {"torch", "python", "numpy"} <= set(saved["kdfast_rng"])
    state = saved["state_dict"]
    assert sorted(state) == sorted([f"student.{k}" for k in module.student.state_dict()]
                                   + ["mode.adapters.0.weight", "mode.adapters.0.bias"])
    teacher_tensors = list(teacher.state_dict().values())
    assert not any(v.shape == w.shape and torch.equal(v, w) for v in state.values() for w in teacher_tensors)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), d["teacher"].parameters()))
    # moves of the module move the teacher (held by the mode and by its inner soft loss)
    module.to(torch.float64)
    assert teacher[0].weight.dtype == torch.float64 and module.mode.soft.teacher is teacher
    module.to(torch.float32)
    # Lightning's own dtype move (precision="64-true") takes the teacher along; the run works
    trainer(max_steps=2, precision="64-true").fit(module, loaders(d)[0])
    assert teacher[0].weight.dtype == torch.float64 and module.student[0].weight.dtype == torch.float64


def test_load_from_checkpoint_with_example_batch(digits, tmp_path):
    """A lazily built mode (hint regressor) loads with ``example_batch=``."""
    d = digits
    module = DistillationModule(student(), "feature", teacher=d["teacher"], pairs={"1": "1"}, lr=1e-2)
    t = trainer(max_steps=3)
    t.fit(module, loaders(d)[0])
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DistillationModule.load_from_checkpoint(
        tmp_path / "m.ckpt", student=student(5), mode=train.Feature(d["teacher"], {"1": "1"}),
        example_batch=(d["x"][:4], d["y"][:4]))
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.lr == 1e-2 and loaded.scheduler_spec == "constant"       # the saved settings
    hparams = torch.load(tmp_path / "m.ckpt", weights_only=False)["hyper_parameters"]
    assert not any(isinstance(v, (nn.Module, torch.Tensor)) for v in hparams.values())
    predicted = trainer().predict(loaded, loaders(d)[1])
    with torch.no_grad():
        assert torch.equal(torch.cat(predicted), module.student(d["x_test"]))


class Crash(Exception):
    pass


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash


class ResumableLoader:
    """A loader Lightning can checkpoint mid-epoch (``state_dict`` / ``load_state_dict``):
    it remembers how many batches of the current epoch it has given out."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.given, self._skip = loader, 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self._skip):
            next(it)
        self.given, self._skip = self._skip, 0
        for batch in it:
            self.given += 1
            yield batch

    def state_dict(self) -> dict:
        return {"given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["given"]


@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
def test_crashed_run_resumes_to_the_straight_runs_weights(digits, tmp_path, where):
    """Feature mode (a lazily built regressor), AdamW with warm-up and a cosine schedule:
    crash at step 13, resume with ``ckpt_path="last"``, and end with the straight run's
    student, regressor, optimizer state and learning rate. Lightning saves no random state
    and restarts a plain loader at the epoch's start, so the checkpoint is either at an
    epoch's last step (plain loader) or anywhere with a loader that has ``state_dict``."""
    d = digits
    n = 300                                               # 5 batches of 60 per epoch
    steps, crash = 17, 13

    def run(folder: Path, callbacks=(), ckpt_path=None):
        torch.manual_seed(123)
        module = DistillationModule(student(7), "feature", teacher=d["teacher"], pairs={"1": "1"},
                                    kind="hint", alpha=0.3, lr=5e-3, scheduler="cosine", warmup_steps=4)
        dl = DataLoader(TensorDataset(d["x"][:n], d["y"][:n]), batch_size=60)
        if where == "mid_epoch":
            dl = ResumableLoader(dl)
        # every step mid-epoch; else on each epoch's last step (a checkpoint written in
        # on_train_epoch_end, every_n_epochs=1, makes Lightning 2.6 replay one batch on resume)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0,
                                            every_n_train_steps=1 if where == "mid_epoch" else 5)
        t = trainer(max_steps=steps, enable_checkpointing=True, callbacks=[*callbacks, ckpt])
        t.fit(module, dl, ckpt_path=ckpt_path)
        return module, t

    straight, t_straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "crashed", callbacks=[CrashAt(crash)])
    saved = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == (crash - 1 if where == "mid_epoch" else 10)
    torch.manual_seed(999)                                 # the resumed process's own random state
    resumed, t_resumed = run(tmp_path / "crashed", ckpt_path="last")
    assert t_resumed.global_step == t_straight.global_step == steps
    for (ka, a), (kb, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    assert t_resumed.optimizers[0].param_groups[0]["lr"] == t_straight.optimizers[0].param_groups[0]["lr"]


KILLED_RUN = """
import os, signal, sys
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
from kdfast.integrations.lightning import DistillationModule

folder, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
d = load_digits()
x, y = torch.tensor(d.data, dtype=torch.float32)[:256] / 16.0, torch.tensor(d.target)[:256]
torch.manual_seed(0)
teacher = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
student = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))


class Resumable:
    def __init__(self, loader):
        self.loader, self.given, self.skip = loader, 0, 0
    def __len__(self):
        return len(self.loader)
    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.skip):
            next(it)
        self.given, self.skip = self.skip, 0
        for batch in it:
            self.given += 1
            yield batch
    def state_dict(self):
        return {"given": self.given}
    def load_state_dict(self, state):
        self.skip = state["given"]


class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


module = DistillationModule(student, "consistency", ema_decay=0.9, noise_std=0.1, lr=1e-2,
                            scheduler="linear", warmup_steps=2)
ckpt = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=14, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[Kill(), ckpt])
last = os.path.join(folder, "last.ckpt")
# the loader's own generator: its iterators draw their base seed from it, not from the global one
loader = DataLoader(TensorDataset(x, y), batch_size=32, generator=torch.Generator())
trainer.fit(module, Resumable(loader), ckpt_path=last if os.path.exists(last) else None)
torch.save(module.state_dict(), out)
"""


def test_a_killed_process_resumes_to_the_straight_runs_weights(tmp_path, monkeypatch):
    """A process SIGKILLed at step 9 of 14 (no chance to clean up); the run is started
    again and resumes from ``last.ckpt`` (step 8, mid-epoch): the student, the mode's EMA
    teacher and its step counter (``end_step`` state of the consistency mode) end as in a
    straight run, the random input noise of every step included (restore_rng)."""
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    argv = [sys.executable, str(script), str(tmp_path / "killed"), "9", str(tmp_path / "never.pt")]
    killed = subprocess.run(argv,
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -9 and not (tmp_path / "never.pt").exists(), killed.stderr[-3000:]
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=False)["global_step"] == 8

    def run(folder: str, out: str) -> None:          # in this process: fresh module, trainer, loader
        monkeypatch.setattr(sys, "argv", ["run.py", str(tmp_path / folder), "-1", str(tmp_path / out)])
        runpy.run_path(str(script), run_name="__main__")

    run("killed", "resumed.pt")                        # finds last.ckpt and resumes from it
    run("straight", "straight.pt")
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert list(a) == list(b) and any(k.startswith("mode.ema.") for k in a)
    assert int(b["mode.steps"]) == 14
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_wrapper_with_online_mode_trains_the_peer(digits):
    d = digits
    peer = student(9)
    peer_before = params(peer)
    module = DistillationModule(student(), train.Online([peer], temperature=2.0), lr=1e-2)

    class Digits(pl.LightningDataModule):
        def train_dataloader(self):
            return loaders(d)[0]

    t = trainer(max_steps=4)
    t.fit(module, datamodule=Digits())                  # the mode is prepared on the datamodule's data
    in_opt = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in peer.parameters()} <= in_opt
    assert not all(torch.equal(a, b) for a, b in zip(peer.parameters(), peer_before))
    assert any(k.startswith("mode.peers.0.") for k in module.state_dict())


@pytest.mark.parametrize("name", ["supervised", "hard", "multi_teacher", "self", "compressed", "consistency",
                                  "offline"])
def test_every_mode_by_name_trains_under_lightning(digits, tmp_path, name):
    """The other modes of the training layer, by name with their options, a few steps
    each: the student changes, the loss is finite, evaluation runs."""
    d = digits
    teacher = d["teacher"]
    options = {"supervised": {}, "hard": {"teacher": teacher, "threshold": 0.5},
               "multi_teacher": {"teachers": [teacher, copy.deepcopy(teacher)], "combine": "confidence"},
               "self": {"teacher": teacher, "temperature": 2.0},
               "compressed": {"teacher": teacher, "sparsity": 0.5, "prune_schedule": "gradual",
                              "prune_steps": 4},
               "consistency": {"ema_decay": 0.9, "noise_std": 0.05},
               "offline": {"alpha": 0.2, "tail": "residual"}}[name]
    train_dl, test_dl = loaders(d)
    if name == "offline":
        from kdfast.cache import CachedDataset, TeacherCache, TopK

        data = TensorDataset(d["x"][:256], d["y"][:256])
        cache = TeacherCache.build(tmp_path / "cache", teacher, data, storage=TopK(k=4), temperature=2.0,
                                   progress=False, fsync=False)
        train_dl = CachedDataset(data, cache).loader(batch_size=64)
    s = student()
    before = params(s)
    module = DistillationModule(s, name, lr=1e-2, **options)
    recorder = StepLosses()
    t = trainer(max_steps=5, callbacks=[recorder], limit_val_batches=1, val_check_interval=5,
                check_val_every_n_epoch=None)
    t.fit(module, train_dl, test_dl)
    assert len(recorder.losses) == 5 and all(torch.isfinite(torch.tensor(recorder.losses)))
    assert not all(torch.equal(a, b) for a, b in zip(s.parameters(), before))
    assert "val/accuracy" in t.callback_metrics
    if name == "compressed":
        assert train.sparsity_of(s) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("how", ["lightning_mapping", "paired"])
def test_wrapper_with_a_domain_mode_and_its_lazily_built_discriminator(digits, how):
    """Adversarial mode: source = labelled digits, target = the same digits mirrored left to
    right (unlabelled); the discriminator is built on the first {"source", "target"} batch."""
    d = digits
    source = DataLoader(TensorDataset(d["x"][:600], d["y"][:600]), batch_size=50)
    mirrored = d["x"][600:].reshape(-1, 8, 8).flip(-1).reshape(-1, 64)
    target = DataLoader(TensorDataset(mirrored), batch_size=50)
    data = {"source": source, "target": target}
    if how == "paired":
        data = train.paired(source, target)
    module = DistillationModule(student(), "adversarial", teacher=d["teacher"], feature_path="1", hidden=16,
                                total_steps=6, lr=1e-2)
    recorder = StepLosses()
    t = trainer(max_steps=6, callbacks=[recorder])
    t.fit(module, data)
    assert module.mode.discriminator is not None and len(recorder.losses) == 6
    in_opt = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.mode.discriminator.parameters()} <= in_opt
    assert {"train/domain", "train/kd"} <= set(t.callback_metrics)
    assert int(module.mode.steps) == 6


# ----------------------------------------------------------------------------------- callback


class LitClassifier(pl.LightningModule):
    """A user's existing module: its own network, cross-entropy and optimizer."""

    def __init__(self, hidden: int = 12, seed: int = 1, as_dict: bool = False) -> None:
        super().__init__()
        self.net = student(seed, hidden)
        self.as_dict = as_dict

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_ce", loss)
        return {"loss": loss, "n": len(y)} if self.as_dict else loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("as_dict", [False, True])
def test_callback_adds_kdfasts_term_to_an_existing_module(digits, tmp_path, as_dict):
    d = digits
    teacher = copy.deepcopy(d["teacher"])
    teacher_before = params(teacher)
    lit = LitClassifier(as_dict=as_dict)
    first = copy.deepcopy(lit.net)
    before = agreement(lit.net, d)
    kd = DistillationCallback(teacher, temperature=2.0, alpha=0.25, module="net")
    recorder = StepLosses()
    train_dl, test_dl = loaders(d)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    t = trainer(max_steps=40, callbacks=[kd, recorder, ckpt], enable_checkpointing=True,
                val_check_interval=40, check_val_every_n_epoch=None)
    t.fit(lit, train_dl, test_dl)
    # the first step's loss: alpha * CE + (1 - alpha) * kdfast.kd_loss, computed independently
    x, y = next(iter(train_dl))
    s_logits, t_logits = first(x), d["teacher"](x)
    expected = 0.25 * F.cross_entropy(s_logits, y) + 0.75 * kdfast.kd_loss(s_logits, t_logits,
                                                                            temperature=2.0)
    assert recorder.losses[0] == pytest.approx(expected.item(), rel=1e-6)
    assert sum(recorder.losses[-5:]) < 0.7 * sum(recorder.losses[:5])
    after = agreement(lit.net, d)
    assert after > before + 0.3
    assert t.callback_metrics["distill/val_agreement"].item() == pytest.approx(after, abs=1e-6)
    logged = set(t.callback_metrics)
    assert {"distill/kd", "distill/task_loss", "distill/loss", "train_ce", "val_acc"} <= logged
    # the teacher: unchanged, outside the optimizer and the checkpoint; the module is itself again
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), teacher_before))
    assert not {id(p) for p in teacher.parameters()} & {
        id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert sorted(saved["state_dict"]) == sorted(f"net.{k}" for k in lit.net.state_dict())
    assert saved["callbacks"][kd.state_key] == {"temperature": 2.0, "alpha": 0.25, "divergence": "forward_kl",
                                                "beta": 0.5, "softcap": None, "module": "net"}
    assert "training_step" not in lit.__dict__ and "validation_step" not in lit.__dict__
    assert not lit.net._forward_hooks


def test_callback_on_the_modules_forward_follows_dtype_moves(digits):
    """``module=""`` hooks the LightningModule's own forward (``self(x)``); with
    ``precision="64-true"`` the teacher is moved to float64 with the module."""
    d = digits

    class UsesSelf(LitClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    teacher = copy.deepcopy(d["teacher"])
    lit = UsesSelf()
    kd = DistillationCallback(teacher, temperature=1.5, alpha=0.0, divergence="jsd")
    recorder = StepLosses()
    trainer(max_steps=3, precision="64-true", callbacks=[kd, recorder], limit_val_batches=0).fit(
        lit, loaders(d)[0])
    assert teacher[0].weight.dtype == torch.float64 and lit.net[0].weight.dtype == torch.float64
    assert len(recorder.losses) == 3 and all(v > 0 for v in recorder.losses)


# ------------------------------------------------------------------------------------- errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_teachers_follow_the_module_to_the_gpu(digits):
    d = digits
    teacher = copy.deepcopy(d["teacher"])
    module = DistillationModule(student(), "soft", teacher=teacher, lr=1e-2)
    t = pl.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    t.fit(module, loaders(d)[0])
    assert teacher[0].weight.is_cuda and module.student[0].weight.is_cuda
    teacher2, lit = copy.deepcopy(d["teacher"]), LitClassifier()
    kd = DistillationCallback(teacher2, module="net")
    pl.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[kd]).fit(lit, loaders(d)[0])
    assert teacher2[0].weight.is_cuda and lit.net[0].weight.is_cuda


def test_bad_arguments_raise_clear_errors(digits):
    d, s = digits, student()
    with pytest.raises(TypeError, match=r"student must be an nn\.Module"):
        DistillationModule("net", "soft", teacher=d["teacher"])
    with pytest.raises(TypeError, match="mode must be"):
        DistillationModule(s, 3)
    with pytest.raises(ValueError, match="unknown distillation mode 'sofft'"):
        DistillationModule(s, "sofft", teacher=d["teacher"])
    with pytest.raises(TypeError, match="mode options"):
        DistillationModule(s, train.Soft(d["teacher"]), temperature=2.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        DistillationModule(s, "soft", teacher=d["teacher"], optimizer="rmsprop")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        DistillationModule(s, "soft", teacher=d["teacher"], scheduler="step")
    with pytest.raises(ValueError, match="lr must be"):
        DistillationModule(s, "soft", teacher=d["teacher"], lr=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be"):
        DistillationModule(s, "soft", teacher=d["teacher"], warmup_steps=1.5)
    with pytest.raises(ValueError, match="student is also the mode's frozen teacher"):
        DistillationModule(s, "soft", teacher=s)
    with pytest.raises(TypeError, match=r"teacher must be an nn\.Module"):
        DistillationCallback("teacher")
    with pytest.raises(ValueError, match="alpha must be"):
        DistillationCallback(d["teacher"], alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationCallback(d["teacher"], temperature=0.0)
    with pytest.raises(TypeError, match="module must be"):
        DistillationCallback(d["teacher"], module=3)
    dl = loaders(d)[0]
    with pytest.raises(ValueError, match="module='body' names no submodule"):
        trainer(max_steps=1, callbacks=[DistillationCallback(d["teacher"], module="body")]).fit(
            LitClassifier(), dl)

    class Other(LitClassifier):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(64, 10)

    other = Other()
    with pytest.raises(RuntimeError, match="'aux' did not run during training_step"):
        trainer(max_steps=1, callbacks=[DistillationCallback(d["teacher"], module="aux")]).fit(other, dl)
    assert "training_step" not in other.__dict__ and not other.aux._forward_hooks    # restored

    class Manual(LitClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="manual optimization"):
        trainer(max_steps=1, callbacks=[DistillationCallback(d["teacher"], module="net")]).fit(Manual(), dl)


def test_missing_lightning_names_the_extra_and_kdfast_does_not_import_it():
    code = ("import sys\n"
            "import kdfast, kdfast.train, kdfast.integrations\n"
            "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)\n"
            "sys.modules['lightning'] = sys.modules['lightning.pytorch'] = None\n"
            "sys.modules['pytorch_lightning'] = None\n"
            "try:\n"
            "    import kdfast.integrations.lightning\n"
            "except ImportError as err:\n"
            "    print(err)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'kdfast[lightning]'" in out.stdout
    assert "kdfast.integrations.lightning" in out.stdout


def test_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_distill.py"), "--steps", "40",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines() if ":" in line}
    for key in ("teacher", "callback", "wrapper"):
        assert key in lines, out.stdout
    assert "agreement" in lines["callback"] and "agreement" in lines["wrapper"]
    assert (tmp_path / "wrapper" / "last.ckpt").is_file()


def test_docstring_examples():
    import doctest

    import kdfast.integrations.lightning as module

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module.__name__, extraglobs={"torch": torch, "kdfast": kdfast})
             if t.examples]
    assert len(tests) == 3
    for test in tests:
        torch.manual_seed(0)
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
