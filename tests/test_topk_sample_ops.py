"""The kdfast::topk_logits / sample_logits ops: torch.library.opcheck, gradcheck (float64) of
topk_logits, torch.compile(fullgraph=True), the Philox-4x32-10 generator against its
published known answers, the documented draw rule (seed, row, draw) reproduced in plain
Python, and bad arguments named in the errors (Python API and the ops called directly)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from topk_sample_helpers import check_sample_structure, check_topk
from torch.testing._internal.optests import aot_autograd_check

import kdfast
from kdfast import reference

pytestmark = pytest.mark.usefixtures("needs_extension")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logits(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def seed_tensor(device, value=1234):
    return torch.tensor(value, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- opcheck


def _assert_raises_regex(exc, regex):
    return pytest.raises(exc, match=regex)


def test_opcheck_topk(device):
    samples = [
        (logits((5, 17), device=device).requires_grad_(True), 4, 1.0, torch.int64),
        (logits((2, 3, 9), torch.bfloat16, device).requires_grad_(True), 9, 2.0, torch.int32),
        (logits((9, 6), device=device).t().requires_grad_(True), 1, 0.5, torch.int64),
        (logits((4, 1), torch.float16, device), 1, 1.0, torch.int64),
        (logits((3, 40), torch.float64, device).requires_grad_(True), 7, 3.0, torch.int64),
    ]
    op = torch.ops.kdfast.topk_logits.default
    for args in samples:
        if not args[0].requires_grad:
            torch.library.opcheck(op, args)
            continue
        # opcheck's own AOT check sums every output into one tensor, which fails for an op
        # whose first output is an integer tensor: it runs on the logprobs alone below.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor"))
        torch.library.opcheck(op, (args[0].detach(), *args[1:]))
        for dynamic in (False, True):
            aot_autograd_check(lambda *a: op(*a)[1], args, {}, dynamic,
                               assert_raises_regex_fn=_assert_raises_regex,
                               assert_equals_fn=torch.testing.assert_close, check_gradients=True)


def test_opcheck_sample(device):
    samples = [
        (logits((5, 17), device=device), 12, 1.0, seed_tensor(device), torch.int64),
        (logits((2, 3, 9), torch.bfloat16, device), 3, 2.0, seed_tensor(device, 7), torch.int32),
        (logits((9, 6), device=device).t(), 1, 0.5, seed_tensor(device), torch.int64),
        (logits((3, 40), torch.float64, device).requires_grad_(True), 20, 1.0, seed_tensor(device),
         torch.int64),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.kdfast.sample_logits.default, args)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("shape,k,temperature", [((3, 7), 3, 1.0), ((2, 3, 5), 5, 2.5), ((4, 9), 1, 0.7)])
def test_gradcheck_topk(device, shape, k, temperature):
    x = logits(shape, torch.float64, device).requires_grad_(True)

    def fn(x):
        return kdfast.topk_logits(x, k, temperature=temperature)[1]

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_gradcheck_topk_masked(device):
    x = logits((3, 8), torch.float64, device)
    x[:, [1, 5]] = float("-inf")
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kdfast.topk_logits(x, 4)[1], (x,))


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compile_fullgraph(device, backend, fresh_dynamo):
    if backend == "inductor" and device == "cpu" and os.environ.get("ATEN_CPU_CAPABILITY"):
        # as in test_dkd_loss_ops.py: inductor's C++ kernels assume the CPU's own vector
        # width while ATen runs the narrower ISA asked for (the backward's softmax is NaN)
        pytest.skip("inductor CPU codegen with ATEN_CPU_CAPABILITY forcing a narrower ISA")
    x = logits((4, 6, 301), device=device).requires_grad_(True)

    @torch.compile(fullgraph=True, backend=backend)
    def cache_step(x):
        idx, lp = kdfast.topk_logits(x, 16, temperature=2.0)
        sidx, w = kdfast.sample_logits(x, 12, temperature=2.0)
        return idx, lp, sidx, w, (lp.exp() * 3).sum()

    idx, lp, sidx, w, total = cache_step(x)
    total.backward()
    want_idx, want_lp = kdfast.topk_logits(x.detach(), 16, temperature=2.0)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(lp, want_lp)
    check_sample_structure(sidx, w, 12, x)
    xr = x.detach().double().requires_grad_(True)
    (torch.log_softmax(xr / 2.0, -1).gather(-1, want_idx).exp() * 3).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def test_compile_with_a_generator(device, fresh_dynamo):
    """A generator object is not traceable: without fullgraph, compile breaks the graph
    there and the draws are those of eager mode for the same generator state."""
    x = logits((3, 5, 77), device=device)

    @torch.compile(backend="aot_eager")
    def draw(x, g):
        return kdfast.sample_logits(x, 12, temperature=1.5, generator=g)

    got = draw(x, torch.Generator(device=device).manual_seed(3))
    want = kdfast.sample_logits(x, 12, temperature=1.5,
                                generator=torch.Generator(device=device).manual_seed(3))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- the generator

PHILOX_KAT = """
#include <cstdint>
#include <cstdio>
#include "topk_sample_math.h"
int main() {
  using namespace kdfast::topk_sample;
  const unsigned cases[3][6] = {
      {0u, 0u, 0u, 0u, 0u, 0u},
      {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
      {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u}};
  for (const auto& c : cases) {
    const Philox4x32 out = philox4x32_10(Philox4x32{{c[0], c[1], c[2], c[3]}}, c[4], c[5]);
    std::printf("%08x %08x %08x %08x\\n", out.v[0], out.v[1], out.v[2], out.v[3]);
  }
  uint64_t a, b;
  draw_pair(0x0123456789abcdefull, 5, 3, a, b);
  std::printf("%016llx %016llx\\n", static_cast<unsigned long long>(a), static_cast<unsigned long long>(b));
  return 0;
}
"""


def philox4x32_10(ctr, key):
    """Philox-4x32-10 in plain Python, from Salmon et al. (SC 2011)."""
    m0, m1, w0, w1, mask = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c, k0, k1 = list(ctr), key[0], key[1]
    for r in range(10):
        if r:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & mask, (p0 >> 32) ^ c[3] ^ k1, p0 & mask]
    return c


KNOWN_ANSWERS = [  # Random123's published known-answer vectors of Philox-4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def draws_of_row(seed: int, row: int, n: int) -> list:
    """The documented draw rule: draw j of `row` is the 64-bit word (2 (j % 2), 2 (j % 2) + 1)
    of Philox-4x32-10 at counter (j // 2, 0, row low, row high), key (seed low, seed high)."""
    out = []
    for j in range(n):
        c = philox4x32_10((j // 2, 0, row & 0xFFFFFFFF, row >> 32), (seed & 0xFFFFFFFF, seed >> 32))
        lo, hi = c[2 * (j % 2)], c[2 * (j % 2) + 1]
        out.append(hi << 32 | lo)
    return out


def test_python_philox_known_answers():
    for ctr, key, want in KNOWN_ANSWERS:
        assert tuple(philox4x32_10(ctr, key)) == want


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_kernel_philox_known_answers(tmp_path):
    """The header both kernels use, compiled alone, gives the published answers."""
    src = tmp_path / "kat.cpp"
    src.write_text(PHILOX_KAT)
    import torch.utils.cpp_extension as ext

    includes = [f"-I{os.path.join(ROOT, 'csrc')}"] + [f"-I{p}" for p in ext.include_paths()]
    exe = tmp_path / "kat"
    subprocess.run(["c++", "-std=c++17", "-O1", *includes, str(src), "-o", str(exe)], check=True, timeout=300)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    for (_, _, want), line in zip(KNOWN_ANSWERS, lines):
        assert line.split() == [f"{w:08x}" for w in want]
    a, b = draws_of_row(0x0123456789ABCDEF, 5, 8)[6:8]
    assert lines[3].split() == [f"{a:016x}", f"{b:016x}"]


def test_draws_follow_the_documented_rule(device):
    """For the seed the op receives, each row's draws are targets floor(r Z / 2^64) on the
    integer weights round(exp((x - max) / T) 2^s), s = 51 - ceil(log2 V): with V = 64 and
    logits that are multiples of ln 2 the weights are exact powers of two on every device,
    so the walk can be reproduced in plain Python."""
    V, S, T = 64, 40, 1.0
    gen = torch.Generator().manual_seed(9)
    powers = torch.randint(-12, 1, (6, V), generator=gen)
    powers[:, 0] = 0  # the maximum: weights 2^(s + power)
    x = (powers.double() * torch.log(torch.tensor(2.0, dtype=torch.float64))).to(device)
    seed = 987654321987
    idx, w = torch.ops.kdfast.sample_logits(x, S, T, seed_tensor(device, seed), torch.int64)
    s = 51 - 6  # ceil(log2 64) = 6
    for r in range(6):
        weights = [2 ** (s + int(p)) for p in powers[r]]
        total = sum(weights)
        bounds, acc = [], 0
        for wt in weights:
            acc += wt
            bounds.append(acc)
        tokens = []
        for d in sorted((v * total) >> 64 for v in draws_of_row(seed, r, S)):
            tokens.append(next(i for i, b in enumerate(bounds) if d < b))
        distinct = sorted(set(tokens))
        want_idx = distinct + [-1] * (S - len(distinct))
        want_w = [tokens.count(t) / S for t in distinct] + [0.0] * (S - len(distinct))
        assert idx[r].tolist() == want_idx
        torch.testing.assert_close(w[r].cpu(), torch.tensor(want_w, dtype=torch.float32))


# ----------------------------------------------------------------------------- the reference path


def test_reference_agrees_with_kernels():
    x = logits((5, 300))
    x[0] = float("-inf")
    x[1, 3] = float("nan")
    ri, rl = reference.topk_logits(x, 10, temperature=1.5)
    ki, kl = kdfast.topk_logits(x, 10, temperature=1.5)
    assert torch.equal(ri, ki)
    torch.testing.assert_close(rl, kl, equal_nan=True)
    ridx, rw = reference.sample_logits(x, 12, generator=torch.Generator().manual_seed(0))
    check_sample_structure(ridx, rw, 12, x)


def test_fallback_without_extension(tmp_path):
    """With the extension disabled, the public functions run the plain-PyTorch reference."""
    code = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {ROOT!r})
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        warnings.simplefilter("ignore")
        import torch, kdfast
        from topk_sample_helpers import check_topk, check_sample_structure
        assert not kdfast.has_extension()
        x = torch.randn(4, 50)
        check_topk(x, 5, temperature=2.0)
        i, w = kdfast.sample_logits(x, 12, generator=torch.Generator().manual_seed(0))
        check_sample_structure(i, w, 12, x)
        print("ok")
    """)
    env = dict(os.environ, KDFAST_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("call,error,match", [
    (lambda x: kdfast.topk_logits(x, 0), ValueError, "topk_logits: k must be in"),
    (lambda x: kdfast.topk_logits(x, 11), ValueError, "topk_logits: k must be <= the vocabulary size"),
    (lambda x: kdfast.topk_logits(x, 4097), ValueError, "topk_logits: k must be in"),
    (lambda x: kdfast.topk_logits(x, 2.0), TypeError, "topk_logits: k must be an int"),
    (lambda x: kdfast.topk_logits(x, 2, temperature=0.0), ValueError, "topk_logits: temperature"),
    (lambda x: kdfast.topk_logits(x, 2, temperature=float("nan")), ValueError, "topk_logits: temperature"),
    (lambda x: kdfast.topk_logits(x, 2, index_dtype=torch.int16), TypeError, "topk_logits: index_dtype"),
    (lambda x: kdfast.topk_logits(x.long(), 2), TypeError, "topk_logits: teacher_logits"),
    (lambda x: kdfast.topk_logits(x[0, 0], 1), ValueError, "topk_logits: teacher_logits"),
    (lambda x: kdfast.topk_logits([1.0, 2.0], 1), TypeError, "topk_logits: teacher_logits"),
    (lambda x: kdfast.sample_logits(x, 0), ValueError, "sample_logits: num_samples must be in"),
    (lambda x: kdfast.sample_logits(x, 4097), ValueError, "sample_logits: num_samples must be in"),
    (lambda x: kdfast.sample_logits(x, 3, temperature=-1.0), ValueError, "sample_logits: temperature"),
    (lambda x: kdfast.sample_logits(x, 3, generator=3), TypeError, "sample_logits: generator"),
    (lambda x: kdfast.sample_logits(x, 3, index_dtype=torch.float32), TypeError,
     "sample_logits: index_dtype"),
    (lambda x: kdfast.sample_logits(x.int(), 3), TypeError, "sample_logits: teacher_logits"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 10))


def _topk(*args):
    return torch.ops.kdfast.topk_logits(*args)


def _sample(*args):
    return torch.ops.kdfast.sample_logits(*args)


I64 = torch.int64


@pytest.mark.parametrize("call,match", [
    (lambda x, s: _topk(x, 0, 1.0, I64), "topk_logits: k must be in"),
    (lambda x, s: _topk(x, 11, 1.0, I64), "topk_logits: k must be <= the vocabulary size 10"),
    (lambda x, s: _topk(x, 2, 0.0, I64), "topk_logits: temperature"),
    (lambda x, s: _topk(x, 2, 1.0, torch.int16), "topk_logits: index_dtype"),
    (lambda x, s: _topk(x.long(), 2, 1.0, I64), "topk_logits: teacher_logits"),
    (lambda x, s: _topk(x[0, 0], 1, 1.0, I64), "topk_logits: teacher_logits"),
    (lambda x, s: _sample(x, 0, 1.0, s, I64), "sample_logits: num_samples"),
    (lambda x, s: _sample(x, 3, float("inf"), s, I64), "sample_logits: temperature"),
    (lambda x, s: _sample(x, 3, 1.0, s.int(), I64), "sample_logits: seed must be"),
    (lambda x, s: _sample(x, 3, 1.0, s.repeat(2), I64), "sample_logits: seed must be"),
    (lambda x, s: _sample(x, 3, 1.0, s, torch.bool), "sample_logits: index_dtype"),
    (lambda x, s: _sample(x.half()[:, :0], 3, 1.0, s, I64), "sample_logits: teacher_logits must have a voc"),
])
def test_ops_check_their_arguments(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.randn(3, 10), seed_tensor("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a device mismatch")
def test_seed_on_another_device():
    with pytest.raises(RuntimeError, match="sample_logits: seed must be on the device of teacher_logits"):
        _sample(torch.randn(2, 5, device="cuda"), 3, 1.0, seed_tensor("cpu"), I64)


def test_isa_cases_in_process():
    """The cases every instruction-set build runs (tests/test_topk_sample_isa.py), here on
    the build this process uses."""
    from topk_sample_helpers import run_isa_cases

    run_isa_cases()
    check_topk(logits((2, 5)), 5)
