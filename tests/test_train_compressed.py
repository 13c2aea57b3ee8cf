"""kdfast.train.Compressed: distillation into a pruned and/or quantization-aware-trained
student: exact sparsity (one-shot and the gradual cubic schedule), masks that hold through
training and checkpoints, the Soft loss of the frozen teacher, int8 conversion, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdfast
from kdfast.train import Compressed, Distiller, Soft, make_mode, sparsity_of
from tests.train_helpers import CLASSES, IN, ConvNet, Net, data, params_of, unchanged

pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.ao.quantization is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*reduce_range will be deprecated.*:UserWarning")]


@pytest.fixture(autouse=True)
def _restore_quantized_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _masks(student):
    return [m.weight_mask for m in student.modules() if hasattr(m, "weight_mask")]


def _zeros(student):
    return sum(int((mk == 0).sum()) for mk in _masks(student))


def _weights(student):
    return sum(mk.numel() for mk in _masks(student))


def _kd_formula(s, t, y, temperature, alpha):
    """(1 - alpha) T^2 KL(softmax(t/T) || softmax(s/T)) + alpha CE, mean over rows."""
    log_q = F.log_softmax(s.double() / temperature, -1)
    log_p = F.log_softmax(t.double() / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = F.cross_entropy(s.double(), y, reduction="none")
    return ((1 - alpha) * temperature**2 * kl + alpha * ce).mean()


def _task(n=192, seed=0):
    """A task the teacher defines (its argmax as the label), so a student can learn it."""
    teacher = Net(32, seed=1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    return teacher, x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


# -- pruning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_student,sparsity", [(lambda: Net(seed=2), 0.5), (lambda: Net(seed=2), 0.83),
                                                   (lambda: ConvNet(4, seed=2), 0.7)])
def test_oneshot_reaches_the_sparsity_exactly_on_the_smallest_weights(make_student, sparsity):
    student = make_student()
    layers = [m for m in student.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    before = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    x = torch.randn(8, 1, 8, 8) if isinstance(student, ConvNet) else torch.randn(8, IN)
    mode = Compressed(make_student(), sparsity=sparsity)
    mode.prepare(student, (x,))
    n = before.numel()
    k = math.floor(sparsity * n + 0.5)
    assert _weights(student) == n and _zeros(student) == k
    assert sparsity_of(student) == k / n
    pruned = torch.cat([(m.weight_mask == 0).flatten() for m in layers])
    assert before[pruned].max() <= before[~pruned].min()          # global: across layers
    assert all(torch.equal(m.weight, m.weight_orig * m.weight_mask) for m in layers)
    mode.prepare(student, (x,))                                      # prepared once only
    assert _zeros(student) == k and not any(hasattr(m, "weight_orig_orig") for m in layers)


def test_gradual_follows_the_cubic_schedule():
    student = Net(seed=2)
    mode = Compressed(Net(32, seed=1), sparsity=0.8, prune_schedule="gradual", prune_steps=6, prune_every=2)
    mode.prepare(student, data(8))
    n = _weights(student)
    assert _zeros(student) == 0
    seen = []
    for _ in range(1, 10):
        mode.end_step(student)
        seen.append(_zeros(student))
    expected, last = [], 0
    for t in range(1, 10):
        if t <= 6 and (t % 2 == 0 or t == 6):
            last = math.floor(0.8 * (1 - (1 - t / 6) ** 3) * n + 0.5)
        expected.append(last)
    assert seen == expected and seen[-1] == math.floor(0.8 * n + 0.5)
    assert int(mode.steps) == 9
    assert mode.target_sparsity(3) == pytest.approx(0.8 * (1 - 0.5**3))


def test_masked_weights_stay_zero_and_the_teacher_frozen_through_training():
    teacher, x, y = _task()
    student = Net(seed=2)
    before = params_of(teacher)
    mode = Compressed(teacher, sparsity=0.6, prune_schedule="gradual", prune_steps=8, temperature=2.0)
    masks = []

    def keep_masks(event, distiller, logs):
        masks.append([mk.clone() for mk in _masks(distiller.student)])

    d = Distiller(student, mode, epochs=3, lr=1e-2, progress=False, log_every=1, callbacks=[keep_masks])
    torch.manual_seed(0)
    result = d.fit(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    assert result.steps == 18
    for earlier, later in zip(masks, masks[1:]):                    # masks only grow
        assert all(bool((b <= a).all()) for a, b in zip(earlier, later))
    assert _zeros(student) == math.floor(0.6 * _weights(student) + 0.5)
    for m in student.modules():
        if hasattr(m, "weight_mask"):
            assert bool((m.weight[m.weight_mask == 0] == 0).all())
            assert m.weight_orig.requires_grad and not m.weight_mask.requires_grad
    assert unchanged(teacher, before) and all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


def test_exclude_keeps_layers_dense():
    student = Net(seed=2)
    mode = Compressed(Net(32, seed=1), sparsity=0.5, exclude=["head"])
    mode.prepare(student, data(8))
    assert not hasattr(student.head, "weight_mask") and bool((student.head.weight != 0).all())
    body = student.body[0]
    assert int((body.weight_mask == 0).sum()) == body.weight.numel() // 2


# -- the loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "qat"])
def test_loss_equals_soft_and_the_formula_on_the_compressed_student(quantize):
    teacher, x, y = _task(40)
    student = Net(seed=2)
    mode = Compressed(teacher, sparsity=0.5, quantize=quantize, temperature=3.0, alpha=0.3)
    mode.prepare(student, (x, y))
    if quantize:
        mode(student, (x, y))                  # calibrate the ranges once, then freeze them
        student.apply(torch.ao.quantization.disable_observer)
        mode.stubs.apply(torch.ao.quantization.disable_observer)
    out = mode(student, (x, y))
    s = mode.logits(student, x)
    if quantize:
        plain = student(x)                     # the fake-quantized layers without the input stub
        assert not torch.equal(s, plain)
    else:
        torch.testing.assert_close(out.loss, Soft(teacher, temperature=3.0, alpha=0.3)(student, (x, y)).loss)
    expected = _kd_formula(s, teacher(x), y, 3.0, 0.3)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_unmasked_student_weights_only():
    teacher, x, y = _task(40)
    student = Net(seed=2)
    mode = Compressed(teacher, sparsity=0.5, quantize="qat")
    mode.prepare(student, (x, y))
    mode(student, (x, y)).loss.backward()
    for m in (student.body[0], student.head):
        g = m.weight_orig.grad
        assert g is not None and bool((g[m.weight_mask == 0] == 0).all()) and g.abs().sum() > 0
        assert m.bias.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert list(mode.trainable_parameters()) == []


@pytest.mark.parametrize("quantize", [None, "qat"])
def test_kdfast_and_reference_backends_agree(quantize):
    teacher, x, y = _task(40)
    y[::3] = -100
    results = []
    for backend in ("kdfast", "reference"):
        student = Net(seed=2)
        mode = Compressed(teacher, sparsity=0.4, quantize=quantize, alpha=0.3, backend=backend)
        mode.prepare(student, (x, y))
        out = mode(student, (x, y))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- finalize -------------------------------------------------------------------------------------


def test_finalize_makes_pruning_permanent():
    teacher, x, y = _task(40)
    student = Net(seed=2)
    mode = Compressed(teacher, sparsity=0.75)
    mode.prepare(student, (x, y))
    with torch.no_grad():
        expected = student(x)
    final = mode.finalize(student)
    assert final is student and not final.training
    assert not any(hasattr(m, "weight_mask") for m in final.modules())
    assert isinstance(final.head.weight, nn.Parameter)
    assert sparsity_of(final) == math.floor(0.75 * 272 + 0.5) / 272
    with torch.no_grad():
        torch.testing.assert_close(final(x), expected)


@pytest.mark.parametrize("quant_backend", ["x86", "qnnpack"])
def test_qat_converts_to_an_int8_model_as_accurate_as_the_fake_quantized_one(quant_backend):
    if quant_backend not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {quant_backend} int8 kernels in this build")
    torch.manual_seed(1)
    teacher = nn.Linear(IN, CLASSES)
    x = torch.randn(384, IN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    torch.manual_seed(2)
    student = nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    mode = Compressed(teacher, sparsity=0.5, quantize="qat", quant_backend=quant_backend, observer_steps=44,
                      temperature=2.0, alpha=0.0)
    torch.manual_seed(0)
    Distiller(student, mode, epochs=6, lr=2e-2, progress=False).fit(
        DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True))
    student.eval()
    fake = _accuracy(lambda inp: mode.logits(student, inp), x[256:], y[256:])
    int8 = mode.finalize(student)
    from torch.ao.nn import quantized as nnq
    assert isinstance(int8.module[0], nnq.Linear) and isinstance(int8.module[2], nnq.Linear)
    assert torch.backends.quantized.engine == quant_backend
    assert fake > 0.75                                              # it learned the task
    assert abs(_accuracy(int8, x[256:], y[256:]) - fake) <= 0.03
    assert sparsity_of(int8) >= 0.5
    if quant_backend == "qnnpack":     # 8-bit activations in training too: the same model to a step
        with torch.no_grad():
            torch.testing.assert_close(int8(x[256:]), mode.logits(student, x[256:]), atol=0.05, rtol=0.0)


def test_qat_conv_student_with_its_own_stubs():
    """A CNN that quantizes and dequantizes itself: the mode adds no stubs."""
    class QuantConvNet(ConvNet):
        def __init__(self):
            super().__init__(4, seed=2)
            self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()

        def forward(self, x):
            return self.dequant(super().forward(self.quant(x)))

    teacher = ConvNet(8, seed=1)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, CLASSES, (16,))
    student = QuantConvNet()
    mode = Compressed(teacher, sparsity=0.3, quantize="qat")
    mode.prepare(student, (x, y))
    assert mode.stubs is None and "stubs" not in str(mode.state_dict().keys())
    for _ in range(3):
        mode(student, (x, y)).loss.backward()
    int8 = mode.finalize(student)
    from torch.ao.nn import quantized as nnq
    assert isinstance(int8.features[0], nnq.Conv2d)
    assert int8(x).shape == (16, CLASSES)


# -- checkpoints ------------------------------------------------------------------------------


def test_resume_gives_an_identical_continuation(tmp_path):
    """Masks, observers, the mode's step count and stubs survive a checkpoint: a run
    stopped after 5 steps (inside the gradual schedule) and resumed ends where a
    straight run does."""
    teacher, x, y = _task(96)

    def run(folder, max_steps=None, resume=None):
        torch.manual_seed(7)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(3))
        mode = Compressed(teacher, sparsity=0.7, prune_schedule="gradual", prune_steps=9, quantize="qat")
        d = Distiller(Net(seed=2), mode, epochs=2, max_steps=max_steps, lr=1e-2, checkpoint_dir=folder,
                      progress=False)
        d.fit(loader, resume=resume)
        return d

    a = run(tmp_path / "a")
    b = run(tmp_path / "b", max_steps=5)
    assert b.step == 5 and 0 < _zeros(b.student) < _zeros(a.student)
    b = run(tmp_path / "b", resume=True)
    assert a.step == b.step == 12 and int(b.mode.steps) == 12
    sa, sb = a.student.state_dict(), b.student.state_dict()
    assert sa.keys() == sb.keys() and any(k.endswith("weight_mask") for k in sa)
    assert any("activation_post_process" in k for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k, v in a.mode.state_dict().items():
        assert torch.equal(v, b.mode.state_dict()[k]), k


# -- errors ---------------------------------------------------------------------------------------


def test_errors():
    teacher = Net(32, seed=1)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be finite and in \[0\.0, 1\.0\)"):
            Compressed(teacher, sparsity=bad)
    with pytest.raises(ValueError, match="quant_backend must be one of"):
        Compressed(teacher, quantize="qat", quant_backend="tensorrt")
    with pytest.raises(ValueError, match="quantize must be one of"):
        Compressed(teacher, quantize="ptq")
    with pytest.raises(ValueError, match="prune_schedule must be one of"):
        Compressed(teacher, sparsity=0.5, prune_schedule="cubic")
    with pytest.raises(ValueError, match="prune_steps must be an int >= 1 with prune_schedule='gradual'"):
        Compressed(teacher, sparsity=0.5, prune_schedule="gradual")
    with pytest.raises(ValueError, match="prune_steps is only used with prune_schedule='gradual'"):
        Compressed(teacher, sparsity=0.5, prune_steps=10)
    with pytest.raises(ValueError, match="observer_steps is only used with quantize='qat'"):
        Compressed(teacher, sparsity=0.5, observer_steps=10)
    with pytest.raises(ValueError, match="nothing to compress"):
        Compressed(teacher)
    with pytest.raises(ValueError, match="needs a teacher"):
        make_mode("compressed", sparsity=0.5)
    with pytest.raises(TypeError, match="exclude must be a sequence of module paths"):
        Compressed(teacher, sparsity=0.5, exclude="head")
    no_layers = nn.Sequential(nn.Flatten(), nn.Softmax(-1))
    with pytest.raises(ValueError, match="the student has no Linear or convolution layers to prune"):
        Compressed(teacher, sparsity=0.5).prepare(no_layers, data(4))
    with pytest.raises(ValueError, match=r"no Linear or convolution layers outside exclude=\['body', 'head"):
        Compressed(teacher, sparsity=0.5, exclude=["body", "head"]).prepare(Net(), data(4))
    with pytest.raises(ValueError, match="the student has no submodule 'haed'; did you mean 'head'"):
        Compressed(teacher, sparsity=0.5, exclude=["haed"]).prepare(Net(), data(4))
    with pytest.raises(ValueError, match=r"one float tensor, got a torch\.int64 tensor.*QuantStub"):
        Compressed(teacher, quantize="qat").prepare(nn.Sequential(nn.Embedding(10, 5)),
                                                     (torch.randint(0, 10, (4,)),))
    with pytest.raises(RuntimeError, match=r"not prepared for QAT; call mode\.prepare"):
        Compressed(teacher, quantize="qat").finalize(Net())
    with pytest.raises(ValueError, match="no Linear or convolution layers"):
        sparsity_of(nn.ReLU())


def test_registered():
    assert kdfast.train.MODES["compressed"] is Compressed and kdfast.train.sparsity_of is sparsity_of
    mode = make_mode("compressed", teacher=Net(32), sparsity=0.5)
    assert isinstance(mode, Compressed) and mode.eval_teacher() is mode.teacher
