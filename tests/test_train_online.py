"""The online and self-distillation modes of kdfast.train: deep mutual learning (Online) and
born-again networks (SelfDistillation, born_again): loss values and gradients against
hand-written plain-PyTorch formulas, gradients reaching only what they should, the kdfast
and reference backends agreeing, Distiller runs with an identical continuation after a
checkpoint, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdfast
from kdfast.train import Distiller, MultiTeacher, Online, SelfDistillation, Supervised, born_again, make_mode
from tests.train_helpers import CLASSES, Net, data, loader, params_of, unchanged


def _kl(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(target/T) || softmax(student/T)), mean over rows (independent formula)."""
    return temperature**2 * F.kl_div(F.log_softmax(student / temperature, -1),
                                     F.log_softmax(target / temperature, -1), log_target=True,
                                     reduction="batchmean")


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    labelled = y != -100
    return F.cross_entropy(z[labelled], y[labelled])


def _nets(k: int) -> list[nn.Module]:
    return [Net(16 + 4 * i, seed=i + 2) for i in range(k)]


def _mode_grads(mode, nets, x, y):
    for m in nets:
        m.zero_grad(set_to_none=True)
    out = mode(nets[0], (x, y))
    out.loss.backward()
    return out, [[p.grad.clone() for p in m.parameters()] for m in nets]


# -- Online: the loss and both gradients against hand-written autograd of the formulas ------------


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("unlabelled", [0, 3])
@pytest.mark.parametrize("peer_gradient", [False, True])
def test_online_matches_the_mutual_learning_formulas(k, unlabelled, peer_gradient):
    T = 2.0
    nets = _nets(k)
    x, y = data(30, unlabelled_every=unlabelled)
    mode = Online(nets[1:], temperature=T, peer_gradient=peer_gradient)
    out, got = _mode_grads(mode, nets, x, y)

    ref = [copy.deepcopy(m).double() for m in nets]
    z = [m(x.double()) for m in ref]
    ce = [_ce(zi, y) for zi in z]
    # L_i with the peers' predictions as fixed targets (the paper) and with gradients through them.
    fixed = [ce[i] + sum(_kl(z[i], z[j].detach(), T) for j in range(k) if j != i) / (k - 1) for i in range(k)]
    joint = [ce[i] + sum(_kl(z[i], z[j], T) for j in range(k) if j != i) / (k - 1) for i in range(k)]
    torch.testing.assert_close(out.loss.double(), sum(joint), rtol=1e-5, atol=1e-6)
    for i in range(k):
        kl_i = sum(_kl(z[i], z[j], T) for j in range(k) if j != i) / (k - 1)
        assert out.parts[f"ce{i}"].item() == pytest.approx(ce[i].item(), rel=1e-5)
        assert out.parts[f"kl{i}"].item() == pytest.approx(kl_i.item(), rel=1e-5)
    if peer_gradient:
        expected = [torch.autograd.grad(sum(joint), list(m.parameters()), retain_graph=True) for m in ref]
    else:
        expected = [torch.autograd.grad(fixed[i], list(ref[i].parameters()), retain_graph=True)
                    for i in range(k)]
    for g_net, e_net in zip(got, expected):
        for g, e in zip(g_net, e_net):
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)
    # the two objectives do differ in their gradients (the check above can tell them apart)
    other = torch.autograd.grad(sum(fixed) if peer_gradient else sum(joint), list(ref[1].parameters()))
    assert (other[0] - got[1][0].double()).abs().max() > 1e-4


def test_online_gradients_reach_student_and_peers_only():
    nets = _nets(3)
    bystander = Net(seed=9)
    before = params_of(bystander)
    mode = Online(nets[1:])
    x, y = data(20)
    mode.prepare(nets[0], (x, y))
    _mode_grads(mode, nets, x, y)
    for m in nets:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert {id(p) for p in mode.trainable_parameters()} == {id(p) for m in nets[1:] for p in m.parameters()}
    assert all(p.grad is None for p in bystander.parameters()) and unchanged(bystander, before)
    assert sorted(mode.state_dict())[:2] == ["peers.0.body.0.bias", "peers.0.body.0.weight"]
    assert mode.models(nets[0]) == nets and mode.eval_teacher() is nets[1]


def test_online_unlabelled_batch_trains_on_the_mutual_terms_only():
    nets = _nets(2)
    x, _ = data(16)
    out = Online(nets[1:])(nets[0], (x,))
    z0, z1 = nets[0](x).double(), nets[1](x).double()
    torch.testing.assert_close(out.loss.double(), _kl(z0, z1, 1.0) + _kl(z1, z0, 1.0), rtol=1e-5, atol=1e-6)
    assert out.parts["ce0"].item() == 0.0


