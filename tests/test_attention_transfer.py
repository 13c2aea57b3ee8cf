"""kdfast.attention_transfer_loss / AttentionTransferLoss against the float64 reference:
shapes (odd sizes, H*W = 1, C = 1, N = 1, different channel counts), exponents, every
dtype pair, layouts (channels_last, slices, copies), lists of pairs, zero maps, the
kept-gradient backward and the argument checks."""

from __future__ import annotations

import pytest
import torch
from at_helpers import (
    assert_grad_close,
    check_against_reference,
    feature_map,
    ref_loss_and_grads,
)
from kd_helpers import DTYPE_PAIRS, pair_id

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

P_VALUES = (1.0, 2.0, 3.0, 2.5)

# (student shape, teacher channels)
SHAPES = [
    ((2, 8, 7, 5), 8),
    ((3, 5, 9, 11), 12),
    ((4, 6, 1, 1), 3),      # H * W = 1
    ((1, 3, 7, 5), 4),      # N = 1
    ((2, 1, 6, 6), 1),      # C = 1
    ((2, 37, 17, 19), 9),   # vector tails everywhere
    ((3, 20, 16, 16), 33),  # whole vectors
    ((2, 7, 1, 13), 5),     # H = 1
    ((2, 3, 13, 1), 2),     # W = 1
]


def _teacher_like(shape, channels, **kw):
    return feature_map((shape[0], channels, shape[2], shape[3]), **kw)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("shape,t_channels", SHAPES, ids=[f"{s}-{c}" for s, c in SHAPES])
def test_matches_reference(device, shape, t_channels, p):
    s = feature_map(shape, device=device)
    t = _teacher_like(shape, t_channels, device=device)
    check_against_reference(s, t, p, teacher_grad=True)
    check_against_reference(s, t, p, teacher_grad=False, grad_output=0.37)


@pytest.mark.parametrize("p", (2.0, 2.5))
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=pair_id)
def test_dtype_pairs(device, dtypes, p):
    s = feature_map((3, 16, 9, 7), dtype=dtypes[0], device=device, scale=2.0)
    t = feature_map((3, 24, 9, 7), dtype=dtypes[1], device=device, scale=2.0)
    check_against_reference(s, t, p, teacher_grad=True)
    check_against_reference(s, t, p, grad_output=2.0**12)  # a loss scale


def test_float64(device):
    s = feature_map((2, 5, 6, 7), dtype=torch.float64, device=device)
    t = feature_map((2, 3, 6, 7), dtype=torch.float64, device=device)
    for p in P_VALUES:
        check_against_reference(s, t, p, teacher_grad=True)


@pytest.mark.parametrize("container", (list, tuple))
def test_lists_of_pairs(device, container):
    shapes = [((2, 4, 16, 16), 8), ((2, 8, 8, 8), 16), ((2, 16, 3, 5), 5)]
    s = container(feature_map(sh, device=device) for sh, _ in shapes)
    t = container(_teacher_like(sh, c, device=device) for sh, c in shapes)
    for p in (2.0, 2.5):
        loss, _, _ = check_against_reference(s, t, p, teacher_grad=True)
        singles = sum(kdfast.attention_transfer_loss(a, b, p=p) for a, b in zip(s, t))
        torch.testing.assert_close(loss, singles, rtol=1e-6, atol=0)


def test_list_of_one_pair(device):
    s, t = feature_map((2, 4, 5, 5), device=device), feature_map((2, 6, 5, 5), device=device)
    torch.testing.assert_close(kdfast.attention_transfer_loss([s], [t]),
                               kdfast.attention_transfer_loss(s, t), rtol=0, atol=0)


def _layouts(x):
    """Views of x in the layouts the kernels read in place or copy."""
    cl = x.contiguous(memory_format=torch.channels_last)
    wide = torch.cat([x * 0.5, x], dim=1)
    wide_cl = torch.cat([x, x * 0.5], dim=1).contiguous(memory_format=torch.channels_last)
    return {
        "contiguous": x,
        "channels_last": cl,
        "channel_slice": torch.stack([x, x * 0.5], 2).flatten(1, 2)[:, ::2],  # channel stride 2 H W
        "channel_range": wide[:, x.shape[1]:],  # rows at an offset
        "sample_slice": torch.stack([x, x * 0.5], 1).flatten(0, 1)[::2],  # sample stride 2 C H W
        "channels_last_slice": wide_cl[:, : x.shape[1]],  # copied
        "transposed_hw": x.transpose(2, 3).contiguous().transpose(2, 3),  # copied
        "width_slice": torch.cat([x, x], dim=3)[..., : x.shape[3]],  # copied
    }


