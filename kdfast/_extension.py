"""Loads the compiled ``kdfast._C`` module, or explains how to build it.

Importing ``kdfast._C`` registers the ``torch.ops.kdfast`` operators. When the
module is missing (a source checkout that was never built, a wheel for another
platform) or disabled with ``KDFAST_DISABLE_EXTENSION=1``, kdfast still imports and
its public functions fall back to the plain-PyTorch reference in
:mod:`kdfast.reference`, after one warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the kdfast checkout "
    "(CPU kernels always; CUDA kernels when torch has CUDA and a CUDA toolkit is found)"
)

_C: ModuleType | None = None
_load_error: str | None = None
_warned: set = set()

if os.environ.get("KDFAST_DISABLE_EXTENSION", "") not in ("", "0"):
    _load_error = "disabled by KDFAST_DISABLE_EXTENSION"
else:
    try:
        _C = importlib.import_module("kdfast._C")  # registers torch.ops.kdfast.*
    except ImportError as exc:  # pragma: no cover - exercised by the fallback test
        _load_error = str(exc)


def has_extension() -> bool:
    """True when the compiled kernels are loaded (``kdfast._C`` imported)."""
    return _C is not None


def warn_fallback(device_type: str) -> None:
    """Warns once per device type that the plain-PyTorch reference replaces the kernels."""
    if device_type in _warned:
        return
    _warned.add(device_type)
    if _C is None:
        why = f"the compiled extension kdfast._C is not available ({_load_error})"
    else:
        why = f"kdfast._C was built without {device_type} kernels"
    warnings.warn(
        f"kdfast: {why}; using the slow plain-PyTorch reference on {device_type}. "
        f"To get the fused kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether ``torch.ops.kdfast.<op_name>`` has a kernel for ``device_type``.

    Asks the dispatcher, so it reflects what was actually compiled and loaded.

    Example::

        >>> kdfast.has_kernel("kd_loss_fused", "cpu")
        True
    """
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type.lower(), device_type)
    dump = torch._C._dispatch_dump(f"kdfast::{op_name}")
    return any(line.startswith(f"{key}:") for line in dump.splitlines())


def _kernel_table() -> dict:
    """(op name, device type) -> has a kernel, for every kdfast op, read once at import."""
    if _C is None:
        return {}
    ops = [name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
           if name.startswith("kdfast::")]
    return {(op, dev): has_kernel(op, dev) for op in ops for dev in ("cpu", "cuda")}


_KERNELS = _kernel_table()


def has_kernel_cached(op_name: str, device_type: str) -> bool:
    """:func:`has_kernel` from a table built at import (the dispatcher does not change
    afterwards); a plain dict lookup, so ``torch.compile`` traces through it."""
    return _KERNELS.get((op_name, device_type), False)


def build_info() -> dict:
    """Facts about the build: version, CUDA support and architectures, CPU ISA.

    Example::

        >>> kdfast.build_info()["cpu_capability"]
        'AVX512'
    """
    from kdfast import __version__

    info: dict = {"version": __version__, "torch": torch.__version__, "extension": _C is not None}
    if _C is None:
        info["extension_error"] = _load_error
        return info
    info.update(
        extension_version=_C.__version__,
        with_cuda=bool(_C.with_cuda),
        cuda_archs=_C.cuda_archs.split(";") if _C.cuda_archs else [],
        cpu_capabilities_built=list(_C.cpu_capabilities_built()),
        cpu_capability=_C.cpu_capability(),
    )
    return info
