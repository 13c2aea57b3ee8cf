"""HintLoss (FitNets hints): the learnable regressor (lazy and eager construction on 2-D,
3-D and 4-D inputs), what it hands to kdfast.feature_loss, gradients, state_dict, dtype and
device moves, bad arguments and torch.compile(fullgraph=True).

HintLoss delegates the comparison to ``kdfast.feature_loss``; these tests swap in a small
plain-PyTorch stand-in (defined here only) so that what HintLoss computes and passes on is
checked independently of the fused op. ``test_with_the_real_feature_loss`` checks the real
composition wherever ``kdfast.feature_loss`` exists.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parameter import UninitializedParameter

import kdfast
import kdfast.hint

CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])
HAS_FEATURE_LOSS = hasattr(kdfast, "feature_loss")   # before any test patches it


def standin_feature_loss(student, teacher, *, kind="mse", normalize=False, mask=None,
                         reduction="mean"):
    """Plain-PyTorch feature loss over the last dim: one value per row ``[...]``."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s, t = student.to(dtype), teacher.to(dtype)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if kind == "mse":
        rows = (s - t).square().mean(-1)
    elif kind == "l1":
        rows = (s - t).abs().mean(-1)
    elif kind == "smooth_l1":
        rows = F.smooth_l1_loss(s, t, reduction="none", beta=1.0).mean(-1)
    else:
        rows = 1 - F.cosine_similarity(s, t, dim=-1)
    count = rows.numel()
    if mask is not None:
        rows = rows * mask
        count = mask.sum().clamp(min=1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / count


@pytest.fixture
def calls(monkeypatch):
    """Routes kdfast.feature_loss to the stand-in and records every call's arguments."""
    seen = []

    def recording(student, teacher, **kw):
        seen.append({"student": student, "teacher": teacher, **kw})
        return standin_feature_loss(student, teacher, **kw)

    monkeypatch.setattr(kdfast, "feature_loss", recording, raising=False)
    return seen


# (student shape, teacher shape): 2-D embeddings, 3-D tokens, 4-D NCHW maps
SHAPES = {
    "2d": ((6, 5), (6, 7)),
    "3d": ((2, 3, 4), (2, 3, 9)),
    "4d": ((2, 3, 4, 5), (2, 6, 4, 5)),
}


def _channels(shape):
    return shape[1] if len(shape) == 4 else shape[-1]


def reference_hint(student, teacher, weight, bias, mask=None, **kw):
    """Regression written as a real 1x1 convolution (4-D) or an einsum (other ranks), in
    float64, then the stand-in on the per-vector views."""
    s, t = student.double(), teacher.double()
    w, b = weight.double(), bias.double()
    if s.dim() == 4:
        regressed = F.conv2d(s, w[:, :, None, None], b).permute(0, 2, 3, 1)
        t = t.permute(0, 2, 3, 1)
    else:
        regressed = torch.einsum("...c,oc->...o", s, w) + b
    return standin_feature_loss(regressed, t, mask=mask, **kw)


# ----------------------------------------------------------------------------- construction

@pytest.mark.parametrize("rank", SHAPES)
def test_lazy_construction(rank, calls):
    s_shape, t_shape = SHAPES[rank]
    hint = kdfast.HintLoss()
    assert isinstance(hint.weight, UninitializedParameter)
    assert hint.student_dim is None and hint.teacher_dim is None
    s, t = torch.randn(*s_shape), torch.randn(*t_shape)
    loss = hint(s, t)
    c_s, c_t = _channels(s_shape), _channels(t_shape)
    assert hint.weight.shape == (c_t, c_s) and hint.bias.shape == (c_t,)
    assert hint.weight.dtype == torch.float32 and type(hint.weight) is torch.nn.Parameter
    assert (hint.student_dim, hint.teacher_dim) == (c_s, c_t)
    assert f"student_dim={c_s}, teacher_dim={c_t}" in repr(hint)
    torch.testing.assert_close(loss.double(), reference_hint(s, t, hint.weight, hint.bias),
                               rtol=1e-5, atol=1e-6)
    # what feature_loss received: one vector per position / row, channels last
    rows = (s_shape[0], *s_shape[2:]) if rank == "4d" else s_shape[:-1]
    (call,) = calls
    assert call["student"].shape == (*rows, c_t) and call["teacher"].shape == (*rows, c_t)
    assert call["kind"] == "mse" and call["normalize"] is False
    assert call["mask"] is None and call["reduction"] == "mean"
    # a second batch reuses the regressor
    w = hint.weight.detach().clone()
    hint(s, t)
    assert torch.equal(hint.weight, w)


@pytest.mark.parametrize("rank", SHAPES)
def test_eager_construction_and_gradients(rank, calls):
    s_shape, t_shape = SHAPES[rank]
    c_s, c_t = _channels(s_shape), _channels(t_shape)
    hint = kdfast.HintLoss(student_dim=c_s, teacher_dim=c_t, dtype=torch.float64)
    assert hint.weight.shape == (c_t, c_s) and hint.weight.dtype == torch.float64
    bound = 1 / math.sqrt(c_s)                    # the nn.Linear / nn.Conv2d initialisation
    assert float(hint.weight.detach().abs().max()) <= bound
    assert float(hint.bias.detach().abs().max()) <= bound
    assert float(hint.weight.detach().std()) > 0
    s = torch.randn(*s_shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*t_shape, dtype=torch.float64, requires_grad=True)
    loss = hint(s, t)
    w = hint.weight.detach().clone().requires_grad_(True)
    b = hint.bias.detach().clone().requires_grad_(True)
    s2, t2 = s.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    expected = reference_hint(s2, t2, w, b)
    torch.testing.assert_close(loss, expected)
    (loss * 2.5).backward()
    (expected * 2.5).backward()
    for got, want in ((hint.weight.grad, w.grad), (hint.bias.grad, b.grad), (s.grad, s2.grad),
                      (t.grad, t2.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rank", SHAPES)
def test_gradcheck(rank, calls):
    s_shape, t_shape = SHAPES[rank]
    hint = kdfast.HintLoss(_channels(s_shape), _channels(t_shape), kind="smooth_l1",
                           dtype=torch.float64)
    s = torch.randn(*s_shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*t_shape, dtype=torch.float64, requires_grad=True)
    w = hint.weight.detach().clone().requires_grad_(True)
    b = hint.bias.detach().clone().requires_grad_(True)

    def fn(s, t, w, b):
        return torch.func.functional_call(hint, {"weight": w, "bias": b}, (s, t))

    assert torch.autograd.gradcheck(fn, (s, t, w, b))


@pytest.mark.parametrize("kind", kdfast.hint.HINT_KINDS)
@pytest.mark.parametrize("reduction", kdfast.hint.HINT_REDUCTIONS)
@pytest.mark.parametrize("normalize", [False, True])
def test_options_and_mask_reach_feature_loss(kind, reduction, normalize, calls):
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    mask = torch.rand(2, 4, 5) > 0.4
    hint = kdfast.HintLoss(3, 6, kind=kind, normalize=normalize, reduction=reduction)
    out = hint(s, t, mask)
    assert out.shape == ((2, 4, 5) if reduction == "none" else ())
    expected = reference_hint(s, t, hint.weight, hint.bias, mask=mask, kind=kind,
                              normalize=normalize, reduction=reduction)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    (call,) = calls
    assert call["mask"] is mask
    assert (call["kind"], call["normalize"], call["reduction"]) == (kind, normalize, reduction)


def test_teacher_gradient_only_when_it_requires_grad(calls):
    hint = kdfast.HintLoss(4, 3)
    s, t = torch.randn(5, 4, requires_grad=True), torch.randn(5, 3)
    hint(s, t).backward()
    assert s.grad is not None and hint.weight.grad is not None and t.grad is None


def test_hand_checked(calls):
    """Linear: 1 * 1 + 2 * 1 + 0.5 = 3.5 against 3 -> squared error 0.25.
    1x1 conv with weight (1, -1): the two positions of channels (1, 0) and (2, 1) give 1 and
    1; against teacher 0 and 3 the squared errors are 1 and 4, mean 2.5."""
    hint = kdfast.HintLoss(2, 1)
    with torch.no_grad():
        hint.weight.copy_(torch.tensor([[1.0, 2.0]]))
        hint.bias.fill_(0.5)
    assert hint(torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0]])).item() == 0.25
    with torch.no_grad():
        hint.weight.copy_(torch.tensor([[1.0, -1.0]]))
        hint.bias.zero_()
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])        # [1, 2, 1, 2]
    t = torch.tensor([[[[0.0, 3.0]]]])                      # [1, 1, 1, 2]
    assert hint(s, t).item() == 2.5
    assert hint(s, t, torch.tensor([[[False, True]]])).item() == 4.0


