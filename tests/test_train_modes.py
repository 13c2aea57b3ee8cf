"""The response and feature modes of kdfast.train (supervised, soft, hard, feature, multi_teacher):
loss values against hand-written plain-PyTorch formulas, gradients reaching only what they
should, the kdfast and reference backends agreeing, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.train import Feature, Hard, MultiTeacher, Soft, Supervised, make_mode
from tests.train_helpers import CLASSES, IN, ConvNet, Net, backward_step, data, params_of, unchanged


def _kl_t2(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), mean over rows (independent formula)."""
    log_q = F.log_softmax(s.double() / temperature, -1)
    log_p = F.log_softmax(t.double() / temperature, -1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in model.parameters()]


# -- loss values against the formulas --------------------------------------------------------


@pytest.mark.parametrize("unlabelled", [0, 3])
def test_soft_matches_hinton_formula(unlabelled):
    teacher, student = Net(32, seed=1), Net(seed=2)
    x, y = data(40, unlabelled_every=unlabelled)
    out = Soft(teacher, temperature=3.0, alpha=0.3)(student, (x, y))
    s, t = student(x), teacher(x)
    labelled = y != -100
    expected = 0.7 * _kl_t2(s, t, 3.0) + 0.3 * F.cross_entropy(s[labelled].double(), y[labelled])
    if not unlabelled:   # fused: every row has both terms; same value
        log_p, log_q = F.log_softmax(t.double() / 3, -1), F.log_softmax(s.double() / 3, -1)
        expected = (0.7 * 9 * (log_p.exp() * (log_p - log_q)).sum(-1)
                    + 0.3 * F.cross_entropy(s.double(), y, reduction="none")).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert set(out.parts) == ({"kd"} if not unlabelled else {"kd", "ce"})


def test_soft_without_labels_is_pure_kd():
    teacher, student = Net(32, seed=1), Net(seed=2)
    x, _ = data(24)
    out = Soft(teacher, temperature=2.0, alpha=0.5)(student, (x,))
    torch.testing.assert_close(out.loss.double(), _kl_t2(student(x), teacher(x), 2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_soft_other_divergences_match_kd_loss_reference(divergence):
    teacher, student = Net(32, seed=1), Net(seed=2)
    x, y = data(24)
    out = Soft(teacher, temperature=2.0, alpha=0.0, divergence=divergence, beta=0.3)(student, (x, y))
    log_q = F.log_softmax(student(x).double() / 2, -1)
    log_p = F.log_softmax(teacher(x).double() / 2, -1)
    if divergence == "reverse_kl":
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(0.3)),
                                             log_q + torch.log(torch.tensor(0.7))]), 0)
        d = 0.3 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.7 * (log_q.exp() * (log_q - log_m)).sum(-1)
    torch.testing.assert_close(out.loss.double(), 4 * d.mean(), rtol=1e-5, atol=1e-6)


def test_hard_uses_confident_teacher_argmax_and_true_labels():
    teacher, student = Net(32, seed=1), Net(seed=2)
    x, y = data(60, unlabelled_every=2)
    mode = Hard(teacher, threshold=0.4)
    out = mode(student, (x, y))
    probs = F.softmax(teacher(x), -1)
    conf, arg = probs.max(-1)
    target = torch.where(y != -100, y, torch.where(conf >= 0.4, arg, torch.full_like(arg, -100)))
    expected = F.cross_entropy(student(x).double(), target, ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts["kept"], (target != -100).float().mean())
    no_labels = Hard(teacher, threshold=0.4, use_labels=False)(student, (x, y))
    pseudo = torch.where(conf >= 0.4, arg, torch.full_like(arg, -100))
    torch.testing.assert_close(no_labels.loss.double(), F.cross_entropy(student(x).double(), pseudo),
                               rtol=1e-5, atol=1e-6)


def test_multi_teacher_fusion_formulas():
    teachers = [Net(32, seed=s) for s in (1, 3, 4)]
    student = Net(seed=2)
    x, y = data(30, unlabelled_every=4)
    s = student(x).double()
    ts = [t(x).double() for t in teachers]
    T = 2.0
    ps = torch.stack([F.softmax(t / T, -1) for t in ts])              # [K, N, C]
    log_q = F.log_softmax(s / T, -1)

    def kd(p_bar):
        return T**2 * (p_bar * (p_bar.log() - log_q)).sum(-1).mean()

    mean = MultiTeacher(teachers, combine="mean", temperature=T, alpha=0.0)(student, (x, y))
    torch.testing.assert_close(mean.loss.double(), kd(ps.mean(0)), rtol=1e-5, atol=1e-6)

    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    weighted = MultiTeacher(teachers, combine="weighted", weights=[5, 3, 2], temperature=T, alpha=0.0)
    torch.testing.assert_close(weighted(student, (x, y)).loss.double(), kd((w[:, None, None] * ps).sum(0)),
                               rtol=1e-5, atol=1e-6)

    p1 = torch.stack([F.softmax(t, -1) for t in ts])
    entropy = -(p1 * p1.log()).sum(-1)                                 # [K, N]
    ce = torch.stack([F.cross_entropy(t, y.clamp_min(0), reduction="none") for t in ts])
    for confidence, cost in (("entropy", entropy), ("label", torch.where(y != -100, ce, entropy))):
        wk = F.softmax(-cost / 0.5, 0)                                 # [K, N]
        mode = MultiTeacher(teachers, combine="confidence", confidence=confidence, tau=0.5, temperature=T,
                            alpha=0.0)
        torch.testing.assert_close(mode(student, (x, y)).loss.double(), kd((wk[..., None] * ps).sum(0)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,distance", [("hint", "mse"), ("hint", "cosine"), ("direct", "l1"),
                                           ("attention", None)])
