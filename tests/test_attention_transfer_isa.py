"""attention_transfer on every CPU instruction-set build of the kernels (DEFAULT, AVX2,
AVX-512), each in a subprocess that selects it with ATEN_CPU_CAPABILITY, against the
float64 reference: vector tails, both layouts, every power kind, mixed dtypes, zero maps
and the recomputing backward."""

from __future__ import annotations

import pytest
from isa_runner import run_with_capability

CHILD = """
    from at_helpers import check_against_reference, feature_map

    cases = [
        # (student shape, teacher channels, student dtype, teacher dtype, channels_last s / t)
        ((3, 37, 17, 19), 9, torch.float32, torch.float32, False, False),
        ((2, 20, 16, 16), 33, torch.float32, torch.float32, True, False),
        ((2, 35, 5, 3), 17, torch.bfloat16, torch.float32, False, True),
        ((2, 19, 7, 9), 6, torch.float16, torch.bfloat16, True, True),
        ((2, 5, 6, 7), 3, torch.float64, torch.float64, False, True),
        ((4, 40, 1, 1), 24, torch.float32, torch.float32, False, False),
        ((2, 1, 9, 9), 1, torch.float32, torch.float16, False, False),
        # rows on the vector grid: the streaming gradient stores of every dtype
        ((2, 12, 8, 8), 16, torch.bfloat16, torch.float16, False, True),
        ((2, 32, 4, 4), 16, torch.float16, torch.bfloat16, True, False),
        ((2, 8, 4, 4), 8, torch.float64, torch.float64, False, True),
        ((3, 32, 8, 8), 48, torch.float32, torch.float32, True, False),
    ]
    for i, (shape, tc, s_dtype, t_dtype, s_cl, t_cl) in enumerate(cases):
        s = feature_map(shape, dtype=s_dtype, channels_last=s_cl)
        t = feature_map((shape[0], tc, shape[2], shape[3]), dtype=t_dtype, channels_last=t_cl)
        s[-1, :, :, :2] = 0  # zero positions
        for p in (1.0, 2.0, 3.0, 2.5):
            check_against_reference(s, t, p, teacher_grad=True)
            check_against_reference(s, t, p, teacher_grad=False, grad_output=-0.75)
    zero = torch.zeros(2, 4, 5, 5)
    check_against_reference(zero, feature_map((2, 3, 5, 5)), 2.0, teacher_grad=True)
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_kernels_match_reference(capability, needs_extension):
    run_with_capability(capability, CHILD)