# ----------------------------------------------------------------------------- state, dtypes, devices

def test_state_dict_round_trip(calls):
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4)
    trained = kdfast.HintLoss(kind="l1")
    assert set(trained.state_dict()) == {"weight", "bias"}     # uninitialised, still listed
    before = trained(s, t)
    state = trained.state_dict()
    lazy = kdfast.HintLoss(kind="l1")
    lazy.load_state_dict(state)                               # materialises from the state
    assert (lazy.student_dim, lazy.teacher_dim) == (3, 8)
    torch.testing.assert_close(lazy(s, t), before)
    eager = kdfast.HintLoss(3, 8, kind="l1")
    eager.load_state_dict(state)
    torch.testing.assert_close(eager(s, t), before)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    buf.seek(0)
    loaded = kdfast.HintLoss(kind="l1")
    loaded.load_state_dict(torch.load(buf))
    torch.testing.assert_close(loaded(s, t), before)
    with pytest.raises(RuntimeError, match="size mismatch"):
        kdfast.HintLoss(4, 8).load_state_dict(state)


def test_moving_to_another_dtype(calls):
    s, t = torch.randn(6, 4), torch.randn(6, 3)
    hint = kdfast.HintLoss()
    ref = hint(s, t)
    hint.double()
    assert hint.weight.dtype == torch.float64
    out = hint(s, t)                                       # float64 weights: float64 math
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.double(), rtol=1e-6, atol=1e-7)
    hint.to(torch.bfloat16)
    out = hint(s, t)                                       # bfloat16 weights, float32 math
    assert out.dtype == torch.float32
    out.backward()
    assert hint.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                    (torch.float32, torch.float16)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_low_precision_inputs(dtypes, calls):
    """float16 / bfloat16 inputs: float32 weights when built lazily, float32 regression and
    loss; the teacher reaches feature_loss in its own dtype (no float32 copy)."""
    s = torch.randn(2, 3, 4, 4).to(dtypes[0]).requires_grad_(True)
    t = torch.randn(2, 5, 4, 4).to(dtypes[1])
    hint = kdfast.HintLoss()
    out = hint(s, t)
    assert hint.weight.dtype == torch.float32 and out.dtype == torch.float32
    assert calls[0]["student"].dtype == torch.float32 and calls[0]["teacher"].dtype == dtypes[1]
    torch.testing.assert_close(out.double(), reference_hint(s, t, hint.weight, hint.bias),
                               rtol=1e-5, atol=1e-6)
    out.backward()
    assert s.grad.dtype == dtypes[0]


