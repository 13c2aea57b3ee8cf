"""The domain-adaptation modes of kdfast.train (adversarial, cross_domain) and the
gradient-reversal layer: losses against the papers' formulas written here in plain PyTorch,
the reversed gradient against an explicit computation, the teacher untouched, the two
backends agreeing, clear errors, Distiller runs on paired loaders with an identical
continuation after a resume, and two small shifted-domain problems where adaptation beats
training on the source alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.train import (
    Adversarial,
    CrossDomain,
    Distiller,
    GradientReversal,
    Soft,
    Supervised,
    grad_reverse,
    make_mode,
    paired,
)
from tests.train_helpers import IN, Net, assert_identical_runs, crash_and_resume, data, params_of, unchanged


def _kl_t2_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row ``T^2 KL(softmax(t/T) || softmax(s/T))`` (independent formula)."""
    log_q = F.log_softmax(s.double() / temperature, -1)
    log_p = F.log_softmax(t.double() / temperature, -1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def _ce(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keep = y != -100
    return F.cross_entropy(s[keep].double(), y[keep])


def _soft(s, t, y, temperature, alpha):
    """Hinton's loss on the source: (1 - alpha) T^2 KL over every row + alpha CE over the labelled."""
    return (1 - alpha) * _kl_t2_rows(s, t, temperature).mean() + alpha * _ce(s, y)


def _batch(n_s: int = 24, n_t: int = 20, unlabelled: int = 0, target_labels: bool = True):
    xs, ys = data(n_s, seed=0, unlabelled_every=unlabelled)
    xt, yt = data(n_t, seed=1)
    xt = xt + 1.0
    return {"source": (xs, ys), "target": (xt, yt) if target_labels else (xt,)}


def _adversarial(teacher, student, batch, seed=0, **kw):
    kw.setdefault("hidden", 8)
    mode = Adversarial(teacher, "body", **kw)
    torch.manual_seed(seed)                  # the discriminator's initialisation
    mode.prepare(student, batch)
    return mode


# -- the gradient-reversal layer -----------------------------------------------------------


@pytest.mark.parametrize("coeff", [0.0, 0.37, 1.0, 4.5])
def test_grad_reverse_is_minus_coeff_times_the_identity_gradient(coeff):
    x = torch.randn(6, 4, requires_grad=True)
    same = x.detach().clone().requires_grad_(True)
    w = torch.randn(4, 3)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    (torch.tanh(y @ w) ** 2).sum().backward()
    (torch.tanh(same @ w) ** 2).sum().backward()        # the identity
    assert torch.equal(x.grad, -coeff * same.grad)
    z = torch.randn(3, requires_grad=True)
    GradientReversal.apply(z, 2.0).sum().backward()
    assert torch.equal(z.grad, torch.full((3,), -2.0))


def test_grad_reverse_checks_its_coefficient():
    with pytest.raises(ValueError, match="grad_reverse: coeff must be finite and in"):
        grad_reverse(torch.ones(2), -1.0)
    with pytest.raises(TypeError, match="grad_reverse: coeff must be a real number"):
        grad_reverse(torch.ones(2), torch.tensor(1.0))


# -- Adversarial: loss, gradients, schedule ----------------------------------------------------


@pytest.mark.parametrize("unlabelled", [0, 3])
def test_adversarial_loss_matches_the_formula(unlabelled):
    teacher, student = Net(32, seed=1), Net(seed=2)
    batch = _batch(unlabelled=unlabelled)
    mode = _adversarial(teacher, student, batch, domain_weight=0.7, target_kd_weight=0.4, temperature=3.0,
                        alpha=0.3, total_steps=20)
    mode.steps.fill_(5)
    out = mode(student, batch)
    (xs, ys), (xt, yt) = batch["source"], batch["target"]
    s_s, s_t = student(xs), student(xt)
    t_s, t_t = teacher(xs), teacher(xt)
    d = mode.discriminator(torch.cat([student.body(xs), student.body(xt)])).squeeze(-1)
    domains = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))])
    domain = F.binary_cross_entropy_with_logits(d.double(), domains.double())
    expected = (_soft(s_s, t_s, ys, 3.0, 0.3) + 0.4 * _kl_t2_rows(s_t, t_t, 3.0).mean() + 0.7 * domain)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    parts = {k: v.double() for k, v in out.parts.items()}
    torch.testing.assert_close(parts["kd"], _kl_t2_rows(s_s, t_s, 3.0).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"], _ce(s_s, ys), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["target_kd"], _kl_t2_rows(s_t, t_t, 3.0).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["domain"], domain, rtol=1e-5, atol=1e-6)
    assert parts["domain_acc"].item() == ((d > 0).float() == domains).float().mean().item()
    assert parts["grl"].item() == pytest.approx(2 / (1 + math.exp(-10 * 5 / 20)) - 1)
    torch.testing.assert_close(out.logits, s_t)
    assert out.labels is yt


def test_adversarial_gradients_reach_the_discriminator_and_the_reversed_features():
    teacher, student = Net(32, seed=1), Net(seed=2)
    batch = _batch(unlabelled=4)
    mode = _adversarial(teacher, student, batch, domain_weight=0.7, grl_lambda=0.6, alpha=0.2,
                        target_kd_weight=0.5, temperature=2.0)
    before = params_of(teacher)
    mode(student, batch).loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    got_disc = [p.grad.clone() for p in mode.discriminator.parameters()]
    assert unchanged(teacher, before) and all(p.grad is None for p in teacher.parameters())
    # by hand: the task loss and the domain loss without any reversal, then combined
    (xs, ys), (xt, _) = batch["source"], batch["target"]
    task = (_soft(student(xs), teacher(xs), ys, 2.0, 0.2)
            + 0.5 * _kl_t2_rows(student(xt), teacher(xt), 2.0).mean())
    d = mode.discriminator(torch.cat([student.body(xs), student.body(xt)])).squeeze(-1)
    domain = F.binary_cross_entropy_with_logits(d, torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))]))
    names, params = zip(*student.named_parameters())
    g_task = torch.autograd.grad(task, params)
    g_dom = torch.autograd.grad(domain, params + tuple(mode.discriminator.parameters()), allow_unused=True)
    for name, gt, gd in zip(names, g_task, g_dom):
        if name.startswith("body."):     # before the features: the reversed domain gradient
            expected = gt.float() - 0.6 * 0.7 * gd
            assert gd.abs().max() > 1e-3
        else:                            # after them: no domain gradient
            expected = gt.float()
            assert gd is None
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6)
    for g, gd in zip(got_disc, g_dom[len(params):]):
        torch.testing.assert_close(g, 0.7 * gd, rtol=1e-5, atol=1e-7)


