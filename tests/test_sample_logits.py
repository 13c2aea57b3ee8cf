"""kdfast.sample_logits: the output's structure, determinism per generator, and that the
draws follow softmax(logits / T) (a chi-square test on many rows of the same teacher, which
also rejects a sampler biased towards the top token); temperatures, -inf entries,
degenerate rows, every dtype, awkward shapes, views. CPU always, CUDA when present."""

from __future__ import annotations

import pytest
import torch
from topk_sample_helpers import (
    INF,
    NAN,
    Z_ONE_IN_A_MILLION,
    assert_unbiased,
    check_sample_structure,
    chi2_quantile,
    chi2_statistic,
    pooled_counts,
    teacher_probs,
)

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]


def logits(shape, dtype=torch.float32, device="cpu", scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def gen_for(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,num_samples", [((1, 1), 1), ((3, 1), 12), ((4, 7), 12), ((2, 3, 37), 1),
                                               ((5, 1000), 12), ((2, 4099), 64), ((3, 10), 4096)])
def test_structure(device, dtype, shape, num_samples):
    x = logits(shape, dtype, device)
    for index_dtype in (torch.int64, torch.int32):
        idx, w = kdfast.sample_logits(x, num_samples, generator=gen_for(device), index_dtype=index_dtype)
        assert idx.dtype == index_dtype and idx.device == x.device and w.device == x.device
        assert idx.shape == (*shape[:-1], num_samples)
        check_sample_structure(idx, w, num_samples, x)
    if shape[-1] == 1:
        assert (idx[..., 0] == 0).all() and (w[..., 0] == 1).all()


def test_deterministic_per_generator_state(device):
    x = logits((16, 500), torch.float32, device)
    a = kdfast.sample_logits(x, 12, generator=gen_for(device, 5))
    b = kdfast.sample_logits(x, 12, generator=gen_for(device, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = gen_for(device, 5)
    first = kdfast.sample_logits(x, 12, generator=g)
    second = kdfast.sample_logits(x, 12, generator=g)  # the generator moved on
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], first[0])
    c = kdfast.sample_logits(x, 12, generator=gen_for(device, 6))
    assert not torch.equal(c[0], a[0])
    # the default generator of the device, seeded
    torch.manual_seed(11)
    d = kdfast.sample_logits(x, 12)
    torch.manual_seed(11)
    e = kdfast.sample_logits(x, 12)
    assert torch.equal(d[0], e[0])


def test_rows_draw_independently(device):
    """The same logits in every row: the rows' draws differ (counter = row), and a row's
    draws do not depend on the other rows of the call."""
    x = logits((1, 200), torch.float32, device).repeat(64, 1)
    idx, _ = kdfast.sample_logits(x, 12, generator=gen_for(device, 1))
    assert len({tuple(r) for r in idx.tolist()}) > 50
    idx_half, _ = kdfast.sample_logits(x[:32], 12, generator=gen_for(device, 1))
    assert torch.equal(idx_half, idx[:32])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_draws_follow_the_teacher(device, dtype, temperature):
    """Pooled over 4000 rows of one teacher (48000 draws), the draws pass a chi-square test
    against softmax(logits / T) at a false-alarm rate of 1e-6."""
    base = logits((60,), dtype, device, scale=1.5, seed=2)
    base[[3, 17, 40]] = -INF
    x = base.repeat(4000, 1)
    idx, w = kdfast.sample_logits(x, 12, temperature=temperature, generator=gen_for(device, 3))
    probs = teacher_probs(base, temperature)
    check_sample_structure(idx[:50], w[:50], 12, x[:50], temperature)
    assert_unbiased(idx, w, 12, probs)
    # the mean of the weight vectors is an unbiased estimate of the teacher distribution
    mean = pooled_counts(idx, w, 12, 60) / (12 * 4000)
    assert (mean[[3, 17, 40]] == 0).all()
    assert (mean - probs).abs().max() < 0.01


