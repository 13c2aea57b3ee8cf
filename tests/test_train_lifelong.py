"""Learning without forgetting in kdfast.train: MultiHeadNet, the Lifelong mode's loss against
the paper's formula, gradients, the two backends, and learn_tasks (accuracy matrix against a
direct evaluation, less drift of the old head than fine-tuning, the warm-up, errors)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdfast
from kdfast.train import Lifelong, LifelongResult, MultiHeadNet, Task, learn_tasks, make_mode
from tests.train_helpers import params_of, unchanged

D = 8


def _net(seed: int = 0, batchnorm: bool = False) -> MultiHeadNet:
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else []) + [nn.ReLU()]
    return MultiHeadNet(nn.Sequential(*layers), 16)


def _task(name: str, classes: int, offset: int, seed: int, n: int = 64) -> Task:
    """Gaussian clusters, one per class; labels are global (``offset + local``)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, D, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + torch.randn(n, D, generator=g)
    return Task(name, classes, DataLoader(TensorDataset(x, y + offset), batch_size=16, shuffle=True),
                DataLoader(TensorDataset(x, y + offset), batch_size=32))


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), mean over rows, no T^2 (independent formula)."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    log_target=True, reduction="batchmean")


def _two_old_heads(seed: int = 0):
    """A net with old heads of 3 and 2 classes, its frozen snapshot, then a new head of 4."""
    net = _net(seed)
    net.add_head(3)
    net.add_head(2)
    teacher = copy.deepcopy(net)
    net.add_head(4)
    with torch.no_grad():            # move the student away from the snapshot
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net, teacher


# -- MultiHeadNet ------------------------------------------------------------------------------------


def test_multi_head_net_concatenates_heads_in_task_order():
    net = _net()
    assert [net.add_head(c) for c in (3, 2, 4)] == [0, 1, 2]
    assert net.head_classes == [3, 2, 4] and net.num_classes == 9
    assert [net.task_slice(i) for i in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 9)]
    x = torch.randn(6, D)
    out = net(x)
    feats = net.backbone(x)
    assert out.shape == (6, 9)
    for i, head in enumerate(net.heads):
        torch.testing.assert_close(out[:, net.task_slice(i)], head(feats))
        torch.testing.assert_close(net.heads_forward(x)[i], head(feats))
    assert net.task_slice(-1) == slice(5, 9)


def test_multi_head_net_errors():
    net = _net()
    with pytest.raises(RuntimeError, match=r"no head yet; call add_head"):
        net(torch.randn(2, D))
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        net.add_head(0)
    net.add_head(2)
    with pytest.raises(IndexError, match=r"task must be an int in \[0, 1\), got 1"):
        net.task_slice(1)
    with pytest.raises(TypeError, match=r"backbone must be an nn\.Module"):
        MultiHeadNet("resnet", 16)
    with pytest.raises(ValueError, match="feature_dim must be an int >= 1"):
        MultiHeadNet(nn.Linear(2, 2), 0)


# -- the Lifelong mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("unlabelled", [False, True])
def test_lwf_loss_matches_the_formula_per_old_head(unlabelled):
    net, teacher = _two_old_heads()
    x = torch.randn(20, D)
    y = torch.randint(5, 9, (20,))
    if unlabelled:
        y[::3] = -100
    T, lam = 2.0, 0.7
    out = Lifelong(teacher, temperature=T, lwf_weight=lam)(net, (x, y))
    s, t = net(x).double(), teacher(x).double()
    labelled = y != -100
    ce = F.cross_entropy(s[labelled][:, 5:], y[labelled] - 5)
    lwf = [_kl(s[:, a:b], t[:, a:b], T) for a, b in ((0, 3), (3, 5))]
    torch.testing.assert_close(out.loss.double(), ce + lam * (lwf[0] + lwf[1]), rtol=1e-5, atol=1e-6)
    assert out.parts["lwf0"].item() == pytest.approx(lwf[0].item(), rel=1e-5)
    assert out.parts["lwf1"].item() == pytest.approx(lwf[1].item(), rel=1e-5)
    assert out.parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    joint = _kl(s[:, :5], t[:, :5], T)          # one softmax over both old heads is a different loss
    assert abs(joint.item() - (lwf[0] + lwf[1]).item()) > 1e-3