@pytest.mark.parametrize("peer_gradient", [False, True])
def test_online_kdfast_and_reference_backends_agree(peer_gradient):
    x, y = data(24, unlabelled_every=4)
    results = []
    for backend in ("kdfast", "reference"):
        nets = _nets(3)
        mode = Online(nets[1:], temperature=3.0, peer_gradient=peer_gradient, backend=backend)
        out, grads = _mode_grads(mode, nets, x, y)
        results.append((out.loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a_net, b_net in zip(g1, g2):
        for a, b in zip(a_net, b_net):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- Online through the Distiller ------------------------------------------------------------------


def test_online_fit_lowers_the_loss_and_trains_the_peers():
    torch.manual_seed(0)
    student, peer = Net(seed=2), Net(24, seed=3)
    before = params_of(peer)
    result = Distiller(student, "online", peers=[peer], epochs=5, lr=1e-2, log_every=1, progress=False).fit(
        loader(128, 16), eval_data=loader(64, 32, seed=1, shuffle=False))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert not unchanged(peer, before)
    assert "agreement" in result.metrics and {"ce1", "kl1"} <= set(result.history[0])


def test_online_resume_gives_an_identical_continuation(tmp_path):
    def run(folder, max_steps=None, resume=None):
        torch.manual_seed(11)
        student, peers = Net(seed=2), [Net(20, seed=3), Net(24, seed=4)]
        d = Distiller(student, Online(peers, temperature=2.0), epochs=2, max_steps=max_steps, lr=1e-2,
                      checkpoint_dir=folder, progress=False)
        d.fit(loader(70, 8), resume=resume)
        return d

    straight = run(tmp_path / "a")
    stopped = run(tmp_path / "b", max_steps=6)       # stops inside epoch 1 and checkpoints there
    assert stopped.step == 6
    torch.manual_seed(999)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.step == straight.step == 18
    for a, b in zip(straight.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    peer_params = list(straight.mode.parameters())
    assert len(peer_params) == 8
    for a, b in zip(peer_params, resumed.mode.parameters()):
        assert torch.equal(a, b)


# -- Online errors ------------------------------------------------------------------------------------


def test_online_errors():
    student, peer = Net(), Net(seed=3)
    x, y = data(8)
    with pytest.raises(ValueError, match="peers must not be empty"):
        Online([])
    with pytest.raises(TypeError, match=r"peers must be an nn\.Module"):
        Online("resnet")
    with pytest.raises(ValueError, match=r"peers\[0\] and peers\[1\] are the same model"):
        Online([peer, peer])
    with pytest.raises(ValueError, match=r"peers\[1\] is the student itself"):
        Online([peer, student])(student, (x, y))
    shared = nn.Sequential(student.body, nn.Linear(16, CLASSES))
    with pytest.raises(ValueError, match=r"peers\[0\] shares parameters with the student"):
        Online([shared]).prepare(student, (x, y))
    with pytest.raises(ValueError, match="peer 0 outputs 7 classes but the student 5"):
        Online([Net(classes=7)])(student, (x, y))
    with pytest.raises(ValueError, match="temperature must be finite"):
        Online([peer], temperature=0.0)
    with pytest.raises(TypeError, match="peer_gradient must be a bool"):
        Online([peer], peer_gradient=1)
    assert isinstance(make_mode("online", peers=[peer]), Online)


# -- SelfDistillation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (3.0, 0.4)])
def test_self_distillation_matches_the_born_again_loss(temperature, alpha):
    teacher, student = Net(seed=1), Net(seed=2)
    x, y = data(30, unlabelled_every=5)
    out = SelfDistillation(teacher, temperature=temperature, alpha=alpha)(student, (x, y))
    s, t = student(x).double(), teacher(x).double()
    expected = (1 - alpha) * _kl(s, t, temperature) + alpha * _ce(s, y)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_self_distillation_gradient_is_that_of_the_cross_entropy_to_the_teacher():
    """At T = 1, alpha = 0: the gradient of the paper's CE(p_teacher, q_student)."""
    teacher, student = Net(seed=1), Net(seed=2)
    x, _ = data(20)
    student.zero_grad()
    SelfDistillation(teacher)(student, (x,)).loss.backward()
    ref = copy.deepcopy(student).double()
    p = F.softmax(teacher(x).double(), -1).detach()
    ce = -(p * F.log_softmax(ref(x.double()), -1)).sum(-1).mean()
    for g, e in zip((p.grad for p in student.parameters()), torch.autograd.grad(ce, list(ref.parameters()))):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


def test_self_distillation_gradients_and_backends():
    teacher = Net(seed=1)
    before = params_of(teacher)
    x, y = data(24, unlabelled_every=4)
    results = []
    for backend in ("kdfast", "reference"):
        student = Net(seed=2)
        mode = SelfDistillation(teacher, temperature=2.0, alpha=0.3, backend=backend)
        mode.prepare(student, (x, y))
        out = mode(student, (x, y))
        out.loss.backward()
        assert all(p.grad is not None for p in student.parameters())
        results.append((out.loss.detach(), [p.grad for p in student.parameters()]))
    assert all(p.grad is None for p in teacher.parameters()) and unchanged(teacher, before)
    assert not teacher.training and list(mode.trainable_parameters()) == []
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_self_distillation_errors():
    teacher = Net(seed=1)
    x, y = data(8)
    with pytest.raises(ValueError, match="the student is the teacher itself"):
        SelfDistillation(teacher).prepare(teacher, (x, y))
    with pytest.raises(ValueError, match="shares parameters with the teacher"):
        SelfDistillation(teacher).prepare(nn.Sequential(teacher.body, nn.Linear(32, CLASSES)), (x, y))
    with pytest.raises(ValueError, match=r"the teacher \(the previous generation\) outputs 7 classes"):
        SelfDistillation(Net(classes=7))(Net(), (x, y))
    with pytest.raises(ValueError, match="needs a teacher"):
        make_mode("self")
    assert make_mode("self", teacher=teacher).name == "self"


# -- born_again ------------------------------------------------------------------------------------------


def _recorder(seen):
    def callback(event, distiller, logs):
        if event == "step" and distiller.step == 1:
            seen.append((type(distiller.mode), [id(t) for t in distiller.mode.teachers], distiller.student))
    return [callback]


@pytest.mark.parametrize("ensemble", [False, True])
def test_born_again_trains_each_generation_from_the_previous(ensemble):
    seen = []
    torch.manual_seed(0)
    gens = born_again(lambda: Net(seed=2), loader(64, 16), generations=3, eval_data=loader(32, 32, seed=1),
                      ensemble=ensemble, temperature=2.0, epochs=2, lr=1e-2, progress=False,
                      callbacks=_recorder(seen))
    assert [g.index for g in gens] == [0, 1, 2] and [g.result.steps for g in gens] == [8, 8, 8]
    assert [s[2] for s in seen] == [g.model for g in gens]
    m0, m1 = id(gens[0].model), id(gens[1].model)
    assert seen[0][:2] == (Supervised, []) and seen[1][:2] == (SelfDistillation, [m0])
    assert seen[2][:2] == ((MultiTeacher, [m0, m1]) if ensemble else (SelfDistillation, [m1]))
    assert "agreement" not in gens[0].result.metrics and "agreement" in gens[2].result.metrics
    assert not any(p.requires_grad for g in gens[:2] for p in g.model.parameters())   # frozen teachers
    assert all(p.requires_grad for p in gens[2].model.parameters())


def test_born_again_student_learns_its_teacher():
    """Generation 1 (alpha=0: no labels) moves towards generation 0: its divergence from it
    falls and it agrees with it far more than a fresh model does."""
    torch.manual_seed(1)
    dl = loader(96, 16)
    gens = born_again(lambda: Net(seed=int(torch.randint(0, 1000, ()))), dl, generations=2, epochs=8,
                      lr=3e-2, log_every=1, progress=False)
    kd = [h["kd"] for h in gens[1].result.history if "kd" in h]
    assert sum(kd[-6:]) < 0.5 * sum(kd[:6])
    x = dl.dataset.tensors[0]
    agree = [(m(x).argmax(-1) == gens[0].model(x).argmax(-1)).float().mean().item()
             for m in (Net(seed=12345), gens[1].model)]
    assert agree[1] > agree[0] + 0.25


def test_born_again_checkpoint_folders(tmp_path):
    born_again(lambda: Net(seed=2), loader(32, 16), generations=2, progress=False, checkpoint_dir=tmp_path)
    assert all((tmp_path / f"generation{g}" / "last.pt").is_file() for g in (0, 1))


def test_born_again_errors():
    dl = loader(32, 16)
    with pytest.raises(ValueError, match="generations must be an int >= 1, got 0"):
        born_again(lambda: Net(), dl, generations=0)
    with pytest.raises(TypeError, match="make_student must be callable"):
        born_again(3, dl)
    with pytest.raises(TypeError, match="make_student must be a function that builds a model"):
        born_again(Net(), dl)
    with pytest.raises(TypeError, match=r"make_student must return an nn\.Module"):
        born_again(lambda: "net", dl)
    model = Net()
    with pytest.raises(ValueError, match="returned the model of an earlier generation"):
        born_again(lambda: model, dl, generations=2, progress=False)
    widths = iter([5, 7])
    with pytest.raises(ValueError, match="generation 1's model outputs 7 classes but generation 0's 5"):
        born_again(lambda: Net(classes=next(widths)), dl, generations=2, progress=False)
    calls = []
    with pytest.raises(ValueError, match="temperature must be finite"):   # before any training
        born_again(lambda: calls.append(1) or Net(), dl, temperature=-1.0)
    assert calls == []
    with pytest.raises(ValueError, match="born_again: backend must be one of"):
        born_again(lambda: calls.append(1) or Net(), dl, backend="triton")
    assert calls == []
    with pytest.raises(TypeError, match="teacher= is chosen per generation"):
        born_again(lambda: Net(), dl, teacher=Net())
    with pytest.raises(ValueError, match="the training data is empty"):
        born_again(lambda: Net(), DataLoader(TensorDataset(torch.zeros(0, 12), torch.zeros(0).long())))


def test_kdfast_namespace():
    assert kdfast.train.Online is Online and kdfast.train.MODES["online"] is Online
    assert kdfast.train.MODES["self"] is SelfDistillation and kdfast.train.born_again is born_again
