"""Shared fixtures: device parametrisation (CPU always, CUDA when a kernel is built
and a GPU is present), fixed seeds, and the import path of the checkout."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import kdfast  # noqa: E402


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    if not kdfast.has_kernel("kd_loss_fused", "cuda"):
        return "kdfast was built without CUDA kernels (kdfast::kd_loss_fused has no CUDA kernel)"
    return None


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=[pytest.mark.cuda,
                        pytest.mark.skipif(cuda_skip_reason() is not None,
                                           reason=cuda_skip_reason() or "")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def needs_extension():
    if not kdfast.has_extension():
        pytest.skip("the compiled extension kdfast._C is not built")


@pytest.fixture
def fresh_dynamo():
    """A clean torch._dynamo state before and after a torch.compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