def test_lwf_gradient_is_that_of_the_papers_modified_cross_entropy():
    """The KL term differs from -sum_c p_t^(T) log p_s^(T) by the teacher's entropy: same gradient."""
    net, teacher = _two_old_heads(1)
    x, y = torch.randn(16, D), torch.randint(5, 9, (16,))
    net.zero_grad()
    Lifelong(teacher, temperature=2.0)(net, (x, y)).loss.backward()
    ref = copy.deepcopy(net).double()
    s, t = ref(x.double()), teacher(x).double()

    def modified_ce(a, b):
        return -(F.softmax(t[:, a:b] / 2, -1) * F.log_softmax(s[:, a:b] / 2, -1)).sum(-1).mean()

    loss = F.cross_entropy(s[:, 5:], y - 5) + modified_ce(0, 3) + modified_ce(3, 5)
    for g, e in zip((p.grad for p in net.parameters()), torch.autograd.grad(loss, list(ref.parameters()))):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


def test_lwf_gradients_reach_backbone_and_every_head_not_the_teacher():
    net, teacher = _two_old_heads()
    before = params_of(teacher)
    mode = Lifelong(teacher)
    x, y = torch.randn(16, D), torch.randint(5, 9, (16,))
    mode.prepare(net, (x, y))
    mode(net, (x, y)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and unchanged(teacher, before)
    assert not teacher.training and list(mode.trainable_parameters()) == [] and mode.state_dict() == {}
    assert mode.old_heads == [3, 2] and mode.old_classes == 5


def test_lwf_with_a_plain_teacher_is_one_old_head():
    net, teacher = _two_old_heads()
    plain = nn.Sequential(teacher.backbone, nn.Linear(16, 5))
    x, y = torch.randn(12, D), torch.randint(5, 9, (12,))
    out = Lifelong(plain, temperature=3.0)(net, (x, y))
    s, t = net(x).double(), plain(x).double()
    expected = F.cross_entropy(s[:, 5:], y - 5) + _kl(s[:, :5], t, 3.0)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert sorted(out.parts) == ["ce", "lwf", "lwf0"]


def test_lwf_kdfast_and_reference_backends_agree():
    x, y = torch.randn(24, D), torch.randint(5, 9, (24,))
    y[::4] = -100
    results = []
    for backend in ("kdfast", "reference"):
        net, teacher = _two_old_heads(2)
        out = Lifelong(teacher, temperature=2.0, lwf_weight=1.5, backend=backend)(net, (x, y))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in net.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lwf_mode_errors():
    net, teacher = _two_old_heads()
    x = torch.randn(8, D)
    with pytest.raises(ValueError, match=r"labels must be global class indices of the new task, in \[5, 9\)"):
        Lifelong(teacher)(net, (x, torch.full((8,), 2)))
    with pytest.raises(ValueError, match="outputs 5 columns, no more than the old heads' 5; add the new"):
        Lifelong(teacher)(teacher, (x, torch.full((8,), 5)))
    with pytest.raises(ValueError, match=r"the teacher outputs 5 columns but old_heads \[3\] cover 3"):
        Lifelong(teacher, old_heads=[3])(net, (x, torch.full((8,), 5)))
    with pytest.raises(ValueError, match="old_heads must be a non-empty sequence of class counts"):
        Lifelong(teacher, old_heads=[3, 0])
    with pytest.raises(ValueError, match="lwf_weight must be finite"):
        Lifelong(teacher, lwf_weight=-1.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        make_mode("lifelong")
    assert make_mode("lifelong", teacher=teacher).old_classes == 5


# -- learn_tasks ----------------------------------------------------------------------------------------


def _snapshots(store):
    """A Distiller callback keeping a copy of the multi-head model at the end of each training."""
    def callback(event, distiller, logs):
        last = event == "epoch" and distiller.epoch == distiller.epochs
        if last and isinstance(distiller.student, MultiHeadNet):
            store.append(copy.deepcopy(distiller.student))
    return [callback]


def _direct_accuracy(model: MultiHeadNet, task: Task, columns: slice) -> float:
    x, y = task.eval_data.dataset.tensors
    with torch.no_grad():
        pred = model.eval()(x)[:, columns].argmax(-1)
    return (pred == y - columns.start).float().mean().item()


@pytest.mark.parametrize("method", ["lwf", "finetune"])
def test_accuracy_matrix_against_a_direct_evaluation(method):
    tasks = [_task("a", 3, 0, 1), _task("b", 2, 3, 2), _task("c", 3, 5, 3)]
    net, snaps = _net(), []
    result = learn_tasks(net, tasks, method=method, epochs=3, lr=1e-2, progress=False,
                         callbacks=_snapshots(snaps))
    assert isinstance(result, LifelongResult) and result.tasks == ["a", "b", "c"] and result.method == method
    assert len(result.accuracy) == 3 and all(len(row) == 3 for row in result.accuracy)
    assert len(snaps) == 3 and net.head_classes == [3, 2, 3]
    columns = [slice(0, 3), slice(3, 5), slice(5, 8)]
    for i in range(3):
        for j in range(3):
            if j > i:
                assert math.isnan(result.accuracy[i][j])
            else:
                expected = _direct_accuracy(snaps[i], tasks[j], columns[j])
                assert result.accuracy[i][j] == pytest.approx(expected, abs=1e-12)
    acc = result.accuracy
    assert result.average_accuracy() == pytest.approx(sum(acc[2]) / 3)
    assert result.average_accuracy(0) == pytest.approx(acc[0][0])
    forgetting = [max(acc[0][0], acc[1][0]) - acc[2][0], acc[1][1] - acc[2][1]]
    assert result.forgetting() == pytest.approx(forgetting)
    table = result.table()
    assert "after c" in table and "forgetting" in table and f"{acc[2][1]:.4f}" in table
    losses = [h["loss"] for h in result.fits[1].history if "loss" in h]
    assert len(result.fits) == 3 and losses[-1] < losses[0]


def test_lwf_keeps_the_old_head_closer_than_finetuning():
    """On new-task inputs, the old head's outputs drift (KL from before the new task) far
    less with LwF than with fine-tuning, on three seeds."""
    for seed in range(3):
        a, b = _task("a", 3, 0, 10 + seed), _task("b", 2, 3, 20 + seed)
        xb = b.eval_data.dataset.tensors[0]
        drift = {}
        for method in ("lwf", "finetune"):
            net = _net(seed)
            torch.manual_seed(seed)
            learn_tasks(net, [a], epochs=6, lr=1e-2, progress=False)
            before = net(xb)[:, :3].detach()
            learn_tasks(net, [b], method=method, epochs=6, lr=1e-2, progress=False)
            drift[method] = _kl(net(xb)[:, :3].detach(), before, 1.0).item()
        assert drift["lwf"] < 0.25 * drift["finetune"], (seed, drift)


def test_finetune_leaves_the_old_heads_and_restores_their_flags():
    tasks = [_task("a", 3, 0, 1), _task("b", 2, 3, 2)]
    net, snaps = _net(), []
    learn_tasks(net, tasks, method="finetune", epochs=2, lr=1e-2, weight_decay=0.1, progress=False,
                callbacks=_snapshots(snaps))
    assert unchanged(net.heads[0], params_of(snaps[0].heads[0]))
    assert not unchanged(net.backbone, params_of(snaps[0].backbone))
    assert all(p.requires_grad for p in net.parameters())


def test_warm_up_trains_only_the_new_head(tmp_path):
    tasks = [_task("a", 3, 0, 1), _task("b", 2, 3, 2)]
    net, states = _net(batchnorm=True), []

    def record(event, distiller, logs):
        if event == "epoch" and distiller.epoch == distiller.epochs:
            states.append(copy.deepcopy(net.state_dict()))

    learn_tasks(net, tasks, warmup_epochs=1, epochs=2, lr=1e-2, progress=False, callbacks=[record],
                checkpoint_dir=tmp_path)
    after_a, after_warmup, after_b = states          # task a (no warm-up), b's warm-up, b
    for key, value in after_warmup.items():          # parameters and batch-norm statistics
        if key.startswith("heads.1."):
            assert not torch.equal(value, after_b[key])
        else:
            assert torch.equal(value, after_a[key]), key
    assert not torch.equal(after_warmup["backbone.0.weight"], after_b["backbone.0.weight"])
    assert not torch.equal(after_warmup["heads.0.weight"], after_b["heads.0.weight"])
    assert net.backbone.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task0", "task1", "task1_warmup"]


def test_existing_heads_are_old_heads_from_the_first_task():
    net = _net()
    net.add_head(4)                                   # e.g. an original task's head
    seen = []

    def record(event, distiller, logs):
        if event == "step" and distiller.step == 1:
            seen.append(distiller.mode)

    result = learn_tasks(net, [_task("b", 2, 4, 2)], epochs=1, progress=False, callbacks=[record])
    assert isinstance(seen[0], Lifelong) and seen[0].old_heads == [4]
    assert net.head_classes == [4, 2] and result.forgetting() == [] and len(result.accuracy) == 1


def test_learn_tasks_errors():
    a, b = _task("a", 3, 0, 1), _task("b", 2, 3, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        learn_tasks(_net(), [a], method="ewc")
    empty = Task("e", 2, DataLoader(TensorDataset(torch.zeros(0, D), torch.zeros(0).long())), a.eval_data)
    with pytest.raises(ValueError, match="task 'e' has no training batches"):
        learn_tasks(_net(), [a, empty])
    with pytest.raises(ValueError, match="tasks must be a non-empty sequence"):
        learn_tasks(_net(), [])
    wrong = Task("b", 2, a.train_data, b.eval_data)   # labels of task a in task b
    with pytest.raises(ValueError, match=r"labels must be global class indices of the new task, in \[3, 5\)"):
        learn_tasks(_net(), [a, wrong], progress=False)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):                      # the first task too
        learn_tasks(_net(), [Task("a", 3, b.train_data, b.eval_data)], progress=False)
    with pytest.raises(TypeError, match="model must be a MultiHeadNet"):
        learn_tasks(nn.Linear(D, 3), [a])
    with pytest.raises(ValueError, match="name must be a str unique"):
        learn_tasks(_net(), [a, a])
    with pytest.raises(ValueError, match="task 'a' has no eval_data; give one or an eval_fn"):
        learn_tasks(_net(), [Task("a", 3, a.train_data)])
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        learn_tasks(_net(), [Task("a", 0, a.train_data, a.eval_data)])
    with pytest.raises(ValueError, match="warmup_epochs must be an int >= 0"):
        learn_tasks(_net(), [a], warmup_epochs=-1)
    with pytest.raises(ValueError, match="learn_tasks: backend must be one of"):
        learn_tasks(_net(), [a], backend="triton")
    with pytest.raises(TypeError, match="teacher= is chosen per task"):
        learn_tasks(_net(), [a], teacher=_net())


def test_eval_fn_is_used():
    a = _task("a", 3, 0, 1)
    calls = []
    result = learn_tasks(_net(), [Task("a", 3, a.train_data)], epochs=1, progress=False,
                         eval_fn=lambda model, task, cols: calls.append((task.name, cols)) or 0.25)
    assert calls == [("a", slice(0, 3))] and result.accuracy == [[0.25]]


def test_kdfast_namespace():
    assert kdfast.train.MODES["lifelong"] is Lifelong and kdfast.train.learn_tasks is learn_tasks
