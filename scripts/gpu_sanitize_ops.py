#!/usr/bin/env python3
"""Small calls of ``dkd_loss``, ``feature_loss``, ``attention_transfer_loss``, ``topk_logits``,
``sample_logits`` and ``sparse_kd_loss`` that walk the code paths of their kernels, for compute-sanitizer
(``gpu_sanitize_cases.py`` does the same for ``kd_loss``)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/gpu_sanitize_ops.py -v
    python3 scripts/gpu_sanitize_ops.py --device cpu        # the same cases on the CPU kernels

The cases cover row widths with vector-width remainders (1, 7, 8, 9, 33, 1025, 4099),
every (student, teacher) dtype pair and fp64, views (rows sliced off, a one-element
storage offset, transposed leading dimensions, channels_last feature maps), every
option of each op (kinds, normalize, masks with some / no selected rows, reductions,
ignored labels, p; sparse_kd_loss: both tails and value kinds, K from 1 to 64 with and
without padding, int32 / int64 indices), forward only and forward + backward (student;
grad_output != 1; student and teacher; teacher only; a second backward with
``retain_graph=True``; sparse_kd_loss has no teacher gradient, so its ``teacher`` mode
makes the teacher's values require grad and checks that they get none).
``topk_logits`` and ``sample_logits`` (one input: every dtype) add k from 1 to V = 4099
(the largest k, 4096, in float64: the CUDA kernel's opt-in shared memory), rows of ties,
rows without a distribution (all -inf, NaN, +inf), int32 / int64 indices, num_samples up to
4096, and rows long enough for several sampling tiles per warp (V = 140000).

Every case is checked against a float64 plain-PyTorch formula on the CPU, written here
from the definitions (loss, gradients, zero gradients outside the views; the top k's
indices and log-probabilities; the samples' structure and, off the CPU, the CPU kernel's
draws for the same seed), so a kernel
that reads the wrong memory without faulting still shows up. Exit status: 0 when every
case passes, 1 when one fails (each is listed), 2 when kdfast has no kernels for the
device.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the kd_loss driver, for its runner
from gpu_sanitize_cases import _close as close_to
from gpu_sanitize_cases import run_cases

import kdfast

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
PAIRS = [(s, t) for s in ("fp32", "fp16", "bf16") for t in ("fp32", "fp16", "bf16")] + [("fp64", "fp64")]
WIDTHS = (1, 7, 8, 9, 33, 1025, 4099)
GRAD_MODES = ("bwd", "bwd_scaled", "teacher", "teacher_only", "retain")
MODES = ("fwd", *GRAD_MODES)
OPS = {"dkd": "dkd_loss_fused", "feature": "feature_loss_fused", "attention": "attention_transfer_fused",
       "topk": "topk_logits", "sample": "sample_logits", "sparse": "sparse_kd_loss_fused"}
# The one-input ops run each dtype with itself; each op runs the modes it has
# (sparse_kd_loss gives no teacher gradient).
SAME_DTYPE = [(d, d) for d in DTYPES]
OP_MODES = {"topk": ("fwd", "bwd", "bwd_scaled", "retain"), "sample": ("fwd",),
            "sparse": ("fwd", "bwd", "bwd_scaled", "teacher", "retain")}
OP_PAIRS = {"topk": SAME_DTYPE, "sample": SAME_DTYPE}


def modes_of(op: str) -> tuple:
    return OP_MODES.get(op, MODES)


def pairs_of(op: str) -> list:
    return OP_PAIRS.get(op, PAIRS)


# ---------------------------------------------------------------------------
# float64 references, from the definitions
# ---------------------------------------------------------------------------


def ref_dkd(s, t, labels, alpha, beta, temperature, ignore_index, reduction):
    s, t = s / temperature, t / temperature
    keep = labels != ignore_index
    y = torch.where(keep, labels, torch.zeros_like(labels)).unsqueeze(-1)
    target = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, y, True)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    # (target, non-target) log-probabilities; the non-target one as a logsumexp
    bs = torch.stack([ls.gather(-1, y).squeeze(-1), ls.masked_fill(target, -math.inf).logsumexp(-1)], -1)
    bt = torch.stack([lt.gather(-1, y).squeeze(-1), lt.masked_fill(target, -math.inf).logsumexp(-1)], -1)
    tckd = (bt.exp() * (bt - bs)).sum(-1)
    ns = s.masked_fill(target, -math.inf).log_softmax(-1)
    nt = t.masked_fill(target, -math.inf).log_softmax(-1)
    # the target's -inf - -inf left out before the product (a NaN there would reach the
    # gradient through where()'s other branch)
    nckd = (nt.exp() * (nt.masked_fill(target, 0.0) - ns.masked_fill(target, 0.0))).sum(-1)
    rows = torch.where(keep, temperature**2 * (alpha * tckd + beta * nckd), 0.0)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / keep.sum().clamp(min=1)


def ref_feature(s, t, mask, kind, normalize, reduction):
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if kind == "cosine":
        rows = 1 - F.cosine_similarity(s, t, dim=-1)
        per = 1
    else:
        fn = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}[kind]
        rows = fn(s, t, reduction="none").sum(-1)
        per = s.shape[-1]
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        return rows
    count = rows.numel() if mask is None else int(mask.sum())
    return rows.sum() if reduction == "sum" else rows.sum() / max(count * per, 1)


def ref_attention(s, t, p):
    def att(x):
        return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)

    return (att(s) - att(t)).pow(2).mean()


def ref_sparse(s, indices, values, labels, values_kind, tail, alpha, temperature, ignore_index, reduction,
               tail_floor):
    """sparse_kd_loss from its definition: the sparse teacher scattered into a dense row."""
    vocab = s.shape[-1]
    s2 = s.reshape(-1, vocab)
    idx = indices.reshape(-1, indices.shape[-1]).long()
    val = values.reshape(-1, values.shape[-1]).double()
    valid = idx >= 0
    safe = torch.where(valid, idx, 0)
    p_entries = torch.where(valid, val.exp() if values_kind == "logprobs" else val, 0.0)
    p = torch.zeros_like(s2).scatter_add_(1, safe, p_entries)
    support = torch.zeros_like(s2).scatter_add_(1, safe, valid.double()) > 0
    log_q = (s2 / temperature).log_softmax(-1)
    keep = p > 0
    mass = p.sum(-1)
    log_p = torch.where(keep, p, 1.0).log()
    if tail == "renormalize":
        w = p / torch.where(mass > 0, mass, 1.0)[:, None]
        log_w = torch.where(keep, w, 1.0).log()
        d = torch.where(keep, w * (log_w - torch.where(keep, log_q, 0.0)), 0.0).sum(-1)
    else:
        d = torch.where(keep, p * (log_p - torch.where(keep, log_q, 0.0)), 0.0).sum(-1)
        r_t = (1 - mass).clamp(min=0.0)
        r_s = torch.where(support, 0.0, log_q.exp()).sum(-1).clamp(min=tail_floor)
        d = d + torch.where(r_t > 0, r_t * (torch.where(r_t > 0, r_t, 1.0).log() - r_s.log()), 0.0)
    rows = (1 - alpha) * temperature**2 * d
    keep_rows = torch.ones(rows.shape, dtype=torch.bool)
    if labels is not None:
        y = labels.reshape(-1)
        keep_rows = y != ignore_index
        if alpha > 0:
            ce = -s2.log_softmax(-1).gather(1, torch.where(keep_rows, y, 0)[:, None]).squeeze(1)
            rows = rows + alpha * ce
    rows = torch.where(keep_rows, rows, 0.0).reshape(s.shape[:-1])
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / keep_rows.sum().clamp(min=1)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str                # dkd | feature | attention
    shape: tuple           # student shape as the op sees it
    student: str
    teacher: str
    mode: str
    layout: str = "contiguous"  # contiguous | rows_offset | element_offset | transposed | channels_last
    options: tuple = ()    # (name, value) pairs passed to the op
    teacher_channels: int = 0  # attention: teacher C (0: the student's)
    extra: tuple = field(default=())  # dkd: ("ignore", "some"|"all"); feature: ("mask", "some"|"none")

    @property
    def name(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.options + self.extra)
        return (f"{self.op} {'x'.join(map(str, self.shape))} {self.student}/{self.teacher} {self.mode} "
                f"{self.layout} {opts}").strip()

    @property
    def wants(self) -> tuple:
        return {"fwd": (True, False), "bwd": (True, False), "bwd_scaled": (True, False),
                "teacher": (True, True), "teacher_only": (False, True), "retain": (True, True)}[self.mode]


def make_cases() -> list:
    cases = []
    leads = ((3,), (1,), (2, 3), (5,))
    layouts_2d = ("contiguous", "rows_offset", "element_offset")
    for i, ((s, t), width) in enumerate(itertools.product(PAIRS, WIDTHS)):
        lead = leads[i % len(leads)]
        layout = ("transposed" if len(lead) == 2 and i % 2 else layouts_2d[i % 3])
        mode = MODES[i % len(MODES)]
        reduction = ("batchmean", "sum", "none")[i % 3]
        if width >= 2:
            cases.append(Case("dkd", (*lead, width), s, t, mode, layout,
                              (("alpha", (1.0, 0.5)[i % 2]), ("beta", (8.0, 2.0)[(i // 2) % 2]),
                               ("temperature", (4.0, 1.0)[(i // 3) % 2]), ("reduction", reduction)),
                              extra=(("ignore", ("none", "some", "all")[i % 3]),)))
        kind = ("mse", "l1", "smooth_l1", "cosine")[i % 4]
        cases.append(Case("feature", (*lead, width), s, t, mode, layout,
                          (("kind", kind), ("normalize", bool((i // 4) % 2)),
                           ("reduction", ("mean", "sum", "none")[i % 3])),
                          extra=(("mask", ("none", "some", "empty")[(i // 2) % 3]),)))
    sparse_modes = modes_of("sparse")
    for i, ((s, t), width) in enumerate(itertools.product(PAIRS, WIDTHS)):
        lead = leads[(i + 1) % len(leads)]
        layout = ("transposed" if len(lead) == 2 and i % 2 else layouts_2d[(i + 1) % 3])
        k = min(width, (1, 3, 16, 64)[i % 4])
        cases.append(Case("sparse", (*lead, width), s, t, sparse_modes[i % len(sparse_modes)], layout,
                          (("values", ("logprobs", "probs")[(i // 2) % 2]),
                           ("tail", ("renormalize", "residual")[i % 2]),
                           ("alpha", (0.0, 0.3)[(i // 3) % 2]), ("temperature", (1.0, 2.0)[(i // 5) % 2]),
                           ("reduction", ("batchmean", "sum", "none")[i % 3])),
                          extra=(("ignore", ("none", "some", "all")[(i // 4) % 3]), ("k", k),
                                 ("pad", bool((i // 7) % 2) and k > 1),
                                 ("index", ("int64", "int32")[i % 2]))))
    for i, ((s, t), hw) in enumerate(itertools.product(PAIRS, ((1, 1), (7, 5), (8, 8), (9, 13)))):
        cases.append(Case("attention", ((1, 2, 3)[i % 3], (1, 3, 16)[i % 3], *hw), s, t,
                          MODES[i % len(MODES)],
                          ("contiguous", "channels_last", "rows_offset")[i % 3],
                          (("p", (2.0, 1.0, 3.0, 2.5)[i % 4]),), teacher_channels=(0, 5)[i % 2]))
    return cases + make_topk_sample_cases()


def _view(layout: str, shape: tuple) -> tuple:
    """(base shape, base -> the view the op sees, memory format of the base)."""
    if layout == "contiguous":
        return shape, lambda x: x, torch.contiguous_format
    if layout == "rows_offset":
        return (shape[0] + 1, *shape[1:]), lambda x: x[1:], torch.contiguous_format
    if layout == "element_offset":
        return (math.prod(shape) + 1,), lambda x: x[1:].view(shape), torch.contiguous_format
    if layout == "transposed":
        return (shape[1], shape[0], *shape[2:]), lambda x: x.transpose(0, 1), torch.contiguous_format
    if layout == "channels_last":
        return shape, lambda x: x, torch.channels_last
    raise ValueError(layout)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> str | None:
    # the absolute floor covers gradients that are exactly 0 in float64 but rounding
    # noise in float32 (e.g. D = 1 under normalize, where only signs matter)
    return close_to(got, want, rtol, floor=rtol * 1e-3)


TOL = {"fp64": 1e-9, "fp32": 2e-4, "fp16": 4e-3, "bf16": 2e-2}


def run_case(case: Case, device: str, seed: int) -> list:
    if case.op in ("topk", "sample"):
        return run_topk_sample_case(case, device, seed)
    if case.op == "sparse":
        return run_sparse_case(case, device, seed)
    gen = torch.Generator().manual_seed(seed)
    opts = dict(case.options)
    extra = dict(case.extra)
    t_shape = case.shape
    if case.op == "attention" and case.teacher_channels:
        t_shape = (case.shape[0], case.teacher_channels, *case.shape[2:])
    inputs = []
    for which, shape in (("student", case.shape), ("teacher", t_shape)):
        base_shape, view_of, fmt = _view(case.layout, shape)
        base = (2 * torch.randn(base_shape, generator=gen)).to(DTYPES[getattr(case, which)])
        if fmt is torch.channels_last and base.dim() == 4:
            base = base.contiguous(memory_format=fmt)
        inputs.append((base, view_of))
    lead = case.shape[:-1]
    labels = mask = None
    if case.op == "dkd":
        labels = torch.randint(0, case.shape[-1], lead, generator=gen)
        flat = labels.view(-1)
        if extra["ignore"] == "all":
            flat.fill_(-100)
        elif extra["ignore"] == "some":
            flat[::2] = -100
    if case.op == "feature" and extra["mask"] != "none":
        mask = torch.rand(lead, generator=gen) < (0.5 if extra["mask"] == "some" else -1.0)

    need_s, need_t = case.wants
    backwards = 2 if case.mode == "retain" else (0 if case.mode == "fwd" else 1)

    def call(s, t, lab, msk):
        if case.op == "dkd":
            return kdfast.dkd_loss(s, t, lab, **opts)
        if case.op == "feature":
            return kdfast.feature_loss(s, t, mask=msk, **opts)
        return kdfast.attention_transfer_loss(s, t, **opts)

    per_row = opts.get("reduction") == "none"
    weights = torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5

    def grad_output(like):
        if per_row:
            w = weights if case.mode == "bwd_scaled" else torch.ones(lead, dtype=torch.float64)
        else:
            w = torch.tensor(0.37 if case.mode == "bwd_scaled" else 1.0, dtype=torch.float64)
        return w.to(device=like.device, dtype=like.dtype)

    leaves = [b.to(device).requires_grad_(need) for (b, _), need in zip(inputs, (need_s, need_t))]
    views = [v(leaf) for leaf, (_, v) in zip(leaves, inputs)]
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    if case.mode == "fwd":
        with torch.no_grad():
            loss = call(*views, dev(labels), dev(mask))
    else:
        loss = call(*views, dev(labels), dev(mask))
    for k in range(backwards):
        loss.backward(grad_output(loss), retain_graph=k + 1 < backwards)
    if device.startswith("cuda"):
        torch.cuda.synchronize()

    refs = [v(b).double().detach().requires_grad_(need and backwards > 0)
            for (b, v), need in zip(inputs, (need_s, need_t))]
    if case.op == "dkd":
        ref = ref_dkd(*refs, labels, opts["alpha"], opts["beta"], opts["temperature"], -100,
                      opts["reduction"])
    elif case.op == "feature":
        ref = ref_feature(*refs, mask, opts["kind"], opts["normalize"], opts["reduction"])
    else:
        ref = ref_attention(*refs, opts["p"])

    problems = []
    acc = "fp64" if case.student == "fp64" else "fp32"
    if (why := _close(loss, ref, 1e-9 if acc == "fp64" else 5e-4)) is not None:
        problems.append(f"loss: {why}")
    if backwards:
        ref.backward(grad_output(ref))
    for name, leaf, (_, view_of), ref_leaf, needed in zip(("student", "teacher"), leaves, inputs, refs,
                                                          (need_s, need_t)):
        if not (needed and backwards):
            if leaf.grad is not None:
                problems.append(f"{name} got a gradient it did not ask for")
            continue
        if leaf.grad is None:
            problems.append(f"{name}: no gradient")
            continue
        grad = leaf.grad.detach().cpu()
        inside = torch.zeros(grad.shape, dtype=torch.bool)
        view_of(inside).fill_(True)
        if (grad[~inside] != 0).any():
            problems.append(f"{name}: gradient written outside the view")
        if (why := _close(view_of(grad), backwards * ref_leaf.grad, TOL[getattr(case, name)])) is not None:
            problems.append(f"{name} gradient: {why}")
    return problems


# ---------------------------------------------------------------------------
# topk_logits and sample_logits
# ---------------------------------------------------------------------------

INF = float("inf")


def make_topk_sample_cases() -> list:
    cases = []
    leads = ((3,), (1,), (2, 3), (5,))
    for i, ((d, _), width) in enumerate(itertools.product(SAME_DTYPE, WIDTHS)):
        lead = leads[i % len(leads)]
        layout = ("transposed" if len(lead) == 2 and i % 2
                  else ("contiguous", "rows_offset", "element_offset")[i % 3])
        rows = ("normal", "ties", "degenerate")[i % 3]
        k = (1, min(5, width), min(width, 4096), min(64, width))[i % 4]
        index = ("int64", "int32")[i % 2]
        temperature = (1.0, 0.5, 3.0)[i % 3]
        mode = OP_MODES["topk"][i % 4] if rows != "degenerate" else "fwd"
        cases.append(Case("topk", (*lead, width), d, d, mode, layout,
                          (("k", k), ("temperature", temperature), ("index_dtype", index)),
                          extra=(("rows", rows),)))
        draws = (12, 1, 64, 4096)[i % 4]
        cases.append(Case("sample", (*lead, width), d, d, "fwd", layout,
                          (("num_samples", draws), ("temperature", temperature), ("index_dtype", index)),
                          extra=(("rows", rows),)))
    # the largest k (float64 on CUDA: more than 48 KB of shared memory), long rows (many
    # radix passes' worth of data, several sampling tiles per warp)
    cases.append(Case("topk", (2, 4099), "fp64", "fp64", "bwd", "contiguous",
                      (("k", 4096), ("temperature", 1.0), ("index_dtype", "int64")),
                      extra=(("rows", "normal"),)))
    cases.append(Case("topk", (2, 140000), "fp32", "fp32", "fwd", "rows_offset",
                      (("k", 300), ("temperature", 2.0), ("index_dtype", "int32")),
                      extra=(("rows", "ties"),)))
    cases.append(Case("sample", (2, 140000), "bf16", "bf16", "fwd", "contiguous",
                      (("num_samples", 4096), ("temperature", 1.0), ("index_dtype", "int64")),
                      extra=(("rows", "normal"),)))
    return cases


def _topk_sample_input(case: Case, gen: torch.Generator) -> tuple:
    """(base tensor, base -> the view the op sees); rows filled as case.extra says."""
    base_shape, view_of, _ = _view(case.layout, case.shape)
    base = 2 * torch.randn(base_shape, generator=gen, dtype=torch.float64)
    rows = dict(case.extra)["rows"]
    if rows == "ties":
        base = base.round()
    base = base.to(DTYPES[case.student])
    if rows == "degenerate":  # every other row: all -inf, or one NaN / +inf / -inf
        view = view_of(base)
        specials = (float("nan"), INF, -INF)
        for r, lead in enumerate(itertools.product(*map(range, case.shape[:-1]))):
            if r % 2 == 0:
                row = view[lead]  # a view: writes reach base
                if r % 4 == 0:
                    row.fill_(-INF)
                else:
                    row[r % row.numel()] = specials[(r // 4) % 3]
    return base, view_of


def _ref_topk(x: torch.Tensor, k: int, temperature: float) -> tuple:
    """Stable descending sort (NaN first, ties: lower index) and float64 log_softmax(x / T)
    gathered there; -inf for rows of only -inf, NaN for rows with NaN or +inf."""
    rows = x.reshape(-1, x.shape[-1]).double()
    idx = torch.sort(rows.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    empty = (rows == -INF).all(-1, keepdim=True)
    lp = torch.log_softmax(torch.where(empty, 0.0, rows) / temperature, dim=-1).gather(1, idx)
    lp = torch.where(empty, -INF, lp)
    return idx.reshape(*x.shape[:-1], k), lp.reshape(*x.shape[:-1], k)


def _sample_problems(idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor, draws: int) -> list:
    """Structure of sample_logits' output: per row distinct tokens ascending, each of positive
    probability, weights multiples of 1 / S summing to 1, then (-1, 0) padding; rows with no
    distribution all padding."""
    problems = []
    rows = x.reshape(-1, x.shape[-1]).double()
    defined = ~(torch.isnan(rows).any(-1) | (rows == INF).any(-1) | (rows == -INF).all(-1))
    all_i, all_w = idx.reshape(-1, draws).cpu().long(), w.reshape(-1, draws).cpu().double()
    for r, (ti, tw) in enumerate(zip(all_i, all_w)):
        n = int((ti >= 0).sum())
        if not ((ti[n:] == -1).all() and (tw[n:] == 0).all() and (tw[:n] > 0).all()):
            problems.append(f"row {r}: padding misplaced")
        if not bool(defined[r]):
            if n:
                problems.append(f"row {r}: draws from a row without a distribution")
            continue
        if n == 0 or (n > 1 and not (ti[1:n] > ti[:n - 1]).all()):
            problems.append(f"row {r}: tokens not distinct and ascending")
            continue
        if int(ti[n - 1]) >= rows.shape[-1] or not torch.isfinite(rows[r, ti[:n]]).all():
            problems.append(f"row {r}: a token outside the row or of zero probability")
        counts = tw[:n] * draws
        if not torch.allclose(counts, counts.round(), atol=1e-3) or int(counts.round().sum()) != draws:
            problems.append(f"row {r}: weights are not counts / num_samples")
    return problems


def run_topk_sample_case(case: Case, device: str, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    opts = dict(case.options)
    index_dtype = {"int64": torch.int64, "int32": torch.int32}[opts["index_dtype"]]
    base, view_of = _topk_sample_input(case, gen)
    problems = []
    if case.op == "sample":
        draws = opts["num_samples"]
        seed_t = torch.tensor(seed * 7919 + 13, dtype=torch.int64)
        x = view_of(base.to(device))
        idx, w = torch.ops.kdfast.sample_logits(x, draws, opts["temperature"], seed_t.to(device), index_dtype)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if idx.dtype != index_dtype or idx.shape != (*case.shape[:-1], draws):
            return [f"indices {idx.dtype} {tuple(idx.shape)}"]
        problems += _sample_problems(idx, w, view_of(base), draws)
        if device != "cpu":
            cpu_idx, cpu_w = torch.ops.kdfast.sample_logits(view_of(base), draws, opts["temperature"], seed_t,
                                                            index_dtype)
            if not (torch.equal(idx.cpu(), cpu_idx) and torch.equal(w.cpu(), cpu_w)):
                problems.append("draws differ from the CPU kernel's for the same seed (possible, but about "
                                "1e-7 per draw: only when a draw falls within rounding of a token boundary)")
        return problems
    k, temperature = opts["k"], opts["temperature"]
    backwards = {"fwd": 0, "bwd": 1, "bwd_scaled": 1, "retain": 2}[case.mode]
    leaf = base.to(device, copy=True).requires_grad_(backwards > 0)
    x = view_of(leaf)
    if backwards:
        idx, lp = kdfast.topk_logits(x, k, temperature=temperature, index_dtype=index_dtype)
    else:
        with torch.no_grad():
            idx, lp = kdfast.topk_logits(x, k, temperature=temperature, index_dtype=index_dtype)
    weights = (torch.rand(lp.shape, generator=gen, dtype=torch.float64) + 0.5 if case.mode == "bwd_scaled"
               else torch.ones(lp.shape, dtype=torch.float64))
    for b in range(backwards):
        lp.backward(weights.to(device=device, dtype=lp.dtype), retain_graph=b + 1 < backwards)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ref_leaf = base.to(torch.float64, copy=True).requires_grad_(backwards > 0)
    ref_idx, ref_lp = _ref_topk(view_of(ref_leaf), k, temperature)
    if idx.dtype != index_dtype or not torch.equal(idx.cpu().long(), ref_idx):
        problems.append("indices differ from the stable descending sort")
    got = lp.detach().cpu().double()
    special = ~torch.isfinite(ref_lp)
    if not (torch.equal(torch.isnan(got), torch.isnan(ref_lp)) and torch.equal(got == -INF, ref_lp == -INF)):
        problems.append("-inf / NaN log-probabilities misplaced")
    elif (why := _close(got[~special], ref_lp.detach()[~special], 1e-9 if case.student == "fp64" else 2e-5)):
        problems.append(f"logprobs: {why}")
    if backwards:
        ref_lp.backward(weights)
        grad = leaf.grad.detach().cpu()
        inside = torch.zeros(grad.shape, dtype=torch.bool)
        view_of(inside).fill_(True)
        if (grad[~inside] != 0).any():
            problems.append("gradient written outside the view")
        if (why := _close(view_of(grad), backwards * view_of(ref_leaf.grad), TOL[case.student])) is not None:
            problems.append(f"gradient: {why}")
    return problems


def run_sparse_case(case: Case, device: str, seed: int) -> list:
    """One sparse_kd_loss case: a random distinct support per row (some entries padding),
    its teacher values, the student in the case's layout; loss and gradient against the
    float64 definition, the gradient zero outside the view, none for the teacher."""
    gen = torch.Generator().manual_seed(seed)
    opts, extra = dict(case.options), dict(case.extra)
    lead, vocab, k = case.shape[:-1], case.shape[-1], extra["k"]
    rows = math.prod(lead)
    base_shape, view_of, _ = _view(case.layout, case.shape)
    base = (2 * torch.randn(base_shape, generator=gen)).to(DTYPES[case.student])
    idx = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)]) if rows else \
        torch.empty(0, k, dtype=torch.int64)
    weights = torch.rand(rows, k, generator=gen, dtype=torch.float64) + 0.05
    if extra["pad"]:
        idx[:, 1::2] = -1
        weights[:, 1::2] = 0.0
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-30) * 0.9
    vals = weights.log() if opts["values"] == "logprobs" else weights
    idx = idx.reshape(*lead, k).to(torch.int32 if extra["index"] == "int32" else torch.int64)
    vals = vals.reshape(*lead, k).to(DTYPES[case.teacher])
    labels = torch.randint(0, vocab, lead, generator=gen)
    if extra["ignore"] == "all":
        labels.fill_(-100)
    elif extra["ignore"] == "some":
        labels.view(-1)[::2] = -100

    per_row = opts["reduction"] == "none"
    row_w = torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5

    def grad_output(like):
        if per_row:
            w = row_w if case.mode == "bwd_scaled" else torch.ones(lead, dtype=torch.float64)
        else:
            w = torch.tensor(0.37 if case.mode == "bwd_scaled" else 1.0, dtype=torch.float64)
        return w.to(device=like.device, dtype=like.dtype)

    backwards = {"fwd": 0, "retain": 2}.get(case.mode, 1)
    leaf = base.to(device).requires_grad_(backwards > 0)
    dev_vals = vals.to(device).requires_grad_(case.mode == "teacher")
    call = lambda: kdfast.sparse_kd_loss(view_of(leaf), idx.to(device), dev_vals, labels.to(device),  # noqa: E731
                                         **opts)
    if case.mode == "fwd":
        with torch.no_grad():
            loss = call()
    else:
        loss = call()
    for i in range(backwards):
        loss.backward(grad_output(loss), retain_graph=i + 1 < backwards)
    if device.startswith("cuda"):
        torch.cuda.synchronize()

    ref_leaf = view_of(base).double().detach().requires_grad_(backwards > 0)
    acc = torch.float64 if case.student == "fp64" else torch.float32
    ref = ref_sparse(ref_leaf, idx, vals, labels, opts["values"], opts["tail"], opts["alpha"],
                     opts["temperature"], -100, opts["reduction"], torch.finfo(acc).tiny)
    problems = []
    if (why := _close(loss, ref, 1e-9 if case.student == "fp64" else 5e-4)) is not None:
        problems.append(f"loss: {why}")
    if dev_vals.grad is not None:
        problems.append("teacher_values got a gradient")
    if backwards:
        ref.backward(grad_output(ref))
        if leaf.grad is None:
            return [*problems, "student: no gradient"]
        grad = leaf.grad.detach().cpu()
        inside = torch.zeros(grad.shape, dtype=torch.bool)
        view_of(inside).fill_(True)
        if (grad[~inside] != 0).any():
            problems.append("student: gradient written outside the view")
        if (why := _close(view_of(grad), backwards * ref_leaf.grad, TOL[case.student])) is not None:
            problems.append(f"student gradient: {why}")
    return problems


def kernels_missing(device: str) -> list:
    return [f"kdfast::{op}" for op in OPS.values() if not kdfast.has_kernel(op, device)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="every third case only")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each case before it runs (attributes sanitizer reports to cases)")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        p.error(f"--ops: unknown {unknown} (choose from {', '.join(OPS)})")
    cases = [c for c in make_cases() if c.op in ops]
    if args.quick:
        cases = cases[::3]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_ops: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    missing = kernels_missing(args.device)
    if missing:
        print(f"gpu_sanitize_ops: no {args.device} kernel for {', '.join(missing)}", file=sys.stderr)
        return 2
    return run_cases("gpu_sanitize_ops", cases, run_case, args.device, args.seed, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
