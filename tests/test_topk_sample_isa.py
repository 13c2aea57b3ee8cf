"""topk_logits and sample_logits on every CPU instruction-set build of the kernels, not just
the one this CPU picks: the portable (DEFAULT) and AVX2 builds each run in a subprocess with
ATEN_CPU_CAPABILITY set, the build this process uses (AVX-512 here) in process; each on the
cases of topk_sample_helpers.run_isa_cases (every dtype, widths crossing vector tails and
blocks, ties, rows that raise the threshold at every vector, degenerate rows, a chi-square
test of the draws)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from topk_sample_helpers import run_isa_cases

import kdfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import kdfast
    from topk_sample_helpers import run_isa_cases

    print(kdfast.build_info()["cpu_capability"])
    torch.manual_seed(0)
    run_isa_cases()
    seed = torch.tensor(77)
    x = torch.randn(64, 3001, generator=torch.Generator().manual_seed(5))
    i, w = torch.ops.kdfast.sample_logits(x, 12, 1.0, seed, torch.int64)
    print("draws", hash(tuple(i.flatten().tolist())))
    print("ok")
""")


def _draws_here() -> int:
    seed = torch.tensor(77)
    x = torch.randn(64, 3001, generator=torch.Generator().manual_seed(5))
    i, _ = torch.ops.kdfast.sample_logits(x, 12, 1.0, seed, torch.int64)
    return hash(tuple(i.flatten().tolist()))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability, needs_extension):
    built = [c.lower() for c in kdfast.build_info()["cpu_capabilities_built"]]
    if capability not in built:
        pytest.skip(f"kdfast was built without the {capability} CPU kernels ({built})")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tests=TESTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == capability.upper(), f"kernels in use: {lines[0]}, asked for {capability}"
    assert lines[-2] == "ok"
    # the same seed draws the same tokens on every instruction set (their exponentials
    # differ in the last bits, which moves a draw only when it falls that close to a
    # token's boundary: not on these 768 draws)
    assert lines[-3] == f"draws {_draws_here()}"


def test_kernels_in_use_match_reference(needs_extension):
    """The build this process picked (AVX-512 on an AVX-512 CPU with the full build)."""
    run_isa_cases()
