"""Shared pieces of the topk_logits / sample_logits tests: float64 references written from
the definitions, structural checks of a sampled output, a chi-square test of sampled
weights against the teacher distribution, and the cases run on every CPU instruction set.
"""

from __future__ import annotations

import math

import torch

import kdfast

INF = float("inf")
NAN = float("nan")


# ---------------------------------------------------------------------------------------
# topk_logits


def ref_topk(x: torch.Tensor, k: int, temperature: float = 1.0):
    """Indices by the ordering rule (descending, ties: lower index first, NaN first) and
    float64 log-probabilities under the full log_softmax(x / T); ``-inf`` for rows of only
    ``-inf``, NaN for rows holding NaN or ``+inf``."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices[:, :k]
    lp = torch.log_softmax(rows / temperature, dim=-1)
    empty = (rows == -INF).all(-1, keepdim=True)
    undefined = (torch.isnan(rows) | (rows == INF)).any(-1, keepdim=True)
    lp = torch.where(empty, -INF, torch.where(undefined, NAN, lp))
    lead = x.shape[:-1]
    return order.reshape(*lead, k), lp.gather(1, order).reshape(*lead, k)


def check_topk(x: torch.Tensor, k: int, temperature: float = 1.0, index_dtype=torch.int64,
               atol: float | None = None) -> None:
    """kdfast.topk_logits(x) against :func:`ref_topk`: indices equal, logprobs close."""
    idx, lp = kdfast.topk_logits(x, k, temperature=temperature, index_dtype=index_dtype)
    want_idx, want_lp = ref_topk(x.cpu(), k, temperature)
    assert idx.dtype == index_dtype and idx.shape == (*x.shape[:-1], k)
    assert lp.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert lp.shape == idx.shape and idx.device == x.device and lp.device == x.device
    assert torch.equal(idx.cpu().long(), want_idx), (idx, want_idx)
    if atol is None:
        atol = 1e-10 if x.dtype == torch.float64 else 2e-5
    got = lp.cpu().double()
    same_special = torch.equal(torch.isnan(got), torch.isnan(want_lp)) and \
        torch.equal(got == -INF, want_lp == -INF)
    assert same_special, (got, want_lp)
    finite = torch.isfinite(want_lp)
    scale = want_lp[finite].abs().clamp(min=1.0) if finite.any() else torch.ones(0)
    err = (got[finite] - want_lp[finite]).abs()
    assert (err <= atol * scale).all(), f"max error {err.max().item():.3g}"


# ---------------------------------------------------------------------------------------
# sample_logits


def check_sample_structure(idx: torch.Tensor, w: torch.Tensor, num_samples: int,
                           x: torch.Tensor | None = None, temperature: float = 1.0) -> None:
    """Per row: distinct tokens ascending, then (-1, 0) padding; weights positive multiples
    of 1 / S summing to 1 (all padding for rows without a distribution); drawn tokens have
    a positive probability under x."""
    assert idx.shape == w.shape and idx.shape[-1] == num_samples and w.dtype == torch.float32
    V = None if x is None else x.shape[-1]
    rows_i = idx.reshape(-1, num_samples).cpu().long()
    rows_w = w.reshape(-1, num_samples).cpu().double()
    probs = None
    if x is not None:
        xr = x.detach().reshape(-1, V).cpu().double()
        defined = torch.isfinite(xr.amax(-1)) & ~torch.isnan(xr).any(-1)
        probs = torch.softmax(torch.where(defined.unsqueeze(-1), xr, 0.0) / temperature, -1)
    for r in range(rows_i.shape[0]):
        ti, tw = rows_i[r], rows_w[r]
        n = int((ti >= 0).sum())
        assert (ti[:n] >= 0).all() and (ti[n:] == -1).all(), ti
        assert (tw[n:] == 0).all() and (tw[:n] > 0).all(), tw
        if n > 1:
            assert (ti[1:n] > ti[:n - 1]).all(), ti
        counts = tw[:n] * num_samples
        assert torch.allclose(counts, counts.round(), atol=1e-4), counts
        if probs is not None and not bool(defined[r]):
            assert n == 0, ti
            continue
        assert n >= 1 and abs(float(tw.sum()) - 1.0) < 1e-5 and int(counts.round().sum()) == num_samples
        if V is not None:
            assert int(ti[n - 1]) < V
        if probs is not None:
            assert (probs[r, ti[:n]] > 0).all(), "a token of zero probability was drawn"


def chi2_quantile(df: int, z: float) -> float:
    """Upper quantile of the chi-square distribution with df degrees of freedom at the
    standard-normal quantile z (Wilson-Hilferty; accurate to a few % for df >= 10)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


