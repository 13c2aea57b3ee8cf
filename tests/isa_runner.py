"""Runs test code under another CPU instruction-set build of the kernels.

The kernels are compiled for DEFAULT, AVX2 and AVX-512 and picked at run time from
``ATEN_CPU_CAPABILITY`` / the CPU, once per process: a build other than the one this
process uses runs in a subprocess. Shared by the ``tests/test_*_isa.py`` files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import kdfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

_PROLOGUE = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import kdfast
print(kdfast.build_info()["cpu_capability"])
torch.manual_seed(0)
"""

_END = "isa-runner: body finished"


def run_with_capability(capability: str, body: str, timeout: int = 600) -> list[str]:
    """Runs ``body`` (Python source; the checkout and tests/ on ``sys.path``, torch and
    kdfast imported, ``torch.manual_seed(0)`` called) in a subprocess whose kernels are the
    ``capability`` build ("default", "avx2", "avx512").

    Skips when kdfast was built without that build, or when this CPU cannot run it
    (AVX-512 only: DEFAULT and AVX2 always run on an AVX2 machine, so a mismatch there
    fails). Fails unless the body ran to its end. Returns the lines the body printed.
    """
    built = [c.lower() for c in kdfast.build_info()["cpu_capabilities_built"]]
    if capability not in built:
        pytest.skip(f"kdfast was built without the {capability} CPU kernels ({built})")
    source = (_PROLOGUE.format(root=ROOT, tests=TESTS) + textwrap.dedent(body)
              + f"\nprint({_END!r})\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.splitlines()
    in_use = lines[0] if lines else "?"
    if proc.returncode == 0 and in_use != capability.upper() and capability == "avx512":
        pytest.skip(f"this CPU cannot run the {capability} kernels (got {in_use})")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert in_use == capability.upper(), f"kernels in use: {in_use}, asked for {capability}"
    assert lines[-1] == _END, proc.stdout[-2000:]
    return lines[1:-1]
