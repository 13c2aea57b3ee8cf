"""kdfast.train.Distiller: the loop, checkpoints with an identical continuation, gradient
accumulation, schedules, logging, and a student trained with kdfast's losses tracking one
trained with the plain-PyTorch references."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdfast.train import Distiller, Feature, Hard, MultiTeacher, Soft, Supervised
from tests.train_helpers import ConvNet, Net, crash_and_resume, data, loader, params_of, unchanged


def _distiller(mode, student, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("lr", 1e-2)
    return Distiller(student, mode, **kw)


@pytest.mark.parametrize("name", ["supervised", "soft", "hard", "multi_teacher", "feature"])
def test_fit_lowers_the_loss_and_leaves_the_teacher(name):
    teacher = Net(32, seed=1)
    before = params_of(teacher)
    mode = {"supervised": lambda: Supervised(), "soft": lambda: Soft(teacher, temperature=2.0),
            "hard": lambda: Hard(teacher, use_labels=False),
            "multi_teacher": lambda: MultiTeacher([teacher, Net(24, seed=3)]),
            "feature": lambda: Feature(teacher, ["body"], kind="hint")}[name]()
    torch.manual_seed(0)
    result = _distiller(mode, Net(seed=2), epochs=6, log_every=1).fit(
        loader(128, 16), eval_data=loader(64, 32, seed=1, shuffle=False))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert unchanged(teacher, before) and all(p.grad is None for p in teacher.parameters())
    assert {"accuracy", "f1", "ece", "nll"} <= set(result.metrics)
    assert ("agreement" in result.metrics) == (name != "supervised")
    assert result.steps == 6 * 8


def _straight_and_resumed(tmp_path, make_mode, *, epochs=3, stop_at=11, **kw):
    """A straight run and one crashed at ``stop_at`` steps, then resumed."""
    def run(folder, callbacks=(), resume=None):
        torch.manual_seed(123)
        student = ConvNet(4, seed=2)
        mode = make_mode()
        d = _distiller(mode, student, epochs=epochs, checkpoint_dir=folder, save_every=1, log_every=1,
                       callbacks=callbacks, **kw)
        d.fit(DataLoader(TensorDataset(torch.randn(70, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                                       torch.arange(70) % 5), batch_size=8, shuffle=True), resume=resume)
        return d

    return crash_and_resume(tmp_path, run, stop_at)


@pytest.mark.parametrize("stop_at", [5, 10, 15])   # resume after steps 4, 9 (epoch 1's end), 14
def test_resume_gives_an_identical_continuation(tmp_path, stop_at):
    teacher = ConvNet(8, seed=1)
    straight, resumed = _straight_and_resumed(
        tmp_path, lambda: Feature(teacher, ["features"], kind="hint", alpha=0.3), stop_at=stop_at,
        scheduler="cosine", warmup_steps=3)
    assert resumed.step == straight.step == 27
    for a, b in zip(straight.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.mode.parameters(), resumed.mode.parameters()):
        assert torch.equal(a, b)
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    losses = [(h["step"], h["loss"]) for h in straight.history if "loss" in h]
    assert [(h["step"], h["loss"]) for h in resumed.history if "loss" in h] == losses


def test_resume_with_dropout_and_a_loader_generator(tmp_path):
    """Random numbers drawn by the model (dropout) and by the loader's own generator."""
    def run(folder, max_steps=None, resume=None):
        torch.manual_seed(7)
        student = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 5))
        x, y = data(50)
        dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
        d = _distiller(Soft(Net(32, seed=1), alpha=0.5), student, epochs=2, max_steps=max_steps,
                       checkpoint_dir=folder)
        d.fit(dl, resume=resume)
        return d

    a = run(tmp_path / "a")
    b = run(tmp_path / "b", max_steps=5)       # stops inside epoch 1 and checkpoints there
    assert b.step == 5
    b = run(tmp_path / "b", resume=True)
    assert all(torch.equal(p, q) for p, q in zip(a.student.parameters(), b.student.parameters()))


