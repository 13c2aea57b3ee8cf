"""sparse_kd_loss on every CPU instruction-set build of the kernels, not just the one this
CPU picks: the portable (DEFAULT) and AVX2 builds each run in a subprocess with
ATEN_CPU_CAPABILITY set, the build this process uses (AVX-512 here) in process; each on
the cases of sparse_helpers.run_isa_cases (chunk and vector tails, every dtype, both tails,
masked chunks, the recomputed float16 gradient, flushed denormals)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from sparse_helpers import run_isa_cases

import kdfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import kdfast
    from sparse_helpers import run_isa_cases

    print(kdfast.build_info()["cpu_capability"])
    torch.manual_seed(0)
    run_isa_cases()
    print("ok")
""")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability, needs_extension):
    built = [c.lower() for c in kdfast.build_info()["cpu_capabilities_built"]]
    if capability not in built:
        pytest.skip(f"kdfast was built without the {capability} CPU kernels ({built})")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tests=TESTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.split()
    assert lines[0] == capability.upper(), f"kernels in use: {lines[0]}, asked for {capability}"
    assert lines[-1] == "ok"


def test_kernels_in_use_match_reference(needs_extension):
    """The build this process picked (AVX-512 on an AVX-512 CPU with the full build)."""
    run_isa_cases()