Z_ONE_IN_A_MILLION = 4.753  # standard normal upper 1e-6 quantile


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple:
    """Pearson's statistic of observed token counts against expected probabilities; tokens
    whose expected count is below min_expected are pooled into one cell. Returns
    (statistic, degrees of freedom)."""
    counts = counts.double()
    n = float(counts.sum())
    expected = probs.double() * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, int(obs.numel()) - 1


def pooled_counts(idx: torch.Tensor, w: torch.Tensor, num_samples: int, vocab: int) -> torch.Tensor:
    """Total draws of each token over all rows (weights times S)."""
    i = idx.reshape(-1).cpu().long()
    c = (w.reshape(-1).cpu().double() * num_samples).round()
    keep = i >= 0
    return torch.zeros(vocab, dtype=torch.float64).index_add_(0, i[keep], c[keep])


def assert_unbiased(idx: torch.Tensor, w: torch.Tensor, num_samples: int, probs: torch.Tensor,
                    z: float = Z_ONE_IN_A_MILLION) -> float:
    """Chi-square test that the pooled draws follow probs (a false alarm 1e-6 of the time)."""
    counts = pooled_counts(idx, w, num_samples, probs.numel())
    stat, df = chi2_statistic(counts, probs)
    limit = chi2_quantile(df, z)
    assert stat <= limit, f"chi-square {stat:.1f} > {limit:.1f} (df {df}): draws do not follow the teacher"
    return stat


def teacher_probs(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(x.detach().double().cpu() / temperature, dim=-1)


# ---------------------------------------------------------------------------------------
# Cases run on every CPU instruction set (tests/test_topk_sample_isa.py)


def run_isa_cases() -> None:
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape, k in (((3, 1), 1), ((4, 7), 7), ((2, 37), 5), ((3, 300), 17), ((2, 4099), 64),
                         ((1, 20000), 300)):
            x = (3 * torch.randn(shape, generator=gen)).to(dtype)
            x[0, min(5, shape[-1] - 1)] = -INF
            check_topk(x, k, temperature=(1.0, 0.7, 2.0)[k % 3])
            check_topk(x.round(), min(k + 1, shape[-1]))  # ties
            idx, w = kdfast.sample_logits(x, 12, temperature=1.5, generator=gen)
            check_sample_structure(idx, w, 12, x, temperature=1.5)
    # increasing rows: every vector raises the threshold (the buffer is cut many times)
    ramp = torch.arange(5000, dtype=torch.float32).repeat(2, 1) / 100
    check_topk(ramp, 100)
    check_topk(ramp.flip(-1), 100)
    # degenerate rows
    x = torch.randn(5, 40, generator=gen)
    x[0] = -INF
    x[1, 3] = NAN
    x[2, 7] = INF
    x[3, :-1] = -INF
    check_topk(x, 4)
    idx, w = kdfast.sample_logits(x, 8, generator=gen)
    check_sample_structure(idx, w, 8, x)
    assert (idx[:3] == -1).all() and idx[3, 0] == 39 and w[3, 0] == 1.0
    # draws follow the teacher
    logits = torch.randn(40, generator=gen) * 1.5
    logits[::7] = -INF
    many = logits.repeat(3000, 1)
    idx, w = kdfast.sample_logits(many, 12, temperature=1.3, generator=gen)
    assert_unbiased(idx, w, 12, teacher_probs(logits, 1.3))