def test_float64_input_builds_float64_weights(calls):
    hint = kdfast.HintLoss()
    out = hint(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2))
    assert hint.weight.dtype == torch.float64 and out.dtype == torch.float64
    assert calls[0]["teacher"].dtype == torch.float64    # no float64 / float32 mix


@pytest.mark.parametrize("device", [CUDA])
def test_lazy_weights_follow_the_input_device(device, calls):
    hint = kdfast.HintLoss()
    s = torch.randn(2, 3, 4, 4, device=device, dtype=torch.bfloat16)
    out = hint(s, torch.randn(2, 5, 4, 4, device=device))
    assert hint.weight.device.type == "cuda" and hint.weight.dtype == torch.float32
    assert out.device.type == "cuda"


def test_optimizer_after_the_dry_run(calls):
    hint = kdfast.HintLoss()
    assert all(isinstance(p, UninitializedParameter) for p in hint.parameters())
    s, t = torch.randn(8, 4), torch.randn(8, 6)
    hint(s, t)                                              # dry run builds the regressor
    opt = torch.optim.SGD(hint.parameters(), lr=0.5)
    first = hint(s, t).item()
    for _ in range(20):
        opt.zero_grad()
        hint(s, t).backward()
        opt.step()
    assert hint(s, t).item() < first