def test_resume_true_without_a_checkpoint_starts_fresh(tmp_path):
    d = _distiller(Supervised(), Net(), epochs=1, checkpoint_dir=tmp_path)
    assert d.fit(loader(32, 8), resume=True).steps == 4
    assert (tmp_path / "last.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and "loss" in log[0]


def test_resume_checks_the_mode(tmp_path):
    _distiller(Supervised(), Net(), checkpoint_dir=tmp_path).fit(loader(32, 8))
    d = _distiller(Soft(Net(32)), Net(), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="written by mode 'supervised'"):
        d.fit(loader(32, 8), resume=True)
    with pytest.raises(ValueError, match="not a kdfast Distiller checkpoint"):
        torch.save({"a": 1}, tmp_path / "x.pt")
        _distiller(Supervised(), Net()).fit(loader(32, 8), resume=tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _distiller(Supervised(), Net()).fit(loader(32, 8), resume=tmp_path / "missing.pt")


def test_gradient_accumulation_equals_the_large_batch():
    x, y = data(64)
    teacher = Net(32, seed=1)

    def run(batch_size, accum):
        student = Net(seed=2)
        d = _distiller(Soft(teacher, alpha=0.5), student, optimizer="sgd", grad_accum=accum, epochs=1)
        d.fit(DataLoader(TensorDataset(x, y), batch_size=batch_size))
        return student, d.step

    big, steps_big = run(16, 1)
    small, steps_small = run(8, 2)
    assert steps_big == steps_small == 4
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_leftover_micro_batches_make_a_last_step():
    d = _distiller(Supervised(), Net(), grad_accum=3, epochs=2)
    assert d.fit(loader(40, 8)).steps == 4           # 5 batches per epoch: steps of 3 + 2


def test_max_steps_and_schedules():
    d = _distiller(Supervised(), Net(), epochs=5, max_steps=7, scheduler="linear")
    d.fit(loader(64, 8))
    assert d.step == 7
    assert d.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    d = _distiller(Supervised(), Net(), epochs=1, scheduler="cosine", warmup_steps=4)
    seen = []
    d.callbacks.append(lambda event, dist, logs: seen.append((event, logs.get("lr"))))
    d.log_every = 1
    d.fit(loader(64, 8))
    lrs = [lr for event, lr in seen if event == "step"]
    assert lrs[:4] == pytest.approx([0.005, 0.0075, 0.01, 0.01]) or lrs[0] < lrs[2]
    assert ("epoch", None) in seen


def test_custom_optimizer_and_scheduler_callables():
    d = _distiller(Supervised(), Net(), epochs=1,
                   optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5),
                   scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.1))
    d.fit(loader(32, 8))
    assert isinstance(d.optimizer, torch.optim.SGD)
    assert d.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.1**2)


def test_mode_parameters_are_in_the_optimizer():
    teacher = ConvNet(8, seed=1)
    d = _distiller(Feature(teacher, ["features"]), ConvNet(4), epochs=1)
    x = torch.randn(16, 1, 8, 8)
    d.prepare(DataLoader(TensorDataset(x, torch.arange(16) % 5), batch_size=8))
    in_opt = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in d.mode.adapters.parameters())
    assert not any(id(p) in in_opt for p in teacher.parameters())


def test_string_modes_and_option_errors():
    teacher = Net(32)
    d = Distiller(Net(), "soft", teacher=teacher, temperature=3.0, progress=False)
    assert isinstance(d.mode, Soft) and d.mode.temperature == 3.0
    with pytest.raises(ValueError, match="unknown distillation mode"):
        Distiller(Net(), "distil")
    with pytest.raises(TypeError, match="pass them to the mode"):
        Distiller(Net(), Soft(teacher), temperature=2.0)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        Distiller(Net(), Supervised(), epochs=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        Distiller(Net(), Supervised(), lr=-1.0)
    with pytest.raises(ValueError, match="amp must be one of"):
        Distiller(Net(), Supervised(), amp="fp8")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        Distiller(Net(), Supervised(), scheduler="step")
    with pytest.raises(ValueError, match="optimizer must be"):
        Distiller(Net(), Supervised(), optimizer="lion")
    with pytest.raises(TypeError, match=r"student must be an nn\.Module"):
        Distiller("net", Supervised())
    with pytest.raises(ValueError, match="training data is empty"):
        Distiller(Net(), Supervised(), progress=False).fit([])


def test_evaluate_reports_metrics_and_restores_train_mode():
    teacher = Net(32, seed=1)
    student = Net(seed=2).train()
    d = _distiller(Soft(teacher), student)
    x, y = data(40)
    m = d.evaluate(DataLoader(TensorDataset(x, y), batch_size=16))
    assert student.training
    logits = student(x)
    assert m["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert m["agreement"] == pytest.approx((logits.argmax(-1) == teacher(x).argmax(-1)).float().mean().item())
    assert "agreement" not in d.evaluate(DataLoader(TensorDataset(x, y), batch_size=16), teacher=None)


def test_progress_bar_runs(capsys):
    Distiller(Net(), Supervised(), progress=True, epochs=1).fit(loader(32, 8))


@pytest.mark.parametrize("name", ["soft", "feature", "multi_teacher"])
def test_kdfast_losses_track_the_plain_pytorch_losses(name):
    """Two students, same batches, one trained with kdfast's ops and one with the plain-PyTorch
    references: their loss curves and final weights agree closely."""
    teacher = ConvNet(8, seed=1)
    other = ConvNet(6, seed=3)
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.arange(96) % 5
    y[::3] = -100
    runs = []
    for backend in ("kdfast", "reference"):
        make = {"soft": lambda b: Soft(teacher, temperature=3.0, alpha=0.4, backend=b),
                "feature": lambda b: Feature(teacher, ["features"], kind="hint", backend=b),
                "multi_teacher": lambda b: MultiTeacher([teacher, other], combine="confidence", backend=b)}
        torch.manual_seed(0)
        d = _distiller(make[name](backend), ConvNet(4, seed=2), epochs=4, log_every=1, lr=3e-3)
        d.fit(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
        runs.append(([h["loss"] for h in d.history], params_of(d.student)))
    (la, pa), (lb, pb) = runs
    assert len(la) == 24
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-3, atol=1e-5)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
