"""Feature distillation: FitNets hints, hidden-state matching, attention transfer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdfast._args import FEATURE_KINDS
from kdfast.train.hooks import FeatureTap, get_module
from kdfast.train.modes.base import DistillMode, StepOutput, as_pairs, check_choice, check_real
from kdfast.train.modes.soft import Soft

__all__ = ["Feature"]

KINDS = ("hint", "direct", "attention")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Per-position feature vectors: ``[N, C, H, W]`` maps channels-last, others as they are."""
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def make_adapter(student_feat: torch.Tensor, target_feat: torch.Tensor, *, device: torch.device,
                 dtype: torch.dtype) -> nn.Module:
    """The FitNets regressor from the student's feature width to the target's: a 1x1
    convolution for ``[N, C, H, W]`` maps, a linear layer on the last dim otherwise."""
    c_s, c_t = _rows(student_feat).shape[-1], _rows(target_feat).shape[-1]
    adapter = nn.Conv2d(c_s, c_t, 1) if student_feat.dim() == 4 else nn.Linear(c_s, c_t)
    return adapter.to(device=device, dtype=dtype)


def match_features(losses: Any, student_feat: torch.Tensor, target_feat: torch.Tensor,
                   adapter: nn.Module | None, *, distance: str, normalize: bool) -> torch.Tensor:
    """``losses.feature_loss`` of the student feature (through ``adapter`` when given)
    against the target, per position (channels-last for ``[N, C, H, W]`` maps); in
    float64 when either side is."""
    if adapter is not None:
        student_feat = adapter(student_feat.to(adapter.weight.dtype))
    if torch.float64 in (student_feat.dtype, target_feat.dtype):
        student_feat, target_feat = student_feat.double(), target_feat.double()
    return losses.feature_loss(_rows(student_feat), _rows(target_feat), kind=distance, normalize=normalize)