@pytest.mark.parametrize("p", (1.0, 2.0, 2.5))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice", "channel_range",
                                    "sample_slice", "channels_last_slice", "transposed_hw",
                                    "width_slice"])
def test_layouts(device, layout, p):
    s0 = feature_map((3, 21, 9, 7), device=device)
    t0 = feature_map((3, 10, 9, 7), device=device)
    s = _layouts(s0)[layout]
    t = _layouts(t0)[layout]
    torch.testing.assert_close(s, s0, rtol=0, atol=0)
    # each layout against the other input in its plain layout, both ways
    check_against_reference(s, t0, p, teacher_grad=True)
    check_against_reference(s0, t, p, teacher_grad=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_channels_last_gradient_is_channels_last(device, dtype):
    s = feature_map((4, 24, 7, 9), dtype=dtype, device=device, channels_last=True)
    t = feature_map((4, 40, 7, 9), dtype=dtype, device=device)
    check_against_reference(s, t, 2.0, teacher_grad=True)
    leaf = s.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    kdfast.attention_transfer_loss(leaf, teacher).backward()
    assert leaf.grad.is_contiguous(memory_format=torch.channels_last), leaf.grad.stride()
    assert teacher.grad.is_contiguous(), teacher.grad.stride()


def test_channels_last_retain_graph(device):
    s = feature_map((2, 16, 5, 6), device=device, channels_last=True).requires_grad_(True)
    t = feature_map((2, 8, 5, 6), device=device, channels_last=True).requires_grad_(True)
    loss = kdfast.attention_transfer_loss(s, t, p=2.5)
    loss.backward(torch.tensor(1.5), retain_graph=True)
    first_s, first_t = s.grad.clone(), t.grad.clone()
    loss.backward(torch.tensor(1.5))
    _, ref_gs, ref_gt = ref_loss_and_grads(s, t, 2.5, grad_output=1.5, teacher_grad=True)
    assert_grad_close(first_s, ref_gs, "first grad_student")
    assert_grad_close(first_t, ref_gt, "first grad_teacher")
    assert_grad_close(s.grad, 2 * ref_gs, "grad_student after two backwards")
    assert_grad_close(t.grad, 2 * ref_gt, "grad_teacher after two backwards")


@pytest.mark.parametrize("p", (1.0, 2.0, 2.5))
@pytest.mark.parametrize("which", ("student", "teacher", "both", "one_sample"))
def test_zero_feature_maps(device, which, p):
    s = feature_map((3, 6, 5, 4), device=device)
    t = feature_map((3, 9, 5, 4), device=device)
    if which in ("student", "both"):
        s.zero_()
    if which in ("teacher", "both"):
        t.zero_()
    if which == "one_sample":
        s[1].zero_()
        t[2].zero_()
    loss, gs, gt = check_against_reference(s, t, p, teacher_grad=True)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    if which == "both":
        assert float(loss) == 0.0


@pytest.mark.parametrize("p", (1.5, 2.5, 3.7))
def test_general_p_wide_magnitudes(device, p):
    """pow over magnitudes from 1e-4 to ~1e3 (float32: exp(p log |x|) on the CPU)."""
    s = feature_map((2, 16, 9, 9), device=device) * 300
    s[:, :4] *= 1e-6
    t = feature_map((2, 8, 9, 9), device=device)
    t[:, :, :3] *= 1e3
    check_against_reference(s, t, p, teacher_grad=True)


def test_maps_below_eps(device):
    """Attention maps whose norm is below the 1e-12 of F.normalize (the clamp is active)."""
    s = feature_map((2, 4, 3, 3), dtype=torch.float64, device=device) * 1e-8
    t = feature_map((2, 4, 3, 3), dtype=torch.float64, device=device)
    for p in (2.0, 2.5):
        check_against_reference(s, t, p, teacher_grad=True)
        check_against_reference(t, s, p, teacher_grad=True)


def test_same_tensor_as_student_and_teacher(device):
    x = feature_map((2, 5, 6, 6), device=device).requires_grad_(True)
    loss = kdfast.attention_transfer_loss(x, x)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert float(x.grad.abs().max()) == 0.0


def test_nan_input_gives_nan(device):
    s = feature_map((2, 4, 5, 5), device=device)
    s[0, 1, 2, 3] = float("nan")
    t = feature_map((2, 4, 5, 5), device=device)
    for p in (1.0, 2.0, 2.5):
        leaf = s.clone().requires_grad_(True)
        loss = kdfast.attention_transfer_loss(leaf, t, p=p)
        loss.backward()
        assert torch.isnan(loss)
        assert torch.isnan(leaf.grad[0]).all()  # the sample holding the NaN
        assert torch.isfinite(leaf.grad[1]).all()


def test_large_half_values(device):
    """float16 inputs near their maximum: |x|^2 ~ 4e9 needs the float32 math."""
    s = (feature_map((2, 8, 6, 6), device=device) * 1e4).clamp(-6e4, 6e4).half()
    t = (feature_map((2, 8, 6, 6), device=device) * 1.5e4).clamp(-6e4, 6e4).half()
    check_against_reference(s, t, 2.0, teacher_grad=True)


def test_module(device):
    s = feature_map((2, 6, 7, 5), device=device)
    t = feature_map((2, 3, 7, 5), device=device)
    crit = kdfast.AttentionTransferLoss(p=3.0)
    assert "p=3.0" in repr(crit)
    torch.testing.assert_close(crit(s, t), kdfast.attention_transfer_loss(s, t, p=3.0), rtol=0, atol=0)
    check_against_reference(s, t, 3.0, teacher_grad=True, fn=lambda a, b, p: crit(a, b))
    check_against_reference([s, s], [t, t], 3.0, fn=lambda a, b, p: crit(a, b))
    assert kdfast.AttentionTransferLoss().p == 2.0


# ----------------------------------------------------------------------------- backward paths


def profiled_kdfast_ops(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("kdfast::")]


def test_kept_gradient_path(device):
    """float32: the gradient comes from the forward and is scaled, no backward op."""
    s = feature_map((2, 8, 6, 6), device=device).requires_grad_(True)
    t = feature_map((2, 8, 6, 6), device=device)
    ops = profiled_kdfast_ops(lambda: (kdfast.attention_transfer_loss(s, t) * 2).backward())
    assert "kdfast::attention_transfer_fused" in ops, ops
    assert "kdfast::kd_loss_scale_grad_" in ops, ops
    assert "kdfast::attention_transfer_backward" not in ops, ops


def test_float16_recompute_path(device):
    """float16: the gradient is recomputed in the backward (where a loss scale is known)."""
    s = feature_map((2, 8, 6, 6), dtype=torch.float16, device=device)
    t = feature_map((2, 8, 6, 6), dtype=torch.float16, device=device)
    leaf = s.clone().requires_grad_(True)
    ops = profiled_kdfast_ops(lambda: (kdfast.attention_transfer_loss(leaf, t) * 2).backward())
    assert "kdfast::attention_transfer_backward" in ops, ops
    check_against_reference(s, t, 2.0, grad_output=2.0**16, teacher_grad=True)
    check_against_reference(s, t, 2.5, grad_output=2.0**16, teacher_grad=False)


def test_float16_loss_scaling_keeps_small_gradients(device):
    """With a GradScaler-like scale, gradients below float16's range at scale 1 come out as
    float32 math rounded once to float16."""
    scale = 2.0**16
    s = feature_map((2, 64, 24, 24), dtype=torch.float16, device=device)
    t = feature_map((2, 64, 24, 24), dtype=torch.float16, device=device)
    _, gs, _ = check_against_reference(s, t, 2.0, grad_output=scale)
    _, ref_gs, _ = ref_loss_and_grads(s, t, 2.0, grad_output=scale)
    tiny = (ref_gs.abs() / scale < 6e-8) & (ref_gs.abs() > 1e-3)
    assert int(tiny.sum()) > 100, "the case has no gradients below float16's range at scale 1"
    rel = ((gs.double().cpu() - ref_gs.cpu()).abs() / ref_gs.abs().cpu())[tiny.cpu()]
    assert float(rel.max()) <= 2.0**-10


def test_retain_graph_second_backward_doubles(device):
    s0 = feature_map((3, 10, 7, 7), device=device)
    t0 = feature_map((3, 4, 7, 7), device=device)
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    loss = kdfast.attention_transfer_loss(s, t, p=3.0)
    loss.backward(torch.tensor(0.7), retain_graph=True)
    first = s.grad.clone()
    loss.backward(torch.tensor(0.7))
    _, ref_gs, ref_gt = ref_loss_and_grads(s0, t0, 3.0, grad_output=0.7, teacher_grad=True)
    assert_grad_close(first, ref_gs, "first")
    assert_grad_close(s.grad, 2 * ref_gs, "grad_student after two backwards")
    assert_grad_close(t.grad, 2 * ref_gt, "grad_teacher after two backwards")


def test_autograd_grad_three_times(device):
    s0 = feature_map((2, 6, 5, 5), device=device)
    t0 = feature_map((2, 6, 5, 5), device=device)
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    loss = kdfast.attention_transfer_loss(s, t)
    gos = [0.5, -2.0, 3.0]
    results = [torch.autograd.grad(loss, (s, t), torch.tensor(go), retain_graph=i < 2)
               for i, go in enumerate(gos)]
    for go, (gs, gt) in zip(gos, results):
        _, ref_gs, ref_gt = ref_loss_and_grads(s0, t0, 2.0, grad_output=go, teacher_grad=True)
        assert_grad_close(gs, ref_gs, "grad_student")
        assert_grad_close(gt, ref_gt, "grad_teacher")
    assert results[0][0].data_ptr() != results[1][0].data_ptr()


def test_teacher_only_gradient(device):
    s0 = feature_map((2, 6, 5, 7), device=device)
    t0 = feature_map((2, 9, 5, 7), device=device)
    t = t0.clone().requires_grad_(True)
    kdfast.attention_transfer_loss(s0, t).backward()
    _, _, ref_gt = ref_loss_and_grads(s0, t0, 2.0, teacher_grad=True)
    assert_grad_close(t.grad, ref_gt, "grad_teacher")


def test_no_gradient_forward_same_loss(device):
    s = feature_map((3, 8, 9, 9), device=device)
    t = feature_map((3, 5, 9, 9), device=device)
    with torch.no_grad():
        a = kdfast.attention_transfer_loss(s.requires_grad_(True), t)
    b = kdfast.attention_transfer_loss(s, t)
    assert not a.requires_grad and b.requires_grad
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_accumulates_and_features_from_earlier_ops(device):
    w = torch.randn(8, 3, 3, 3, device=device, requires_grad=True)
    x = torch.randn(2, 3, 10, 10, device=device)
    t = feature_map((2, 16, 10, 10), device=device)
    feat = torch.nn.functional.conv2d(x, w, padding=1)
    loss = kdfast.attention_transfer_loss(feat, t) + feat.square().mean() * 1e-3
    loss.backward()
    w64 = w.detach().double().requires_grad_(True)
    feat64 = torch.nn.functional.conv2d(x.double(), w64, padding=1)
    loss64 = ((_ref_attention(feat64) - _ref_attention(t.double())) ** 2).mean() + \
        feat64.square().mean() * 1e-3
    loss64.backward()
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad.cpu(), rtol=1e-4, atol=1e-6)


