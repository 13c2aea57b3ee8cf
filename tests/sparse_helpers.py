"""Independent float64 reference of ``kdfast.sparse_kd_loss`` for the tests, input
builders and the checks built on them.

``ref_sparse_rows`` is written from the definition with plain PyTorch ops and does not
import ``kdfast``; unlike ``kdfast.reference`` (which gathers the student's
log-probabilities at the support) it scatters the sparse teacher into a dense float64
distribution per row and takes the divergence over the whole vocabulary:

- ``p`` dense: the teacher's probabilities at its support (index ``-1``: padding), 0
  elsewhere; ``values="logprobs"`` stores ``log p``, ``"probs"`` stores ``p``;
- ``tail="renormalize"``: ``D = KL(p / sum p || q)`` restricted to ``p > 0`` (the student
  ``q = softmax(s / T)`` is not renormalised), 0 when ``sum p == 0``;
- ``tail="residual"``: ``D = sum_{p > 0} p log(p / q) + r_t log(r_t / r_s)`` with
  ``r_t = max(1 - sum p, 0)``, ``r_s`` the student mass off the support, floored at the
  smallest normal of the accumulation dtype (float32 for float32 / float16 / bfloat16
  students: the kernels' math), where it passes no gradient; the last term is 0 when
  ``r_t == 0``;
- ``loss = (1 - alpha) T^2 D + alpha CE(s, y)`` at temperature 1, rows whose label is
  ``ignore_index`` exactly 0.

Gradients come from ``torch.autograd`` on it.
"""

from __future__ import annotations

import math

import torch
from kd_helpers import LOW_PRECISION

import kdfast

REDUCTIONS = ("batchmean", "sum", "none")
VALUES = ("logprobs", "probs")
TAILS = ("renormalize", "residual")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# (student dtype, teacher_values dtype): every pair of float32 / float16 / bfloat16.
DTYPE_PAIRS = [(s, v) for s in FLOATS for v in FLOATS]


def pair_id(dtypes) -> str:
    return f"{dtypes[0]}-{dtypes[1]}".replace("torch.", "")


def _dense_teacher(indices: torch.Tensor, values: torch.Tensor, vocab: int, kind: str):
    """(p, log p, support mask) as dense float64 ``[R, V]`` rows."""
    idx = indices.reshape(-1, indices.shape[-1]).long()
    val = values.reshape(-1, values.shape[-1]).double()
    valid = idx >= 0
    safe = torch.where(valid, idx, 0)
    if kind == "logprobs":
        p_entries = torch.where(valid, val.exp(), 0.0)
    else:
        p_entries = torch.where(valid, val, 0.0)
    p = torch.zeros(idx.shape[0], vocab, dtype=torch.float64, device=idx.device)
    p.scatter_add_(1, safe, p_entries)
    # Counted, not scattered: padding entries point at index 0 too, and a scatter of
    # duplicate indices keeps any one of their values.
    hits = torch.zeros(idx.shape[0], vocab, dtype=torch.int64, device=idx.device)
    mask = hits.scatter_add_(1, safe, valid.long()) > 0
    log_p = torch.where(p > 0, p, 1.0).log()
    return p, log_p, mask


def ref_sparse_rows(student, indices, values, labels=None, *, values_kind="logprobs",
                    temperature=1.0, tail="renormalize", alpha=0.0, ignore_index=-100,
                    tail_floor=None):
    """Per-row loss ``[...]`` in float64 (differentiable in ``student``). ``tail_floor``:
    the floor of ``r_s``, by default the smallest normal of ``student``'s accumulation
    dtype."""
    if tail_floor is None:
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        tail_floor = torch.finfo(acc).tiny
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab).to(torch.float64)
    y = None if labels is None else labels.reshape(-1).to(s.device)
    counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if y is None else y != ignore_index
    s = torch.where(counted[:, None], s, 0.0)
    p, log_p, mask = _dense_teacher(indices.to(s.device), values.to(s.device), vocab, values_kind)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    keep = p > 0
    mass = p.sum(-1)

    def kl_terms(w, log_w):
        diff = torch.where(keep, log_w, 0.0) - torch.where(keep, log_q, 0.0)
        return torch.where(keep, w * diff, 0.0).sum(-1)

    if tail == "renormalize":
        safe_mass = torch.where(mass > 0, mass, 1.0)[:, None]
        d = kl_terms(p / safe_mass, log_p - safe_mass.log())
    else:
        r_t = (1.0 - mass).clamp(min=0.0)
        r_s = (log_q.exp() * (~mask)).sum(-1).clamp(min=tail_floor)
        safe_r_t = torch.where(r_t > 0, r_t, 1.0)
        d = kl_terms(p, log_p) + torch.where(r_t > 0, r_t * (safe_r_t.log() - r_s.log()), 0.0)
    rows = (1.0 - alpha) * temperature**2 * d
    if alpha > 0:
        ce = -torch.log_softmax(s, dim=-1).gather(1, torch.where(counted, y, 0)[:, None]).squeeze(1)
        rows = rows + alpha * ce
    rows = torch.where(counted, rows, 0.0)
    return rows.reshape(student.shape[:-1])


