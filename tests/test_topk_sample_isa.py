"""topk_logits and sample_logits on every CPU instruction-set build of the kernels, not just
the one this CPU picks: the portable (DEFAULT) and AVX2 builds each run in a subprocess with
ATEN_CPU_CAPABILITY set, the build this process uses (AVX-512 here) in process; each on the
cases of topk_sample_helpers.run_isa_cases (every dtype, widths crossing vector tails and
blocks, ties, rows that raise the threshold at every vector, degenerate rows, a chi-square
test of the draws)."""

from __future__ import annotations

import pytest
import torch
from isa_runner import run_with_capability
from topk_sample_helpers import run_isa_cases

CHILD = """
    from topk_sample_helpers import run_isa_cases

    run_isa_cases()
    seed = torch.tensor(77)
    x = torch.randn(64, 3001, generator=torch.Generator().manual_seed(5))
    i, w = torch.ops.kdfast.sample_logits(x, 12, 1.0, seed, torch.int64)
    print("draws", hash(tuple(i.flatten().tolist())))
"""


def _draws_here() -> int:
    seed = torch.tensor(77)
    x = torch.randn(64, 3001, generator=torch.Generator().manual_seed(5))
    i, _ = torch.ops.kdfast.sample_logits(x, 12, 1.0, seed, torch.int64)
    return hash(tuple(i.flatten().tolist()))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability, needs_extension):
    lines = run_with_capability(capability, CHILD)
    # the same seed draws the same tokens on every instruction set (their exponentials
    # differ in the last bits, which moves a draw only when it falls that close to a
    # token's boundary: not on these 768 draws)
    assert lines[-1] == f"draws {_draws_here()}"


def test_kernels_in_use_match_reference(needs_extension):
    """The build this process picked (AVX-512 on an AVX-512 CPU with the full build)."""
    run_isa_cases()