def test_feature_matches_formula(kind, distance):
    teacher = ConvNet(8 if kind != "direct" else 4, seed=1)
    student = ConvNet(4, seed=2)
    x = torch.randn(10, 1, 8, 8)
    y = torch.randint(0, CLASSES, (10,))
    mode = Feature(teacher, ["features"], kind=kind, distance=distance or "mse", weight=0.7, soft=False)
    mode.prepare(student, (x, y))
    out = mode(student, (x, y))
    sf, tf = student.features(x).double(), teacher.features(x).double()
    if kind == "attention":
        def att(f):
            return F.normalize(f.abs().pow(2).mean(1).flatten(1), dim=1)
        feat = (att(sf) - att(tf)).pow(2).mean()
    else:
        if kind == "hint":
            sf = F.conv2d(sf, mode.adapters[0].weight.double(), mode.adapters[0].bias.double())
        u, v = sf.permute(0, 2, 3, 1), tf.permute(0, 2, 3, 1)
        feat = {"mse": F.mse_loss(u, v), "l1": F.l1_loss(u, v),          # means over elements
                "cosine": (1 - F.cosine_similarity(u, v, dim=-1)).mean()}[distance]
    expected = F.cross_entropy(student(x).double(), y) + 0.7 * feat
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-6)
    assert out.parts["feature"].item() == pytest.approx(feat.item(), rel=1e-4)


# -- gradients: the student (and the mode's own parts) only ------------------------------------


def _modes(teacher, teachers):
    return {
        "supervised": Supervised(),
        "soft": Soft(teacher, temperature=2.0, alpha=0.5),
        "hard": Hard(teacher, threshold=0.2),
        "feature": Feature(teacher, {"features": "features"}, kind="hint"),
        "multi_teacher": MultiTeacher(teachers, combine="confidence"),
    }


@pytest.mark.parametrize("name", ["supervised", "soft", "hard", "feature", "multi_teacher"])
def test_gradients_reach_the_student_and_the_mode_only(name):
    teacher = ConvNet(8, seed=1)
    others = [teacher, ConvNet(6, seed=3)]
    mode = _modes(teacher, others)[name]
    student = ConvNet(4, seed=2)
    x = torch.randn(12, 1, 8, 8)
    y = torch.randint(0, CLASSES, (12,))
    before = [params_of(t) for t in others]
    mode.prepare(student, (x, y))
    backward_step(mode, student, (x, y))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(student))
    for t, b in zip(others, before):
        assert all(g is None for g in _grads(t)) and unchanged(t, b)
        assert not t.training
    own = list(mode.trainable_parameters())
    assert len(own) == (2 if name == "feature" else 0)
    assert all(p.grad is not None for p in own)