def test_reversal_schedule_and_its_counter():
    mode = Adversarial(Net(32), "body", total_steps=100, grl_lambda=0.5)
    lam = [mode.grl_coefficient(t) for t in (0, 50, 100, 300)]
    assert lam == pytest.approx([0.0, 0.5 * (2 / (1 + math.exp(-5)) - 1), 0.5 * (2 / (1 + math.exp(-10)) - 1),
                                 0.5 * (2 / (1 + math.exp(-10)) - 1)])
    for _ in range(50):
        mode.end_step(Net())
    assert int(mode.steps) == 50 and mode.grl_coefficient() == lam[1]
    assert Adversarial(Net(32), "body", grl_lambda=0.3).grl_coefficient(1000) == 0.3
    assert Adversarial(Net(32), "body", gamma=2.0, total_steps=10).grl_coefficient(5) == pytest.approx(
        2 / (1 + math.exp(-1)) - 1)


def test_a_user_discriminator_and_whole_model_features():
    teacher, student = Net(32, seed=1), Net(seed=2)
    disc = nn.Sequential(nn.Linear(5, 1))
    mode = Adversarial(teacher, "", discriminator=disc, target_kd_weight=0.0)   # features = the logits
    batch = _batch()
    out = mode(student, batch)                  # no prepare needed with a given discriminator
    (xs, ys), (xt, _) = batch["source"], batch["target"]
    d = disc(torch.cat([student(xs), student(xt)])).squeeze(-1)
    domains = torch.cat([torch.zeros(24), torch.ones(20)]).double()
    domain = F.binary_cross_entropy_with_logits(d.double(), domains)
    expected = _soft(student(xs), teacher(xs), ys, 4.0, 0.1) + domain
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert "target_kd" not in out.parts and list(mode.trainable_parameters()) == list(disc.parameters())


@pytest.mark.parametrize("name", ["adversarial", "cross_domain"])
def test_backends_agree(name):
    batch = _batch(unlabelled=3)
    results = []
    for backend in ("kdfast", "reference"):
        teacher, student = Net(32, seed=1), Net(seed=2)
        if name == "adversarial":
            mode = _adversarial(teacher, student, batch, backend=backend, temperature=3.0, alpha=0.4)
        else:
            mode = CrossDomain(teacher, backend=backend, temperature=3.0, alpha=0.4, source_weight=0.5)
        out = mode(student, batch)
        out.loss.backward()
        grads = [p.grad for p in list(student.parameters()) + list(mode.parameters())]
        results.append((out.loss.detach(), grads))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert len(ga) == len(gb) == (8 if name == "adversarial" else 4)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- CrossDomain -----------------------------------------------------------------------------