def _ref_attention(x):
    maps = x.abs().pow(2).sum(1).flatten(1) / x.shape[1]
    return maps / torch.linalg.vector_norm(maps, dim=1, keepdim=True).clamp(min=1e-12)


def test_loss_not_reaching_the_output(device):
    s = feature_map((2, 4, 5, 5), device=device).requires_grad_(True)
    t = feature_map((2, 4, 5, 5), device=device)
    other = s.sum()
    _ = kdfast.attention_transfer_loss(s, t)
    other.backward()
    assert torch.equal(s.grad, torch.ones_like(s))


def test_reference_fallback_matches(device):
    """kdfast.reference.attention_transfer_loss (the fallback) agrees with the kernels."""
    s = [feature_map((2, 6, 7, 5), device=device), feature_map((2, 3, 4, 4), device=device)]
    t = [feature_map((2, 4, 7, 5), device=device), feature_map((2, 5, 4, 4), device=device)]
    for p in (1.0, 2.0, 2.5):
        ours = check_against_reference(s, t, p, teacher_grad=True)
        fallback = check_against_reference(s, t, p, teacher_grad=True,
                                           fn=kdfast.reference.attention_transfer_loss)
        torch.testing.assert_close(ours[0], fallback[0], rtol=2e-6, atol=1e-9)


