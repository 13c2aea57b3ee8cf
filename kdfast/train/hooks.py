"""Forward hooks that capture the outputs of named submodules (for feature distillation)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureTap", "get_module"]


def get_module(model: nn.Module, path: str, *, role: str = "model") -> nn.Module:
    """The submodule of ``model`` at the dotted ``path`` (``""``: the model itself).

    Raises ``ValueError`` naming ``role`` and the closest existing paths when there is none.
    """
    if not isinstance(path, str):
        raise TypeError(f"{role} module path must be a str, got {type(path).__name__}")
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        some = ", ".join(map(repr, names[:12])) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"{role} has no submodule {path!r}{hint} (its modules: {some})") from None


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]           # e.g. a transformer block returning (hidden, attn, ...)
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot take a feature tensor from a module output of type {type(out).__name__}")


class FeatureTap:
    """Captures the outputs of the submodules of ``model`` at ``paths`` on every forward.

    ``tap[path]`` is the output of the last forward (a tensor; for a module returning a
    tuple, its first element). Hooks stay registered until :meth:`remove` (or the end of a
    ``with`` block). Captured tensors keep their autograd graph, so a loss on them trains
    the model; under ``torch.no_grad()`` (a frozen teacher) they have none.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> with FeatureTap(net, ["1"]) as tap:
        ...     _ = net(torch.randn(3, 4))
        ...     tap["1"].shape
        torch.Size([3, 8])
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], *, role: str = "model") -> None:
        self.paths = list(dict.fromkeys(paths))
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.paths:
            module = get_module(model, path, role=role)
            self._handles.append(module.register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self._out[path] = _first_tensor(output)
        return hook

    def __getitem__(self, path: str) -> torch.Tensor:
        try:
            return self._out[path]
        except KeyError:
            raise KeyError(f"no output captured for {path!r}: was the model run since the tap was "
                           "made, and does its forward pass through that module?") from None

    def clear(self) -> None:
        """Drop the captured outputs (and the graphs they hold)."""
        self._out.clear()

    def remove(self) -> None:
        """Remove the hooks and drop the captured outputs."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
