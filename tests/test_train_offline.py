"""kdfast.train.Offline: students trained from a teacher cache (top-k, sampled and dense
storage) without running the teacher; the loss against the live-teacher Soft mode and
against hand-written formulas, both backends, cached features, resume, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import kdfast
from kdfast.cache import CachedDataset, Dense, Feature, Sampled, TeacherCache, TopK
from kdfast.train import Distiller, Offline, Soft, make_mode
from tests.cache_helpers import TinyLM, pad_collate, token_dataset
from tests.train_helpers import CLASSES, Net, backward_step, data, params_of, unchanged

T = 2.0
STORAGES = {"topk": TopK(k=3, dtype=torch.float32), "topk_full": TopK(k=CLASSES, dtype=torch.float32),
            "sampled": Sampled(num_samples=16), "dense": Dense(dtype=torch.float32)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher, its data (some rows unlabelled) and one cache per storage (with the
    teacher's ``body`` output as a per-sample feature)."""
    teacher = Net(32, seed=1)
    x, y = data(96, unlabelled_every=5)
    dataset = TensorDataset(x, y)
    root = tmp_path_factory.mktemp("caches")
    caches = {name: TeacherCache.build(root / name, teacher, dataset, storage=storage, temperature=T,
                                       features={"hidden": Feature(module="body", dtype=torch.float32)},
                                       batch_size=32, progress=False, fsync=False)
              for name, storage in STORAGES.items()}
    return teacher, dataset, caches


def _batch(setup, name, n=24):
    _, dataset, caches = setup
    ds = CachedDataset(dataset, caches[name])
    return ds.collate([ds[i] for i in range(n)])


# -- the loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("name,tail", [("dense", "renormalize"), ("topk_full", "renormalize"),
                                       ("topk_full", "residual")])
def test_equals_the_soft_mode_with_the_live_teacher(setup, name, tail, alpha):
    """Dense logits, or top-k with k = V, give the Soft loss of the live teacher (labelled
    and partly unlabelled batches), with the same gradients."""
    teacher = setup[0]
    x, y, tb = _batch(setup, name)
    for labels in (y.clamp_min(0), y):         # every row labelled (one fused call); some not
        student = Net(seed=2)
        offline = backward_step(Offline(alpha=alpha, tail=tail), student, (x, labels, tb))
        g_offline = [p.grad.clone() for p in student.parameters()]
        soft = backward_step(Soft(teacher, temperature=T, alpha=alpha), student, (x, labels))
        torch.testing.assert_close(offline.loss, soft.loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_offline, (p.grad for p in student.parameters())):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert set(offline.parts) == set(soft.parts)


def test_dense_cache_at_another_temperature_equals_soft(setup):
    teacher = setup[0]
    x, y, tb = _batch(setup, "dense")
    student = Net(seed=2)
    out = Offline(temperature=3.0, alpha=0.2)(student, (x, y, tb))
    expected = Soft(teacher, temperature=3.0, alpha=0.2)(student, (x, y)).loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,tail", [("topk", "renormalize"), ("topk", "residual"),
                                       ("sampled", "renormalize")])
def test_sparse_cache_loss_matches_the_formula(setup, name, tail):
    """Top-k (k=3 of 5) and sampled storage against the sparse KD formulas written here,
    with the teacher's distribution computed live."""
    teacher = setup[0]
    x, y, tb = _batch(setup, name)
    student = Net(seed=2)
    out = Offline(alpha=0.25, tail=tail)(student, (x, y, tb))
    s = student(x).double()
    log_q = F.log_softmax(s / T, -1)
    p_full = F.softmax(teacher(x).double() / T, -1)
    if name == "topk":
        idx = p_full.topk(3, -1).indices
        torch.testing.assert_close(tb.indices, idx)
        p = p_full.gather(1, idx)
    else:
        idx = tb.indices.clamp_min(0)
        p = torch.where(tb.indices >= 0, tb.values.double(), 0.0)
        torch.testing.assert_close(p.sum(-1), torch.ones(len(x), dtype=torch.float64))
    lq = log_q.gather(1, idx)
    if tail == "renormalize":
        p_hat = p / p.sum(-1, keepdim=True)
        d = torch.where(p_hat > 0, p_hat * (p_hat.log() - lq), 0.0).sum(-1)
    else:
        r_t = 1 - p.sum(-1)
        r_s = 1 - lq.exp().sum(-1)
        d = (p * (p.log() - lq)).sum(-1) + r_t * (r_t.log() - r_s.log())
    labelled = y != -100
    expected = 0.75 * T**2 * d.mean() + 0.25 * F.cross_entropy(s[labelled], y[labelled])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert set(out.parts) == {"kd", "ce"}