def test_cross_domain_target_only_is_kd_and_never_reads_target_labels():
    teacher = Net(32, seed=1)
    xt, yt = data(30, seed=1)
    xt = xt + 1.0
    runs = []
    for target in [(xt, yt), (xt, torch.randint(0, 5, (30,))), (xt, torch.full((30,), -100)), (xt,), xt,
                   {"inputs": xt, "labels": yt}, {"target": (xt, yt)}]:
        student = Net(seed=2)
        out = CrossDomain(teacher, temperature=2.0)(student, target)
        out.loss.backward()
        runs.append((out.loss.detach(), [p.grad for p in student.parameters()]))
        assert set(out.parts) == {"target_kd"}
    student = Net(seed=2)
    torch.testing.assert_close(runs[0][0].double(), _kl_t2_rows(student(xt), teacher(xt), 2.0).mean(),
                               rtol=1e-5, atol=1e-6)
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_cross_domain_with_a_source_part_matches_the_formula():
    teacher, student = Net(32, seed=1), Net(seed=2)
    before = params_of(teacher)
    batch = _batch(unlabelled=3)
    out = CrossDomain(teacher, temperature=3.0, source_weight=0.6, alpha=0.25)(student, batch)
    out.loss.backward()
    (xs, ys), (xt, yt) = batch["source"], batch["target"]
    kd_t = _kl_t2_rows(student(xt), teacher(xt), 3.0).mean()
    expected = kd_t + 0.6 * _soft(student(xs), teacher(xs), ys, 3.0, 0.25)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts["target_kd"].double(), kd_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts["ce"].double(), _ce(student(xs), ys), rtol=1e-5, atol=1e-6)
    assert out.labels is yt and out.logits.shape == (20, 5)
    assert unchanged(teacher, before) and all(p.grad is None for p in teacher.parameters())
    ignored = CrossDomain(teacher, temperature=3.0, source_weight=0.0)(student, batch)
    torch.testing.assert_close(ignored.loss.double(), kd_t, rtol=1e-5, atol=1e-6)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, err, match", [
    ({"feature_path": 3}, TypeError, "feature_path must be a str"),
    ({"discriminator": "mlp"}, TypeError, "discriminator must be an nn.Module"),
    ({"hidden": 0}, ValueError, "hidden must be an int >= 1"),
    ({"domain_weight": -1.0}, ValueError, "domain_weight must be"),
    ({"target_kd_weight": -0.5}, ValueError, "target_kd_weight must be"),
    ({"temperature": 0.0}, ValueError, "temperature must be"),
    ({"alpha": 1.5}, ValueError, "alpha must be"),
    ({"grl_lambda": float("nan")}, ValueError, "grl_lambda must be"),
    ({"gamma": 0.0}, ValueError, "gamma must be"),
    ({"total_steps": 0}, ValueError, "total_steps must be an int >= 1 or None"),
])
def test_adversarial_bad_options_raise(kw, err, match):
    kw.setdefault("feature_path", "body")
    with pytest.raises(err, match=f"Adversarial: {match}"):
        Adversarial(Net(32), **kw)


@pytest.mark.parametrize("kw, match", [
    ({"source_weight": -1.0}, "source_weight must be"),
    ({"alpha": -0.1}, "alpha must be"),
    ({"temperature": -2.0}, "temperature must be"),
])
def test_cross_domain_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=f"CrossDomain: {match}"):
        CrossDomain(Net(32), **kw)