def test_without_extension_falls_back_to_reference():
    """KDFAST_DISABLE_EXTENSION=1: the function and the module run the plain-PyTorch
    reference (one warning) and give the kernels' numbers."""
    import os
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(f"""
        import sys, warnings
        sys.path[:0] = [{root!r}]
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kdfast
            torch.manual_seed(0)
            s = torch.randn(2, 6, 7, 5, requires_grad=True)
            t = torch.randn(2, 4, 7, 5)
            loss = kdfast.attention_transfer_loss(s, t, p=2.5)
            loss.backward()
            kdfast.AttentionTransferLoss()([s], [t])
        assert not kdfast.has_extension()
        n = sum("reference" in str(w.message) for w in caught)
        print(n, repr(float(loss.detach())), repr(float(s.grad.abs().sum())))
    """)
    env = dict(os.environ, KDFAST_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_warnings, loss, grad_sum = proc.stdout.split()
    assert int(n_warnings) == 1
    torch.manual_seed(0)
    s = torch.randn(2, 6, 7, 5, requires_grad=True)
    t = torch.randn(2, 4, 7, 5)
    ours = kdfast.attention_transfer_loss(s, t, p=2.5)
    ours.backward()
    ours = float(ours.detach())
    assert abs(float(loss) - ours) <= 1e-5 * abs(ours)
    assert abs(float(grad_sum) - float(s.grad.abs().sum())) <= 1e-4 * float(s.grad.abs().sum())


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", ("function", "module", "reference"))
def test_bad_arguments(fn):
    f = {"function": kdfast.attention_transfer_loss,
         "reference": kdfast.reference.attention_transfer_loss,
         "module": lambda s, t, p=2.0: kdfast.AttentionTransferLoss(p)(s, t)}[fn]
    s = torch.randn(2, 4, 5, 5)
    t = torch.randn(2, 6, 5, 5)
    cases = [
        ((torch.randn(3, 4, 5, 5), t), {}, ValueError, "same N, H and W"),
        ((s, torch.randn(2, 6, 4, 5)), {}, ValueError, "same N, H and W"),
        ((s, torch.randn(2, 6, 5, 6)), {}, ValueError, "same N, H and W"),
        ((torch.randn(2, 4, 25), t), {}, ValueError, "student_feat must be a 4-D"),
        ((s, torch.randn(2, 6, 5, 5, 1)), {}, ValueError, "teacher_feat must be a 4-D"),
        ((s, t), {"p": 0.5}, ValueError, "p must be finite and >= 1"),
        ((s, t), {"p": float("inf")}, ValueError, "p must be finite and >= 1"),
        ((s, t), {"p": float("nan")}, ValueError, "p must be finite and >= 1"),
        ((s, t), {"p": True}, TypeError, "p must be a float"),
        (([s, s], [t]), {}, ValueError, "same number of feature maps"),
        (([s], t), {}, TypeError, "student_feat is a list"),
        ((s, (t,)), {}, TypeError, "teacher_feat is a tuple"),
        (([], []), {}, ValueError, "at least one feature map"),
        (([s, s], [t, torch.randn(2, 6, 4, 4)]), {}, ValueError, "(pair 1)"),
        ((s.long(), t), {}, TypeError, "student_feat must be float32"),
        ((s, "t"), {}, TypeError, "teacher_feat must be a torch.Tensor"),
        ((s.double(), t), {}, TypeError, "must both be float64"),
        ((torch.randn(2, 0, 5, 5), t), {}, ValueError, "N, C, H, W >= 1"),
        ((torch.randn(0, 4, 5, 5), torch.randn(0, 6, 5, 5)), {}, ValueError, "N, C, H, W >= 1"),
    ]
    for args, kwargs, exc, msg in cases:
        if fn == "module" and "p" in kwargs:
            with pytest.raises(exc, match=_escape(msg)):
                f(*args, p=kwargs["p"])
            continue
        with pytest.raises(exc, match=_escape(msg)):
            f(*args, **kwargs)


def _escape(msg: str) -> str:
    import re

    return re.escape(msg)


def test_op_checks_arguments_in_cpp():
    """The op called directly checks its arguments too (C++), naming them."""
    op = torch.ops.kdfast.attention_transfer_fused
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    cases = [
        ((torch.randn(3, 4, 5, 5), t, 2.0), "same N, H and W"),
        ((torch.randn(2, 4, 25), t, 2.0), "student_feat must be a 4-D"),
        ((s, torch.randn(2, 6, 5, 5, 1), 2.0), "teacher_feat must be a 4-D"),
        ((s, t, 0.9), "p must be finite and >= 1"),
        ((s, t, float("nan")), "p must be finite and >= 1"),
        ((s.int(), t, 2.0), "student_feat must be float32"),
        ((s.double(), t, 2.0), "must both be float64"),
        ((torch.randn(2, 0, 5, 5), t, 2.0), "N, C, H, W >= 1"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=_escape(msg)):
            op(*args, True, False)
    _, stats, _, _ = op(s, t, 2.0, False, False)
    back = torch.ops.kdfast.attention_transfer_backward
    with pytest.raises(RuntimeError, match="stats must be"):
        back(torch.tensor(1.0), s, t, stats[:1], 2.0, True, False)
    with pytest.raises(RuntimeError, match="grad_loss must be one"):
        back(torch.ones(2), s, t, stats, 2.0, True, False)
    with pytest.raises(RuntimeError, match="grad_loss must be one"):
        back(torch.tensor(1.0, dtype=torch.float64), s, t, stats, 2.0, True, False)