def test_a_biased_sampler_is_caught(device):
    """The statistic of assert_unbiased rejects a sampler that puts one of its 12 draws on
    the most likely token (a plausible bug), and one that over-weights it by 30 %, at the
    test's own sample size."""
    base = logits((60,), torch.float32, device, scale=1.5, seed=2)
    x = base.repeat(4000, 1)
    idx, w = kdfast.sample_logits(x, 12, generator=gen_for(device, 3))
    probs = teacher_probs(base)
    counts = pooled_counts(idx, w, 12, 60)
    top = int(probs.argmax())
    limit = chi2_quantile(chi2_statistic(counts, probs)[1], Z_ONE_IN_A_MILLION)
    assert chi2_statistic(counts, probs)[0] <= limit
    # one draw in twelve moved to the top token
    moved = counts.clone()
    share = moved / moved.sum()
    moved -= share * 4000
    moved[top] += 4000
    assert chi2_statistic(moved, probs)[0] > limit
    # a sampler drawing from p with the top token's probability 30 % (relative) too high
    biased = probs.clone()
    biased[top] *= 1.3
    biased /= biased.sum()
    draws = torch.multinomial(biased.float(), 48000, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    assert chi2_statistic(torch.bincount(draws, minlength=60).double(), probs)[0] > limit


def test_small_probabilities_keep_their_mass(device):
    """One dominant token and 2000 tokens of probability about 2e-5 each: the tail's share of
    the draws matches its mass (the integer weights do not lose small probabilities)."""
    base = torch.full((2001,), -11.0, dtype=torch.float32)
    base[0] = 0.0
    probs = teacher_probs(base)
    tail = float(probs[1:].sum())  # about 0.0324
    x = base.to(device).repeat(20000, 1)
    idx, w = kdfast.sample_logits(x, 12, generator=gen_for(device, 4))
    counts = pooled_counts(idx, w, 12, 2001)
    n = float(counts.sum())
    z = (float(counts[1:].sum()) - n * tail) / (n * tail * (1 - tail)) ** 0.5
    assert abs(z) < Z_ONE_IN_A_MILLION
    assert_unbiased(idx, w, 12, probs)


def test_large_vocabulary(device):
    x = logits((3, 128000), torch.float32, device, scale=3.0, seed=5)
    x[:, ::5] = -INF
    idx, w = kdfast.sample_logits(x, 12, temperature=0.8, generator=gen_for(device))
    check_sample_structure(idx, w, 12, x, 0.8)
    assert (idx[idx >= 0] % 5 != 0).all()
    # many draws of a peaked large-vocabulary teacher follow it
    peaked = logits((128000,), torch.float32, device, scale=1.0, seed=6)
    peaked[:40] += 9.0
    many = peaked.repeat(200, 1)
    idx, w = kdfast.sample_logits(many, 64, generator=gen_for(device, 9))
    assert_unbiased(idx, w, 64, teacher_probs(peaked))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_degenerate_rows(device, dtype):
    x = logits((6, 30), dtype, device)
    x[0] = -INF              # no distribution: padding
    x[1, 5] = NAN            # undefined: padding
    x[2, 7] = INF            # undefined: padding
    x[3, :] = -INF
    x[3, 11] = 0.5           # one finite entry: drawn every time
    x[4, :] = 7.0            # uniform
    idx, w = kdfast.sample_logits(x, 12, generator=gen_for(device))
    check_sample_structure(idx, w, 12, x)
    assert (idx[:3] == -1).all() and (w[:3] == 0).all()
    assert idx[3, 0] == 11 and w[3, 0] == 1 and (idx[3, 1:] == -1).all()


def test_temperature_sharpens_and_flattens(device):
    x = logits((1, 100), torch.float32, device, seed=7)
    top = int(x[0].argmax())
    x[0, top] += 1.0  # a gap of at least 1 to the next: exp(-20) of the top's mass at T = 0.05
    x = x.repeat(500, 1)
    cold = kdfast.sample_logits(x, 12, temperature=0.05, generator=gen_for(device))
    assert (cold[0][:, 0] == top).all() and (cold[1][:, 0] == 1).all()
    hot_i, _ = kdfast.sample_logits(x, 12, temperature=100.0, generator=gen_for(device))
    assert (hot_i >= 0).sum(-1).float().mean() > 10  # nearly uniform over 100 tokens: few repeats


@pytest.mark.parametrize("view", ["transposed", "rows_sliced", "vocab_sliced", "3d_permuted", "expanded"])
def test_views_match_contiguous(device, view):
    base = logits((40, 33), torch.float32, device)
    if view == "transposed":
        x = base.t()
    elif view == "rows_sliced":
        x = base[3:-2]
    elif view == "vocab_sliced":
        x = base[:, 1:-3]
    elif view == "3d_permuted":
        x = base.reshape(4, 10, 33).permute(1, 0, 2)[:, 1:]
    else:
        x = base[:1].expand(5, 33)
    got = kdfast.sample_logits(x, 12, generator=gen_for(device, 2))
    want = kdfast.sample_logits(x.contiguous(), 12, generator=gen_for(device, 2))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    check_sample_structure(*got, 12, x)


def test_not_differentiable(device):
    x = logits((3, 20), torch.float32, device).requires_grad_(True)
    idx, w = kdfast.sample_logits(x, 5, generator=gen_for(device))
    assert not idx.requires_grad and not w.requires_grad
    seed = torch.zeros((), dtype=torch.int64, device=device)
    idx, w = torch.ops.kdfast.sample_logits(x, 5, 1.0, seed, torch.int64)
    assert not w.requires_grad


def test_empty_batch(device):
    idx, w = kdfast.sample_logits(torch.empty(0, 10, device=device), 3)
    assert idx.shape == (0, 3) and w.shape == (0, 3)