class Feature(DistillMode):
    r"""Feature distillation between named modules of the student and the teacher, alone
    or added to soft-label distillation::

        loss = base + weight * sum_pairs  L_feat(student_module_out, teacher_module_out)

    where ``base`` is the :class:`Soft` loss (``soft=True``) or the cross-entropy on the
    labels (``soft=False``), and ``L_feat`` is, per ``kind``:

    * ``"hint"`` — FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR
      2015): a regressor built on the first batch (a 1x1 convolution for ``[N, C, H, W]``
      maps, a linear layer for ``[..., D]`` features) maps the student's width to the
      teacher's, then :func:`kdfast.feature_loss` of kind ``distance`` compares them per
      position. The regressors train with the student (they are the mode's parameters).
    * ``"direct"`` — hidden-state matching with no regressor (the widths must be equal),
      e.g. TinyBERT-style layer matching with ``distance="mse"`` or ``"cosine"``.
    * ``"attention"`` — attention transfer (Zagoruyko & Komodakis, "Paying More Attention
      to Attention", ICLR 2017) with :func:`kdfast.attention_transfer_loss` on ``[N, C,
      H, W]`` maps of equal ``H, W`` (channels may differ); the paper's weight is about
      ``1e3`` for this mean-squared form.

    Modules are found by their dotted path (``model.get_submodule``) and read with forward
    hooks; a module returning a tuple gives its first element. Both models run once per
    step (the teacher without a graph).

    Args:
        teacher: the frozen teacher.
        pairs: ``{student_path: teacher_path}``, a list of ``(student_path, teacher_path)``
            or a list of paths present in both models.
        kind: ``"hint"``, ``"direct"`` or ``"attention"``.
        distance: ``"mse"``, ``"l1"``, ``"smooth_l1"`` or ``"cosine"`` (hint / direct).
        normalize: L2-normalise the feature vectors first (hint / direct).
        p: attention-map exponent (attention).
        weight: weight of the feature term.
        soft: add the soft-label loss (else the cross-entropy on labelled rows only).
        temperature, alpha: of the soft-label loss.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Call :meth:`prepare` (the :class:`~kdfast.train.Distiller` does) on a first batch
    before building the optimizer, so the regressors exist.

    Example::

        >>> teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> student = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 5))
        >>> mode = kdfast.train.Feature(teacher, {"1": "1"}, kind="hint")
        >>> batch = (torch.randn(16, 8), torch.randint(0, 5, (16,)))
        >>> mode.prepare(student, batch)                 # builds the 4 -> 32 regressor
        >>> mode(student, batch).loss.backward()
    """

    name = "feature"

    def __init__(self, teacher: nn.Module, pairs: Mapping[str, str] | Sequence[str | tuple[str, str]],
                 *, kind: str = "hint", distance: str = "mse", normalize: bool = False, p: float = 2.0,
                 weight: float = 1.0, soft: bool = True, temperature: float = 4.0, alpha: float = 0.1,
                 backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(teacher, backend=backend, ignore_index=ignore_index, forward=forward)
        self.pairs = as_pairs("Feature", pairs)
        for _, t_path in self.pairs:
            get_module(self.teacher, t_path, role="Feature: the teacher")
        self.kind = check_choice("Feature", "kind", kind, KINDS)
        self.distance = check_choice("Feature", "distance", distance, FEATURE_KINDS)
        if not isinstance(normalize, bool):
            raise TypeError(f"Feature: normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.p = check_real("Feature", "p", p, low=0.0, low_open=True)
        self.weight = check_real("Feature", "weight", weight, low=0.0)
        if not isinstance(soft, bool):
            raise TypeError(f"Feature: soft must be a bool, got {type(soft).__name__}")
        self.soft = Soft(teacher, temperature=temperature, alpha=alpha, backend=backend,
                         ignore_index=ignore_index) if soft else None
        self.adapters = nn.ModuleList()
        self._taps: dict[str, tuple[int, FeatureTap]] = {}

    def _tap(self, role: str, model: nn.Module) -> FeatureTap:
        key = id(model)
        cached = self._taps.get(role)
        if cached is None or cached[0] != key:
            if cached is not None:
                cached[1].remove()
            paths = [s if role == "student" else t for s, t in self.pairs]
            self._taps[role] = (key, FeatureTap(model, paths, role=f"Feature: the {role}"))
        return self._taps[role][1]

    def _features(self, student: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                                   list[torch.Tensor], list[torch.Tensor]]:
        s_tap, t_tap = self._tap("student", student), self._tap("teacher", self.teacher)
        t_tap.clear()
        s_tap.clear()
        t = self.teacher_logits(inputs)
        s = self.logits(student, inputs)
        s_feats = [s_tap[path] for path, _ in self.pairs]
        t_feats = [t_tap[path] for _, path in self.pairs]
        return s, t, s_feats, t_feats

    def prepare(self, student: nn.Module, batch: Any) -> None:
        inputs, _ = self.unpack(batch)
        with torch.no_grad():
            _, _, s_feats, t_feats = self._features(student, inputs)
        device = next(student.parameters()).device
        dtype = torch.float64 if any(f.dtype == torch.float64 for f in s_feats) else torch.float32
        for (s_path, t_path), sf, tf in zip(self.pairs, s_feats, t_feats):
            where = f"Feature: student {s_path!r} {tuple(sf.shape)} vs teacher {t_path!r} {tuple(tf.shape)}"
            if sf.dim() != tf.dim() or sf.shape[0] != tf.shape[0]:
                raise ValueError(f"{where}: the outputs differ in rank or batch size")
            if self.kind == "attention":
                if sf.dim() != 4 or sf.shape[2:] != tf.shape[2:]:
                    raise ValueError(f"{where}: attention transfer needs [N, C, H, W] maps of equal H, W")
                continue
            s_rows, t_rows = _rows(sf), _rows(tf)
            if s_rows.shape[:-1] != t_rows.shape[:-1]:
                raise ValueError(f"{where}: the positions (all but the channel dim) differ")
            if self.kind == "direct" and s_rows.shape[-1] != t_rows.shape[-1]:
                raise ValueError(f"{where}: kind='direct' needs equal widths; use kind='hint' for a "
                                 "learned regressor")
        if self.kind == "hint" and len(self.adapters) == 0:
            for sf, tf in zip(s_feats, t_feats):
                self.adapters.append(make_adapter(sf, tf, device=device, dtype=dtype))

    def feature_loss(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> torch.Tensor:
        """The feature term (unweighted) for captured student / teacher features."""
        if self.kind == "attention":
            return self.losses.attention_transfer_loss(s_feats, t_feats, p=self.p)
        if self.kind == "hint" and len(self.adapters) != len(self.pairs):
            raise RuntimeError("Feature: the hint regressors do not exist yet; call "
                               "mode.prepare(student, batch) before building the optimizer")
        total = None
        for i, (sf, tf) in enumerate(zip(s_feats, t_feats)):
            adapter = self.adapters[i] if self.kind == "hint" else None
            term = match_features(self.losses, sf, tf, adapter, distance=self.distance,
                                  normalize=self.normalize)
            total = term if total is None else total + term
        return total

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels = self.unpack(batch)
        s, t, s_feats, t_feats = self._features(student, inputs)
        feat = self.feature_loss(s_feats, t_feats)
        if self.soft is not None:
            base, parts = self.soft.loss_from_logits(s, t, labels)
        else:
            base = self.cross_entropy(s, labels)
            parts = {"ce": base.detach()}
        parts["feature"] = feat.detach()
        self._taps["student"][1].clear()          # drop the graph references the hooks hold
        self._taps["teacher"][1].clear()
        return StepOutput(base + self.weight * feat, s, labels, parts)

    def close(self) -> None:
        for _, tap in self._taps.values():
            tap.remove()
        self._taps.clear()

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs}, kind={self.kind!r}, distance={self.distance!r}, "
                f"weight={self.weight}, {super().extra_repr()}")