@pytest.mark.parametrize("name", ["topk", "sampled", "dense"])
def test_kdfast_and_reference_backends_agree(setup, name):
    x, y, tb = _batch(setup, name)
    results = []
    for backend in ("kdfast", "reference"):
        student = Net(seed=2)
        mode = Offline(alpha=0.3, tail="residual", feature_pairs={"body": "hidden"}, backend=backend)
        torch.manual_seed(4)
        mode.prepare(student, (x, y, tb))
        out = backward_step(mode, student, (x, y, tb))
        results.append((out.loss.detach(), [p.grad.clone() for p in student.parameters()],
                        [p.grad.clone() for p in mode.parameters()]))
    (l1, g1, a1), (l2, g2, a2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1 + a1, g2 + a2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("matching", ["hint", "direct"])
def test_cached_features_match_the_formula(setup, matching):
    """FitNets hint from the cached ``body`` output (width 32) to a student module."""
    teacher = setup[0]
    x, y, tb = _batch(setup, "topk")
    torch.testing.assert_close(tb.features["hidden"], teacher.body(x))
    student = Net(32 if matching == "direct" else 16, seed=2)
    mode = Offline(alpha=0.0, feature_pairs={"body": "hidden"}, feature_matching=matching, distance="mse",
                   feature_weight=0.7)
    mode.prepare(student, (x, y, tb))
    out = mode(student, (x, y, tb))
    h = student.body(x).double()
    if matching == "hint":
        h = F.linear(h, mode.adapters[0].weight.double(), mode.adapters[0].bias.double())
    else:
        assert len(mode.adapters) == 0
    feat = F.mse_loss(h, teacher.body(x).double())
    kd = Offline(alpha=0.0)(student, (x, y, tb)).loss
    torch.testing.assert_close(out.loss.double(), kd.double() + 0.7 * feat, rtol=1e-5, atol=1e-6)
    assert out.parts["feature"].item() == pytest.approx(feat.item(), rel=1e-5)


def test_token_layout_with_padding_and_per_token_features(tmp_path):
    """Variable-length sequences: the padded rows count in neither term; the loss equals
    the Soft loss on the packed rows, the per-token feature term the MSE on them."""
    teacher = TinyLM(vocab=20, hidden=8, seed=1)
    items = token_dataset(12, max_len=6, vocab=20, seed=3)
    for it in items[::4]:
        it["labels"][0] = -100                                  # some real rows unlabelled
    loader = DataLoader(items, batch_size=4, collate_fn=pad_collate)
    cache = TeacherCache.build(tmp_path / "c", teacher, loader, storage=Dense(dtype=torch.float32),
                               temperature=T, progress=False, fsync=False,
                               features={"h": Feature(per_token=True, module="body", dtype=torch.float32)})
    ds = CachedDataset(items, cache)
    inputs, labels, tb = ds.collate([ds[i] for i in range(12)])
    mask = tb.mask
    assert not mask.all() and tb.token_features == ("h",) and tb.vocab_size == 20
    student = TinyLM(vocab=20, hidden=8, seed=2)
    mode = Offline(alpha=0.4, feature_pairs={"body": "h"}, feature_matching="direct", feature_weight=0.5)
    mode.prepare(student, (inputs, labels, tb))
    out = mode(student, (inputs, labels, tb))
    s, t = student(**inputs), teacher(**inputs)
    soft = Soft(teacher, temperature=T, alpha=0.4).loss_from_logits(s[mask], t[mask], labels[mask])[0]
    feat = F.mse_loss(student.body(student.embed(inputs["input_ids"]))[mask],
                      teacher.body(teacher.embed(inputs["input_ids"]))[mask])
    torch.testing.assert_close(out.loss, soft + 0.5 * feat, rtol=1e-5, atol=1e-6)


# -- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk", "sampled", "dense"])
def test_fit_lowers_the_loss_without_calling_the_teacher(setup, name):
    teacher, dataset, caches = setup
    calls = []
    hook = teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    before = params_of(teacher)
    try:
        torch.manual_seed(0)
        loader = CachedDataset(dataset, caches[name]).loader(batch_size=16, shuffle=True)
        mode = Offline(alpha=0.1, tail="residual")
        result = Distiller(Net(seed=2), mode, epochs=6, lr=1e-2, log_every=1, progress=False).fit(
            loader, eval_data=DataLoader(dataset, batch_size=48))
    finally:
        hook.remove()
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    assert not calls and unchanged(teacher, before)
    assert mode.eval_teacher() is None and "agreement" not in result.metrics
    assert result.steps == 6 * 6


def test_gradients_reach_the_student_and_the_regressor_only(setup):
    teacher = setup[0]
    x, y, tb = _batch(setup, "topk")
    student = Net(seed=2)
    mode = Offline(feature_pairs={"body": "hidden"})
    mode.prepare(student, (x, y, tb))
    backward_step(mode, student, (x, y, tb))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    own = list(mode.trainable_parameters())
    assert len(own) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert all(p.grad is None for p in teacher.parameters())
    assert not tb.values.requires_grad and tb.features["hidden"].grad is None


def test_resume_gives_an_identical_continuation(setup, tmp_path):
    """The hint regressor is the mode's state: a run stopped after 5 steps and resumed
    ends where a straight run does."""
    _, dataset, caches = setup

    def run(folder, max_steps=None, resume=None):
        torch.manual_seed(11)
        loader = CachedDataset(dataset, caches["sampled"]).loader(
            batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
        mode = Offline(alpha=0.2, feature_pairs={"body": "hidden"})
        d = Distiller(Net(seed=2), mode, epochs=2, max_steps=max_steps, lr=1e-2, checkpoint_dir=folder,
                      progress=False)
        d.fit(loader, resume=resume)
        return d

    a = run(tmp_path / "a")
    b = run(tmp_path / "b", max_steps=5)
    assert b.step == 5
    b = run(tmp_path / "b", resume=True)
    assert a.step == b.step == 12
    for p, q in zip(list(a.student.parameters()) + list(a.mode.parameters()),
                    list(b.student.parameters()) + list(b.mode.parameters())):
        assert torch.equal(p, q)


# -- errors -----------------------------------------------------------------------------------------


def test_errors(setup):
    x, y, tb = _batch(setup, "topk", 8)
    student = Net(seed=2)
    with pytest.raises(TypeError, match=r"a batch must be \(inputs, labels, TeacherBatch\).*CachedDataset"):
        Offline()(student, (x, y))
    with pytest.raises(TypeError, match=r"got a tuple of \(Tensor, Tensor\)"):
        Offline().prepare(student, (x, y))
    with pytest.raises(ValueError, match="over 5 classes but the student outputs 7"):
        Offline()(Net(classes=7), (x, y, tb))
    with pytest.raises(ValueError, match="over 5 classes but the student outputs 7"):
        Offline()(Net(classes=7), _batch(setup, "dense", 8))
    with pytest.raises(ValueError, match=r"temperature=3\.0 but the cache stores the teacher's logprobs at"):
        Offline(temperature=3.0)(student, (x, y, tb))
    with pytest.raises(ValueError, match=r"no feature 'pooled' \(its features: \['hidden'\]\)"):
        Offline(feature_pairs={"body": "pooled"}).prepare(student, (x, y, tb))
    with pytest.raises(ValueError, match="feature_matching='direct' needs equal widths"):
        Offline(feature_pairs={"body": "hidden"}, feature_matching="direct").prepare(student, (x, y, tb))
    with pytest.raises(ValueError, match="the student has no submodule 'bdy'; did you mean 'body'"):
        Offline(feature_pairs={"bdy": "hidden"}).prepare(student, (x, y, tb))
    with pytest.raises(RuntimeError, match=r"call mode\.prepare"):
        Offline(feature_pairs={"body": "hidden"})(student, (x, y, tb))
    with pytest.raises(ValueError, match="alpha must be finite and in"):
        Offline(alpha=1.5)
    with pytest.raises(ValueError, match="tail must be one of"):
        Offline(tail="drop")
    with pytest.raises(ValueError, match="temperature must be finite and in"):
        Offline(temperature=0.0)
    with pytest.raises(ValueError, match="feature_matching must be one of"):
        Offline(feature_pairs={"body": "hidden"}, feature_matching="attention")
    with pytest.raises(TypeError, match="teacher"):
        make_mode("offline", teacher=Net())


def test_registered():
    assert kdfast.train.MODES["offline"] is Offline and kdfast.train.Offline is Offline
    assert isinstance(make_mode("offline", alpha=0.2), Offline)
    assert not Offline.needs_teacher and Offline().teachers == []