def test_bad_batches_and_paths_raise_clear_errors():
    teacher, student = Net(32, seed=1), Net(seed=2)
    batch = _batch()
    mode = Adversarial(teacher, "body")
    with pytest.raises(ValueError, match=r"Adversarial: a batch must be a mapping \{'source'.*got tuple"):
        mode.prepare(student, batch["source"])
    with pytest.raises(ValueError, match="got dict with keys \\['inputs', 'labels'\\]"):
        mode(student, {"inputs": batch["source"][0], "labels": batch["source"][1]})
    with pytest.raises(ValueError, match="Adversarial: the batch has no 'target' key"):
        mode.prepare(student, {"source": batch["source"]})
    with pytest.raises(ValueError, match="Adversarial: the batch has no 'source' key"):
        mode(student, {"target": batch["target"]})
    with pytest.raises(ValueError, match="CrossDomain: the batch has no 'target' key"):
        CrossDomain(teacher)(student, {"source": batch["source"]})
    with pytest.raises(ValueError, match=r"\(feature_path\) has no submodule 'bdy'; did you mean 'body'"):
        Adversarial(teacher, "bdy").prepare(student, batch)
    with pytest.raises(RuntimeError, match="the discriminator does not exist yet"):
        Adversarial(teacher, "body")(student, batch)
    with pytest.raises(ValueError, match="must map \\[N, D\\] features to \\[N, 1\\] or \\[N\\]"):
        Adversarial(teacher, "body", discriminator=nn.Linear(16, 2)).prepare(student, batch)
    with pytest.raises(ValueError, match="the teacher outputs 3 classes but the student 5"):
        Adversarial(nn.Linear(IN, 3), "body").prepare(student, batch)
    with pytest.raises(ValueError, match="CrossDomain: the teacher outputs 3 classes"):
        CrossDomain(nn.Linear(IN, 3))(student, batch)
    mode = make_mode("adversarial", teacher=teacher, feature_path="body", hidden=4)
    mode.prepare(student, batch)
    assert mode.discriminator[0].in_features == 16 and mode.discriminator[0].out_features == 4
    mode.close()
    assert make_mode("cross_domain", teachers=teacher).teacher is teacher


# -- through the Distiller -------------------------------------------------------------------


def _loaders(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, IN, generator=g)
    ys = torch.randint(0, 5, (n,), generator=g)
    xt = torch.randn(48, IN, generator=g) + 1.0
    src = DataLoader(TensorDataset(xs, ys), batch_size=8, shuffle=True)
    tgt = DataLoader(TensorDataset(xt), batch_size=8, shuffle=True)
    return src, tgt


@pytest.mark.parametrize("name", ["adversarial", "cross_domain"])
def test_fit_on_paired_loaders_lowers_the_distillation_loss(name):
    teacher = Net(32, seed=1)
    before = params_of(teacher)
    torch.manual_seed(0)
    mode = (Adversarial(teacher, "body", hidden=16, total_steps=48) if name == "adversarial"
            else CrossDomain(teacher, temperature=2.0))
    d = Distiller(Net(seed=2), mode, lr=1e-2, epochs=8, log_every=1, progress=False)
    src, tgt = _loaders()
    result = d.fit(paired(src, tgt), eval_data=DataLoader(TensorDataset(*data(32, seed=3)), batch_size=16))
    kd = [h["kd"] + h["target_kd"] for h in result.history if "kd" in h]
    assert sum(kd[-6:]) < 0.7 * sum(kd[:6])
    assert unchanged(teacher, before) and all(p.grad is None for p in teacher.parameters())
    assert result.steps == 48 and "agreement" in result.metrics
    if name == "adversarial":
        assert int(d.mode.steps) == 48
        assert {"domain", "domain_acc", "grl"} <= set(next(h for h in result.history if "loss" in h))
        assert all(a is b for a, b in zip(d.parameters()[-4:], d.mode.discriminator.parameters()))


@pytest.mark.parametrize("name", ["adversarial", "cross_domain"])
def test_resume_on_paired_loaders_gives_an_identical_continuation(tmp_path, name):
    teacher = Net(32, seed=1)

    def run(folder, callbacks=(), resume=None):
        torch.manual_seed(123)
        mode = (Adversarial(teacher, "body", hidden=8, total_steps=12) if name == "adversarial"
                else CrossDomain(teacher, alpha=0.5))
        d = Distiller(Net(seed=2), mode, lr=1e-2, epochs=2, checkpoint_dir=folder, save_every=1,
                      log_every=1, callbacks=callbacks, progress=False)
        src, tgt = _loaders(n=40)
        d.fit(paired(src, tgt), resume=resume)
        return d

    straight, resumed = crash_and_resume(tmp_path, run, 4)
    assert straight.step == 12
    assert len(straight.mode.state_dict()) == (5 if name == "adversarial" else 0)
    assert_identical_runs(straight, resumed)