def ref_sparse(student, indices, values, labels=None, *, reduction="batchmean", **options):
    rows = ref_sparse_rows(student, indices, values, labels, **options)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    counted = rows.numel() if labels is None else int((labels != options.get("ignore_index", -100)).sum())
    return rows.sum() / max(counted, 1)


def _kernel_options(options: dict) -> dict:
    """The reference's ``values_kind`` is the public ``values``."""
    out = dict(options)
    if "values_kind" in out:
        out["values"] = out.pop("values_kind")
    return out


def _ref_options(options: dict) -> dict:
    out = dict(options)
    if "values" in out:
        out["values_kind"] = out.pop("values")
    return out


# ----------------------------------------------------------------------------- inputs


def logits(shape, dtype=torch.float32, device="cpu", scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def labels_for(rows_shape, vocab, device="cpu", ignore_every=3, ignore_index=-100):
    """Random labels, every ``ignore_every``-th row (flat order) ignored (0: none)."""
    y = torch.randint(0, vocab, tuple(rows_shape), dtype=torch.int64)
    if ignore_every:
        y.view(-1)[1::ignore_every] = ignore_index
    return y.to(device)


def topk_teacher(rows_shape, vocab, k, *, temperature=1.0, values="logprobs", dtype=torch.float32,
                 index_dtype=torch.int64, device="cpu", scale=3.0, teacher=None):
    """A teacher's top-k as (indices, values, dense teacher logits): the k largest logits of
    random rows and their full-vocabulary log-probabilities (or probabilities)."""
    t = logits((*rows_shape, vocab), torch.float64, scale=scale) if teacher is None else teacher.double()
    log_p = torch.log_softmax(t / temperature, dim=-1)
    top = torch.topk(t, k, dim=-1)
    lp = log_p.gather(-1, top.indices)
    val = lp if values == "logprobs" else lp.exp()
    return (top.indices.to(device=device, dtype=index_dtype), val.to(device=device, dtype=dtype),
            t.to(device))


def random_support(rows_shape, vocab, k, *, values="logprobs", dtype=torch.float32,
                   index_dtype=torch.int64, device="cpu", pad_every=0, mass=0.9):
    """Distinct random indices per row (a random permutation's first k, unsorted) with
    random weights summing to ``mass``; ``pad_every``: every n-th entry of a row is
    padding (index -1)."""
    rows = math.prod(rows_shape)
    idx = torch.stack([torch.randperm(vocab)[:k] for _ in range(rows)]) if rows else \
        torch.empty(0, k, dtype=torch.int64)
    w = torch.rand(rows, k, dtype=torch.float64) + 0.05
    if pad_every:
        idx[:, ::pad_every] = -1
        w[:, ::pad_every] = 0.0
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30) * mass
    val = w.log() if values == "logprobs" else w
    if pad_every and values == "logprobs":
        val[:, ::pad_every] = 0.0  # whatever a padding entry holds is ignored
    shape = (*rows_shape, k)
    return (idx.reshape(shape).to(device=device, dtype=index_dtype),
            val.reshape(shape).to(device=device, dtype=dtype))


# ----------------------------------------------------------------------------- running and checking


def run_sparse(student, indices, teacher_values, labels=None, *, grad_output=None, fn=None, **options):
    """(loss, grad_student) of ``kdfast.sparse_kd_loss`` (or ``fn``) forward + backward."""
    fn = kdfast.sparse_kd_loss if fn is None else fn
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, indices, teacher_values, labels, **_kernel_options(options))
    go = torch.ones_like(loss) if grad_output is None else grad_output
    loss.backward(go)
    return loss.detach(), s.grad


def ref_sparse_and_grad(student, indices, teacher_values, labels=None, *, grad_output=None, **options):
    """float64 (loss, grad_student) of the reference, on the CPU."""
    s = student.detach().cpu().to(torch.float64).requires_grad_(True)
    lab = None if labels is None else labels.cpu()
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = ref_sparse(s, indices.cpu(), teacher_values.detach().cpu(), lab,
                      tail_floor=torch.finfo(acc).tiny, **_ref_options(options))
    go = torch.ones_like(loss) if grad_output is None else grad_output.detach().cpu().double()
    (grad,) = torch.autograd.grad(loss, s, go)
    return loss.detach(), grad


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected.cpu(), rtol=rtol,
                               atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def loss_tolerance(dtype, options) -> tuple:
    """(rtol, atol) of the loss against the float64 reference: float32 math (float64 for
    float64 students); the divergence's log terms are O(log V), scaled by T^2."""
    weight = max(1.0, options.get("temperature", 1.0) ** 2)
    if dtype == torch.float64:
        return 1e-10, 1e-11 * weight
    return 2e-5, 2e-6 * weight