# ----------------------------------------------------------------------------- errors

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="HintLoss: kind must be one of"):
        kdfast.HintLoss(kind="kl")
    with pytest.raises(ValueError, match="HintLoss: reduction must be one of"):
        kdfast.HintLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="HintLoss: normalize must be a bool"):
        kdfast.HintLoss(normalize=1)
    with pytest.raises(TypeError, match="HintLoss: student_dim must be an int or None"):
        kdfast.HintLoss(student_dim=3.0, teacher_dim=4)
    with pytest.raises(ValueError, match="HintLoss: teacher_dim must be >= 1"):
        kdfast.HintLoss(student_dim=3, teacher_dim=0)
    with pytest.raises(TypeError, match="HintLoss: dtype must be a floating-point dtype"):
        kdfast.HintLoss(3, 4, dtype=torch.int32)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_bad_forward_arguments(lazy, calls):
    def make():
        return kdfast.HintLoss() if lazy else kdfast.HintLoss(3, 6)

    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    with pytest.raises(TypeError, match="HintLoss: student must be a floating-point tensor"):
        make()(s.long(), t)
    with pytest.raises(TypeError, match=r"HintLoss: teacher must be a torch\.Tensor"):
        make()(s, t.tolist())
    with pytest.raises(ValueError, match=r"HintLoss: student and teacher maps must have the same "
                                         r"spatial size \[H, W\], got \[4, 5\] and \[2, 5\]"):
        make()(s, torch.randn(2, 6, 2, 5))
    with pytest.raises(ValueError, match="HintLoss: student and teacher must have the same batch"):
        make()(s, torch.randn(3, 6, 4, 5))
    with pytest.raises(ValueError, match="same number of dims"):
        make()(s, torch.randn(2, 6, 20))
    with pytest.raises(ValueError, match="HintLoss: student and teacher must have the same "
                                         "leading shape"):
        make()(torch.randn(2, 3, 3), torch.randn(2, 4, 6))
    with pytest.raises(TypeError, match="HintLoss: mask must be a bool tensor"):
        make()(s, t, torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match=r"HintLoss: mask must have shape \[2, 4, 5\]"):
        make()(s, t, torch.ones(2, 5, 4, dtype=torch.bool))
    hint = make()
    hint(s, t)
    with pytest.raises(ValueError, match="HintLoss: student has 4 channels but student_dim is 3"):
        hint(torch.randn(2, 4, 4, 5), t)
    with pytest.raises(ValueError, match="HintLoss: teacher has 7 channels but teacher_dim is 6"):
        hint(s, torch.randn(2, 7, 4, 5))


def test_partial_dims_are_checked_at_the_first_batch(calls):
    hint = kdfast.HintLoss(student_dim=3)
    with pytest.raises(ValueError, match="HintLoss: student has 5 channels but student_dim is 3"):
        hint(torch.randn(4, 5), torch.randn(4, 2))
    hint(torch.randn(4, 3), torch.randn(4, 2))
    assert hint.weight.shape == (2, 3)


# ----------------------------------------------------------------------------- compile

@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_compile_fullgraph(lazy, calls, fresh_dynamo):
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4)
    mask = torch.rand(2, 4, 4) > 0.3
    hint = kdfast.HintLoss(kind="cosine") if lazy else kdfast.HintLoss(3, 5, kind="cosine")
    compiled = torch.compile(hint, fullgraph=True)
    out = compiled(s, t, mask)
    expected = reference_hint(s, t, hint.weight, hint.bias, mask=mask, kind="cosine")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    out.backward()
    assert hint.weight.grad is not None and s.grad is not None


# ----------------------------------------------------------------------------- the real op

@pytest.mark.skipif(not HAS_FEATURE_LOSS, reason="kdfast.feature_loss is not available")
@pytest.mark.parametrize("rank", SHAPES)
def test_with_the_real_feature_loss(rank):
    s_shape, t_shape = SHAPES[rank]
    s, t = torch.randn(*s_shape), torch.randn(*t_shape)
    hint = kdfast.HintLoss(kind="smooth_l1", normalize=True)
    out = hint(s, t)
    w, b = hint.weight.detach(), hint.bias.detach()
    if s.dim() == 4:
        regressed = F.conv2d(s, w[:, :, None, None], b).permute(0, 2, 3, 1)
        t = t.permute(0, 2, 3, 1)
    else:
        regressed = torch.einsum("...c,oc->...o", s, w) + b
    expected = kdfast.feature_loss(regressed, t, kind="smooth_l1", normalize=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