# -- shifted domains: adaptation beats source-only training ------------------------------------
#
# These run the mode contract by hand (prepare, forward, backward, step, end_step) on one
# thread: the models are tiny, and a second thread only adds contention.


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _ReadsFirstCoordinate(nn.Module):
    """A teacher that looks at the first input coordinate only (the domain-invariant one)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, :1])


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def _trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _fit(mode, batches, steps: int, lr: float, seed: int) -> nn.Module:
    """A fresh student trained with ``mode`` on ``batches(step)`` for ``steps`` Adam steps."""
    torch.manual_seed(seed)
    student = _Mlp()
    mode.prepare(student, batches(-1))
    opt = torch.optim.Adam(list(student.parameters()) + list(mode.trainable_parameters()), lr)
    for step in range(steps):
        opt.zero_grad()
        mode(student, batches(step)).loss.backward()
        opt.step()
        mode.end_step(student)
    return student


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_domain_follows_the_teacher_where_source_training_fails(one_thread, seed):
    """Source: x1 = 3 x0 (+ noise), a copy of the class signal x0; target: x1 is shifted
    noise. A teacher reading x0 transfers; a student trained on source labels, or distilled
    on source inputs, leans on x1 and drops to chance on the target; distilled on (unlabelled)
    target inputs, it matches the teacher there. (Measured over seeds 0-9: the adapted student
    0.82-0.86, the teacher the same, source-only 0.48-0.59.)"""
    g = torch.Generator().manual_seed(seed)

    def domain(n, target):
        y = torch.randint(0, 2, (n,), generator=g)
        x0 = (2.0 * y - 1) + torch.randn(n, generator=g)
        noise = torch.randn(n, generator=g)
        x1 = 3.0 * (1.0 + noise) if target else 3.0 * x0 + 0.1 * noise
        return torch.stack([x0, x1], 1), y

    (xs, ys), (xt, _), (xe, ye) = domain(512, False), domain(512, True), domain(1000, True)
    torch.manual_seed(seed)
    teacher = _trained(_ReadsFirstCoordinate(), xs, ys)
    supervised = _fit(Supervised(), lambda step: (xs, ys), 100, 1e-2, seed)
    soft_source = _fit(Soft(teacher, temperature=2.0), lambda step: (xs, ys), 100, 1e-2, seed)
    adapted = _fit(CrossDomain(teacher, temperature=2.0), lambda step: (xt,), 100, 1e-2, seed)
    acc_teacher, acc_adapted = _accuracy(teacher, xe, ye), _accuracy(adapted, xe, ye)
    assert acc_teacher > 0.8
    assert acc_adapted > acc_teacher - 0.03
    assert acc_adapted > _accuracy(supervised, xe, ye) + 0.15
    assert acc_adapted > _accuracy(soft_source, xe, ye) + 0.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adversarial_alignment_beats_source_training_on_shifted_blobs(one_thread, seed):
    """Two Gaussian classes at -(1, 1) and (1, 1); the target is shifted by (0, 3). A
    source-trained student puts much of the target on the wrong side; the domain
    discriminator behind the gradient reversal takes the shift direction out of the
    features. Source cross-entropy only (alpha=1) and no target distillation: the
    teacher, trained on the source, is as wrong on the target as the source-only student.
    (Measured with this code over seeds 0-9: source-only 0.54-0.65, adversarial 0.71-0.91,
    at least 0.13 above source-only on every seed. With alpha=0.5, half distillation
    from that teacher, adversarial is also above source-only on every seed, but by 0.04 to
    0.28 only, too little to test.)"""
    g = torch.Generator().manual_seed(seed)

    def domain(n, target):
        y = torch.randint(0, 2, (n,), generator=g)
        x = (2.0 * y - 1)[:, None] * torch.ones(2) + 0.7 * torch.randn(n, 2, generator=g)
        return (x + torch.tensor([0.0, 3.0]) if target else x), y

    (xs, ys), (xt, _), (xe, ye) = domain(512, False), domain(512, True), domain(1000, True)
    torch.manual_seed(seed)
    teacher = _trained(_Mlp(), xs, ys)

    def source(step):
        i = torch.randint(0, 512, (64,))
        return xs[i], ys[i]

    def both(step):
        j = torch.randint(0, 512, (64,))
        return {"source": source(step), "target": (xt[j],)}

    supervised = _fit(Supervised(), source, 160, 3e-3, seed)
    mode = Adversarial(teacher, "body", hidden=32, domain_weight=10.0, alpha=1.0, target_kd_weight=0.0,
                       total_steps=160)
    adapted = _fit(mode, both, 160, 3e-3, seed)
    assert _accuracy(adapted, xe, ye) > _accuracy(supervised, xe, ye) + 0.08
