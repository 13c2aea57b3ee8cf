"""Checkpoints of the training layer: atomic writes and the random-number state."""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["capture_rng", "load_checkpoint", "restore_rng", "save_checkpoint"]

FORMAT = "kdfast-distiller"
VERSION = 1


def capture_rng(generators: list[torch.Generator] = ()) -> dict[str, Any]:
    """Every random-number state a training step can consume: torch (CPU and each CUDA
    device), Python's ``random``, NumPy's global state when NumPy is loaded, and the
    given generators (e.g. a ``DataLoader``'s)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    return state


def restore_rng(state: dict[str, Any], generators: list[torch.Generator] = ()) -> None:
    """Undo :func:`capture_rng` (the generators in the same order)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    saved = state.get("generators", [])
    if len(saved) != len(generators):
        raise ValueError(f"checkpoint holds {len(saved)} data-loader generator states, the data now "
                         f"has {len(generators)}: resume with the same data loaders")
    for g, s in zip(generators, saved):
        g.set_state(s)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder,
    flushed and fsynced, then renamed over ``path`` (a crash leaves the old file or the
    new one, never a torn one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (checks its format tag)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a kdfast Distiller checkpoint")
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {payload['version']}; this kdfast "
                         f"reads up to {VERSION}")
    return payload
