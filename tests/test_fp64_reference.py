"""The float64 test reference itself, checked against torch's own loss functions so
the other tests compare the kernels with something known to be right."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fp64_reference import ref_kd_loss, ref_kd_loss_rows


def _inputs(n=5, v=13):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(n, v, dtype=torch.float64, generator=g) * 3
    t = torch.randn(n, v, dtype=torch.float64, generator=g) * 3
    return s, t


@pytest.mark.parametrize("temperature", (0.5, 1.0, 4.0))
def test_forward_and_reverse_kl_match_kl_div(temperature):
    s, t = _inputs()
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    fwd = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
    rev = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2
    torch.testing.assert_close(ref_kd_loss(s, t, temperature=temperature), fwd, rtol=1e-12, atol=0)
    torch.testing.assert_close(ref_kd_loss(s, t, temperature=temperature, divergence="reverse_kl"),
                               rev, rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta", (0.2, 0.5, 0.7))
def test_jsd_matches_probability_form(beta):
    s, t = _inputs()
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    m = beta * p + (1 - beta) * q
    d = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    got = ref_kd_loss_rows(s, t, temperature=2.0, divergence="jsd", beta=beta)
    torch.testing.assert_close(got, 4.0 * d, rtol=1e-10, atol=1e-14)
    assert torch.all(d <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) + 1e-12)


def test_cross_entropy_term_and_ignore_index():
    s, t = _inputs()
    y = torch.tensor([1, -100, 4, 12, -100])
    kd = ref_kd_loss_rows(s, t, y, temperature=3.0, alpha=0.0)
    ce = F.cross_entropy(s, y, reduction="none")
    got = ref_kd_loss_rows(s, t, y, temperature=3.0, alpha=0.25)
    torch.testing.assert_close(got, 0.75 * kd + 0.25 * ce, rtol=1e-12, atol=1e-14)
    assert torch.all(got[y == -100] == 0)
    mean = ref_kd_loss(s, t, y, temperature=3.0, alpha=0.25)
    torch.testing.assert_close(mean, got.sum() / 3, rtol=1e-12, atol=0)


def test_masked_entries_drop_out():
    s, t = _inputs(3, 9)
    s2, t2 = s.clone(), t.clone()
    s2[:, [2, 5]] = -math.inf
    t2[:, [2, 5]] = -math.inf
    keep = [0, 1, 3, 4, 6, 7, 8]
    for div in ("forward_kl", "reverse_kl", "jsd"):
        a = ref_kd_loss_rows(s2, t2, temperature=2.0, divergence=div)
        b = ref_kd_loss_rows(s[:, keep], t[:, keep], temperature=2.0, divergence=div)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
