"""Every CPU instruction-set build of the kernels, not just the one this CPU picks.

The kernels are compiled for DEFAULT, AVX2 and AVX-512 and chosen at run time from
``ATEN_CPU_CAPABILITY`` / the CPU. Each narrower build runs here in a subprocess on
cases that cross vector tails and chunk boundaries, every dtype pair and -inf masks,
and is checked against the float64 reference there.
"""

from __future__ import annotations

import pytest
from isa_runner import run_with_capability

CHILD = """
    from kd_helpers import check_against_reference, labels_for, logits

    cases = [
        # (shape, student dtype, teacher dtype, options)
        ((5, 37), torch.float32, torch.float32, dict(temperature=2.0, alpha=0.3)),
        ((3, 2049), torch.float32, torch.float32, dict(divergence="reverse_kl", temperature=0.5)),
        ((2, 4100), torch.float32, torch.float32, dict(divergence="jsd", beta=0.3, alpha=1.0)),
        ((2, 3, 301), torch.bfloat16, torch.float32, dict(temperature=4.0, alpha=0.3, reduction="sum")),
        ((4, 129), torch.float16, torch.bfloat16, dict(divergence="jsd", reduction="none")),
        ((3, 77), torch.float64, torch.float64, dict(divergence="reverse_kl", alpha=0.5)),
    ]
    for i, (shape, s_dtype, t_dtype, options) in enumerate(cases):
        s, t = logits(shape, dtype=s_dtype), logits(shape, dtype=t_dtype)
        s[..., 5] = float("-inf")
        t[..., 5] = float("-inf")
        labels = labels_for(shape[:-1], shape[-1])
        labels[labels == 5] = 6
        # Both the student-only gradient (kept exponentials) and student + teacher.
        check_against_reference(s, t, labels, teacher_grad=i % 2 == 0, **options)
        check_against_reference(s * 8, t * 8, labels, teacher_grad=i % 2 == 1, softcap=6.0, **options)
    # JSD rows whose mixture underflows in float32 (log space), with denormals flushed too.
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        s = torch.tensor([[0.0, -95.0], [0.0, -float("inf")], [0.0, -48.0]])
        t = torch.tensor([[0.0, -87.0], [0.0, -87.0], [0.0, -43.6]])
        check_against_reference(s, t, None, teacher_grad=True, divergence="jsd", reduction="none",
                                eager_rule=True)
    torch.set_flush_denormal(False)
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability, needs_extension):
    run_with_capability(capability, CHILD)