def check_sparse(student, indices, teacher_values, labels=None, *, grad_output=None, fn=None,
                 grad_atol=2e-5, **options):
    """Runs ``kdfast.sparse_kd_loss`` (or ``fn``) forward + backward and checks the loss and
    the student's gradient against the float64 reference.

    All math is float32 (float64 for float64 students): the loss meets the float32
    tolerance whatever the input dtypes (low-precision inputs are exact in float64), and
    the gradient differs from the reference by its rounding to the student's dtype at most
    (relative ``eps`` of that dtype, plus ``grad_atol`` of the gradient's largest entry)."""
    loss, grad = run_sparse(student, indices, teacher_values, labels, grad_output=grad_output, fn=fn,
                            **options)
    ref_loss, ref_grad = ref_sparse_and_grad(student, indices, teacher_values, labels,
                                             grad_output=grad_output, **options)
    want = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == want, loss.dtype
    assert loss.shape == ref_loss.shape, (loss.shape, ref_loss.shape)
    assert grad.shape == student.shape and grad.dtype == student.dtype, (grad.shape, grad.dtype)
    rtol, atol = loss_tolerance(student.dtype, options)
    _close(loss, ref_loss, rtol, atol, "loss")
    scale = float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    if grad.dtype == torch.float64:
        _close(grad, ref_grad, 1e-8, 1e-10 * max(scale, 1e-2), "grad_student")
    elif grad.dtype in LOW_PRECISION:
        _close(grad, ref_grad, torch.finfo(grad.dtype).eps, grad_atol * max(scale, 1e-2), "grad_student")
    else:
        _close(grad, ref_grad, 1e-4, grad_atol * max(scale, 1e-2), "grad_student")
    return loss, grad


# ----------------------------------------------------------------------------- per-ISA cases


def run_isa_cases() -> None:
    """Cases for each CPU instruction-set build: rows across the chunk boundaries of every
    vector width (chunks of 256 / 512 float32 elements, 128 / 256 float64), every student
    dtype with every value dtype, both tails and value kinds, the cross-entropy at T != 1,
    leading all -inf chunks (the running maximum starts later), a label on and off the
    support, the recomputed float16 gradient, and denormals flushed or not."""
    cases = [
        # (V, K, student dtype, values dtype, options)
        (255, 9, torch.float32, torch.float32, dict(tail="residual", temperature=2.0, alpha=0.3)),
        (257, 64, torch.float32, torch.bfloat16, dict(temperature=0.5)),
        (513, 33, torch.bfloat16, torch.float32, dict(tail="residual", values="probs")),
        (1025, 17, torch.float16, torch.float16, dict(alpha=0.5, temperature=3.0)),
        (4099, 128, torch.float32, torch.float16, dict(tail="residual", alpha=0.2)),
        (511, 5, torch.float64, torch.float64, dict(tail="residual", temperature=1.5, alpha=0.4)),
        (129, 129, torch.float64, torch.float64, dict(values="probs")),
        (7, 3, torch.bfloat16, torch.bfloat16, dict(tail="residual", temperature=2.0, alpha=1.0)),
    ]
    for v, k, s_dtype, v_dtype, options in cases:
        s = logits((3, v), dtype=s_dtype)
        idx, val, _ = topk_teacher((3,), v, k, values=options.get("values", "logprobs"), dtype=v_dtype,
                                   temperature=options.get("temperature", 1.0))
        y = labels_for((3,), v, ignore_every=0)
        y[0] = idx[0, k // 2]  # a label on the support
        check_sparse(s, idx, val, y if options.get("alpha") else None, reduction="none", **options)
        if v > 300:  # the first chunk(s) masked: the running maximum starts in a later chunk
            masked = s.clone()
            masked[:, : v // 2] = -math.inf
            ok = idx >= v // 2
            check_sparse(masked, torch.where(ok, idx, -1), val, y if options.get("alpha") else None,
                         reduction="sum", **options)
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        s = logits((2, 300))
        idx, val, _ = topk_teacher((2,), 300, 10)
        s[torch.arange(2)[:, None], idx] += 60.0  # off-support mass ~1e-26: near the float32 floor
        check_sparse(s, idx, val, None, tail="residual", reduction="none")
    torch.set_flush_denormal(False)