def test_teacher_requiring_grad_is_frozen_in_place():
    teacher = Net(32, seed=1).train()
    Soft(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# -- the kdfast backend against the reference backend --------------------------------------------


@pytest.mark.parametrize("name", ["soft", "hard", "feature", "multi_teacher"])
def test_kdfast_and_reference_backends_agree(name):
    teacher = ConvNet(8, seed=1)
    teachers = [teacher, ConvNet(6, seed=3)]
    x = torch.randn(12, 1, 8, 8)
    y = torch.randint(0, CLASSES, (12,))
    y[::4] = -100
    results = []
    for backend in ("kdfast", "reference"):
        student = ConvNet(4, seed=2)
        torch.manual_seed(5)
        mode = {"soft": lambda b: Soft(teacher, alpha=0.3, backend=b),
                "hard": lambda b: Hard(teacher, threshold=0.2, backend=b),
                "feature": lambda b: Feature(teacher, ["features"], kind="attention", weight=100.0,
                                             backend=b),
                "multi_teacher": lambda b: MultiTeacher(teachers, combine="confidence", confidence="label",
                                                        backend=b)}[name](backend)
        mode.prepare(student, (x, y))
        out = backward_step(mode, student, (x, y))
        results.append((out.loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_modes_work_on_sequence_logits():
    class Seq(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = nn.Embedding(20, 8)
            self.out = nn.Linear(8, 20)

        def forward(self, ids):
            return self.out(self.emb(ids))

    teacher, student = Seq(1), Seq(2)
    ids = torch.randint(0, 20, (3, 7))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    for mode in (Soft(teacher, alpha=0.2), Hard(teacher), MultiTeacher([teacher, Seq(3)])):
        out = backward_step(mode, student, {"inputs": ids, "labels": labels})
        assert out.loss.isfinite() and out.logits.shape == (3, 7, 20)


# -- errors -----------------------------------------------------------------------------------------


def test_bad_configurations_raise_clear_errors():
    teacher = Net(32, seed=1)
    with pytest.raises(ValueError, match="unknown distillation mode 'sofft'"):
        make_mode("sofft", teacher=teacher)
    with pytest.raises(ValueError, match="'soft' mode needs a teacher"):
        Soft(None)
    with pytest.raises(ValueError, match="needs a teacher"):
        make_mode("soft")
    with pytest.raises(ValueError, match="temperature must be finite and in"):
        Soft(teacher, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        Soft(teacher, alpha=1.5)
    with pytest.raises(ValueError, match="divergence must be one of"):
        Soft(teacher, divergence="kl")
    with pytest.raises(ValueError, match="backend must be one of"):
        Soft(teacher, backend="triton")
    with pytest.raises(ValueError, match="threshold"):
        Hard(teacher, threshold=1.0)
    with pytest.raises(ValueError, match="at least two"):
        MultiTeacher([teacher])
    with pytest.raises(ValueError, match="weights, one per teacher"):
        MultiTeacher([teacher, Net(seed=3)], combine="weighted", weights=[1.0])
    with pytest.raises(ValueError, match="only with combine='weighted'"):
        MultiTeacher([teacher, Net(seed=3)], weights=[1.0, 2.0])
    with pytest.raises(TypeError, match=r"teacher must be an nn\.Module"):
        Soft("resnet50")


def test_mismatched_class_counts_name_the_teacher():
    x, y = data(8)
    with pytest.raises(ValueError, match="the teacher outputs 7 classes but the student 5"):
        Soft(Net(classes=7))(Net(), (x, y))
    with pytest.raises(ValueError, match="teacher 1 outputs 3 classes but the student 5"):
        MultiTeacher([Net(), Net(classes=3)])(Net(), (x, y))
    with pytest.raises(ValueError, match="the teacher outputs 7 classes"):
        Hard(Net(classes=7))(Net(), (x, y))


def test_missing_module_path_is_named_with_suggestions():
    teacher, student = Net(32), Net()
    with pytest.raises(ValueError, match=r"the teacher has no submodule 'bdy'; did you mean 'body'"):
        Feature(teacher, {"body": "bdy"})
    mode = Feature(teacher, {"hed": "head"})
    with pytest.raises(ValueError, match=r"the student has no submodule 'hed'; did you mean 'head'"):
        mode.prepare(student, data(4))


def test_feature_errors():
    teacher, student = ConvNet(8), ConvNet(4)
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="kind='direct' needs equal widths"):
        Feature(teacher, ["features"], kind="direct").prepare(student, (x,))
    with pytest.raises(ValueError, match="attention transfer needs"):
        Feature(Net(32), ["body"], kind="attention").prepare(Net(), data(4))
    with pytest.raises(ValueError, match="kind must be one of"):
        Feature(teacher, ["features"], kind="fitnet")
    with pytest.raises(RuntimeError, match=r"call mode\.prepare"):
        Feature(teacher, ["features"])(student, (x,))
    with pytest.raises(TypeError, match="pairs must be a mapping"):
        Feature(teacher, 3)


def test_feature_close_removes_hooks():
    teacher, student = ConvNet(8), ConvNet(4)
    x = torch.randn(4, 1, 8, 8)
    mode = Feature(teacher, ["features"])
    mode.prepare(student, (x,))
    assert student.features._forward_hooks
    mode.close()
    assert not student.features._forward_hooks and not teacher.features._forward_hooks


def test_mode_moves_teachers_but_does_not_save_them():
    teacher = Net(32)
    mode = Feature(teacher, ["body"], kind="hint")
    mode.prepare(Net(), data(4))
    assert all(not k.startswith("soft.") or "teacher" not in k for k in mode.state_dict())
    assert sorted(mode.state_dict()) == ["adapters.0.bias", "adapters.0.weight"]
    mode.double()
    assert teacher.head.weight.dtype == torch.float64


def test_kdfast_namespace():
    assert kdfast.train.Soft is Soft
    assert {"supervised", "soft", "hard", "feature", "multi_teacher"} <= set(kdfast.train.MODES)
    assert IN == 12
