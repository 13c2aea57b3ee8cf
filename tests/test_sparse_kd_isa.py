"""sparse_kd_loss on every CPU instruction-set build of the kernels, not just the one this
CPU picks: the portable (DEFAULT) and AVX2 builds each run in a subprocess with
ATEN_CPU_CAPABILITY set, the build this process uses (AVX-512 here) in process; each on
the cases of sparse_helpers.run_isa_cases (chunk and vector tails, every dtype, both tails,
masked chunks, the recomputed float16 gradient, flushed denormals)."""

from __future__ import annotations

import pytest
from isa_runner import run_with_capability
from sparse_helpers import run_isa_cases

CHILD = """
    from sparse_helpers import run_isa_cases

    run_isa_cases()
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability, needs_extension):
    run_with_capability(capability, CHILD)


def test_kernels_in_use_match_reference(needs_extension):
    """The build this process picked (AVX-512 on an AVX-512 CPU with the full build)."""
    run_isa_cases()
