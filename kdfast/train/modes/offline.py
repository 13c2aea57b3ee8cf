"""Offline distillation: students trained from a teacher cache, with no teacher forward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdfast._args import FEATURE_KINDS
from kdfast.cache.dataset import TeacherBatch
from kdfast.train.hooks import FeatureTap
from kdfast.train.modes.base import DistillMode, StepOutput, as_pairs, check_choice, check_real
from kdfast.train.modes.feature import _rows, make_adapter, match_features

__all__ = ["Offline"]

TAILS = ("renormalize", "residual")
FEATURE_MATCHING = ("hint", "direct")


class Offline(DistillMode):
    r"""Distillation from a teacher cache (:mod:`kdfast.cache`): the teacher ran once, when
    :meth:`kdfast.cache.TeacherCache.build` stored its outputs, and training reads them
    back instead of running it. The loss is Hinton, Vinyals & Dean's ("Distilling the
    Knowledge in a Neural Network", 2015) against the stored distribution::

        loss = (1 - alpha) * T^2 * D(p_t || q_s) + alpha * CE(s, y)
               + feature_weight * sum_pairs L_feat(student_module_out, cached_feature)

    with ``q_s = softmax(s / T)`` and, per storage of the cache:

    * ``Dense`` (the logits ``t``): ``D = KL(softmax(t / T) || q_s)`` with
      :func:`kdfast.kd_loss`; any ``T`` works, the logits are stored before it.
    * ``TopK`` (the ``k`` most likely ids ``S`` with their log-probabilities at the build's
      ``T``) and ``Sampled`` (``S`` = the ids drawn, ``p_j`` = draws / draws in all), with
      :func:`kdfast.sparse_kd_loss`: ``tail="renormalize"``:
      ``D = sum_S p^_j (log p^_j - log q_j)``, ``p^ = p / sum_S p``; ``tail="residual"``:
      ``D = sum_S p_j (log p_j - log q_j) + r_t (log r_t - log r_s)`` with the mass
      outside ``S``, ``r_t = 1 - sum_S p`` and ``r_s = 1 - sum_S q``. With ``k = V`` both
      equal the dense loss. The stored probabilities belong to the build's ``T``, so
      ``temperature`` must be that one (or ``None``).

    As in :class:`~kdfast.train.Soft`, rows whose label is ``ignore_index`` (or batches
    without labels) still get the divergence: then it is averaged over every row and
    the cross-entropy over the labelled ones; when every row is labelled it is one
    fused call. Rows of the token layout past a sample's length are padding and count
    in neither.

    Cached features (``features=`` of the build, e.g. a teacher's hidden states) are
    matched with :func:`kdfast.feature_loss` against the output of a student module
    (read with a forward hook): per sample (``[B, D]`` or ``[B, C, H, W]`` maps, per
    position) or per token (``[B, L, D]``, the rows the mask keeps). With
    ``feature_matching="hint"`` (FitNets, Romero et al., ICLR 2015) a regressor built on
    the first batch (a linear layer, or a 1x1 convolution for maps) maps the student's
    width to the feature's; it trains with the student. ``"direct"`` needs equal widths.

    Batches are the ``(inputs, labels, TeacherBatch)`` tuples of
    ``kdfast.cache.CachedDataset(dataset, cache).loader(...)``; the student is called on
    ``inputs`` (a tensor, or a mapping as keyword arguments).

    Args:
        temperature: ``T > 0``; ``None``: the cache's.
        alpha: weight of the hard-label cross-entropy, in ``[0, 1]``.
        tail: ``"renormalize"`` or ``"residual"`` (top-k and sampled caches).
        feature_pairs: ``{student_module_path: cached_feature_name}`` (or a sequence of
            ``(path, name)`` pairs); ``None``: no feature term.
        feature_matching: ``"hint"`` (with a regressor) or ``"direct"``.
        distance: ``"mse"``, ``"l1"``, ``"smooth_l1"`` or ``"cosine"`` (feature term).
        normalize: L2-normalise the feature vectors first.
        feature_weight: weight of the feature term.
        backend, ignore_index, forward: see :class:`DistillMode`.

    With ``feature_pairs``, call :meth:`prepare` (the :class:`~kdfast.train.Distiller`
    does) on a first batch before building the optimizer, so the regressors exist.
    There is no teacher model: :meth:`eval_teacher` is ``None`` (no agreement metric).

    Example::

        >>> import tempfile
        >>> from torch.utils.data import TensorDataset
        >>> from kdfast.cache import CachedDataset, TeacherCache, TopK
        >>> data = TensorDataset(torch.randn(64, 8), torch.randint(0, 5, (64,)))
        >>> teacher, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
        >>> cache = TeacherCache.build(tempfile.mkdtemp(), teacher, data, storage=TopK(k=3),
        ...                            temperature=2.0, progress=False, fsync=False)
        >>> loader = CachedDataset(data, cache).loader(batch_size=16, shuffle=True)
        >>> mode = kdfast.train.Offline(alpha=0.1, tail="residual")
        >>> result = kdfast.train.Distiller(student, mode, epochs=2, progress=False).fit(loader)
    """

    name = "offline"
    needs_teacher = False

    def __init__(self, *, temperature: float | None = None, alpha: float = 0.1, tail: str = "renormalize",
                 feature_pairs: Mapping[str, str] | Sequence[str | tuple[str, str]] | None = None,
                 feature_matching: str = "hint", distance: str = "mse", normalize: bool = False,
                 feature_weight: float = 1.0, backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(None, backend=backend, ignore_index=ignore_index, forward=forward)
        self.temperature = None if temperature is None else check_real(
            "Offline", "temperature", temperature, low=0.0, low_open=True)
        self.alpha = check_real("Offline", "alpha", alpha, low=0.0, high=1.0)
        self.tail = check_choice("Offline", "tail", tail, TAILS)
        self.pairs = [] if feature_pairs is None else as_pairs("Offline", feature_pairs)
        self.feature_matching = check_choice("Offline", "feature_matching", feature_matching,
                                             FEATURE_MATCHING)
        self.distance = check_choice("Offline", "distance", distance, FEATURE_KINDS)
        if not isinstance(normalize, bool):
            raise TypeError(f"Offline: normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.feature_weight = check_real("Offline", "feature_weight", feature_weight, low=0.0)
        self.adapters = nn.ModuleList()
        self._student_tap: tuple[int, FeatureTap] | None = None

    # -- batches --------------------------------------------------------------------------

    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None, TeacherBatch]:
        """``(inputs, labels, teacher_batch)`` of a collated cache batch."""
        if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[2], TeacherBatch):
            return batch[0], batch[1], batch[2]
        if isinstance(batch, (tuple, list)):
            got = f"a {type(batch).__name__} of ({', '.join(type(b).__name__ for b in batch)})"
        else:
            got = f"a {type(batch).__name__}"
        raise TypeError(f"Offline: a batch must be (inputs, labels, TeacherBatch) as collated by "
                        f"kdfast.cache.CachedDataset(dataset, cache).loader(...), got {got}; train from a "
                        "teacher cache through CachedDataset (or use the 'soft' mode with a live teacher)")

    # -- the loss ---------------------------------------------------------------------------

    def _check_vocab(self, student_logits: torch.Tensor, teacher: TeacherBatch) -> None:
        vocab = teacher.vocab_size
        if vocab is None and teacher.indices is None:
            vocab = teacher.values.shape[-1]
        if vocab is not None and student_logits.shape[-1] != vocab:
            raise ValueError(f"Offline: the cache holds the teacher's distribution over {vocab} classes but "
                             f"the student outputs {student_logits.shape[-1]}; distillation needs the same "
                             "classes in the same order")

    def _real_labels(self, student_logits: torch.Tensor, labels: torch.Tensor | None,
                     teacher: TeacherBatch) -> tuple[torch.Tensor | None, bool]:
        """The labels with the padded rows set to ``ignore_index``, and whether a real
        (not padded) row has no label."""
        if labels is None:
            return None, True
        mask = teacher.mask
        if mask is None:
            return labels, self.has_unlabelled(labels)
        mask = mask.to(labels.device)
        extra = labels.shape[-1] - mask.shape[-1]
        if labels.dim() != 2 or extra < 0:
            raise ValueError(f"Offline: labels must be [B, L'] with L' >= {mask.shape[-1]} (the teacher "
                             f"batch's rows) in the token layout, got {list(labels.shape)}")
        mask = torch.nn.functional.pad(mask, (0, extra), value=False)
        real = labels.masked_fill(~mask, self.ignore_index)
        return real, bool(((real == self.ignore_index) & mask).any())

    def loss_from_logits(self, student_logits: torch.Tensor, labels: torch.Tensor | None,
                         teacher: TeacherBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The response loss (no feature term) of ``student_logits`` (``[B, V]`` or
        ``[B, L', V]``) against a teacher batch."""
        self._check_vocab(student_logits, teacher)
        temperature = teacher.temperature if self.temperature is None else self.temperature
        kw: dict[str, Any] = dict(temperature=temperature, ignore_index=self.ignore_index, losses=self.losses)
        if teacher.indices is not None:
            if temperature != teacher.temperature:
                raise ValueError(f"Offline: temperature={temperature} but the cache stores the teacher's "
                                 f"{teacher.values_kind} at T = {teacher.temperature}; use temperature=None "
                                 "or build the cache at the temperature wanted")
            kw["tail"] = self.tail
        real, unlabelled = self._real_labels(student_logits, labels, teacher)
        if self.alpha > 0 and not unlabelled:
            loss = teacher.loss(student_logits, real, alpha=self.alpha, **kw)
            return loss, {"kd": loss.detach()}
        kd = teacher.loss(student_logits, None, **kw)
        if self.alpha == 0 or real is None:
            return kd, {"kd": kd.detach()}
        ce = self.cross_entropy(student_logits, real)
        return (1 - self.alpha) * kd + self.alpha * ce, {"kd": kd.detach(), "ce": ce.detach()}

    # -- features ----------------------------------------------------------------------------

    def _tap(self, student: nn.Module) -> FeatureTap:
        if self._student_tap is None or self._student_tap[0] != id(student):
            if self._student_tap is not None:
                self._student_tap[1].remove()
            tap = FeatureTap(student, [path for path, _ in self.pairs], role="Offline: the student")
            self._student_tap = (id(student), tap)
        return self._student_tap[1]

    def _feature_rows(self, student: nn.Module, teacher: TeacherBatch
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student_feature, cached_feature)`` per pair, the per-token ones reduced to
        the rows the teacher batch's mask keeps (``[R, D]``)."""
        tap = self._tap(student)
        out = []
        for path, name in self.pairs:
            if name not in teacher.features:
                raise ValueError(f"Offline: the cache has no feature {name!r} (its features: "
                                 f"{sorted(teacher.features)}); build it with features={{{name!r}: ...}}")
            sf, tf = tap[path], teacher.features[name].to(tap[path].device)
            where = (f"Offline: student {path!r} {tuple(sf.shape)} vs cached feature {name!r} "
                     f"{tuple(tf.shape)}")
            if name in teacher.token_features and teacher.mask is not None:
                seq = tf.shape[1]
                if sf.dim() != tf.dim() or sf.shape[0] != tf.shape[0] or sf.shape[1] < seq:
                    raise ValueError(f"{where}: a per-token feature needs a [B, L', ...] student output "
                                     f"with L' >= {seq}")
                mask = teacher.mask.to(sf.device)
                sf, tf = sf[:, :seq][mask], tf[mask]
            elif sf.dim() != tf.dim() or sf.shape[0] != tf.shape[0]:
                raise ValueError(f"{where}: the outputs differ in rank or batch size")
            if _rows(sf).shape[:-1] != _rows(tf).shape[:-1]:
                raise ValueError(f"{where}: the positions (all but the channel dim) differ")
            if self.feature_matching == "direct" and _rows(sf).shape[-1] != _rows(tf).shape[-1]:
                raise ValueError(f"{where}: feature_matching='direct' needs equal widths; use 'hint' for a "
                                 "learned regressor")
            out.append((sf, tf))
        return out

    def feature_loss(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The feature term (unweighted) over ``(student_feature, cached_feature)`` pairs."""
        if self.feature_matching == "hint" and len(self.adapters) != len(self.pairs):
            raise RuntimeError("Offline: the hint regressors do not exist yet; call "
                               "mode.prepare(student, batch) before building the optimizer")
        total = None
        for i, (sf, tf) in enumerate(rows):
            adapter = self.adapters[i] if self.feature_matching == "hint" else None
            term = match_features(self.losses, sf, tf, adapter, distance=self.distance,
                                  normalize=self.normalize)
            total = term if total is None else total + term
        return total

    # -- the contract ----------------------------------------------------------------------------

    def prepare(self, student: nn.Module, batch: Any) -> None:
        """Checks the batch and, with ``feature_pairs``, the student's modules against the
        cached features, and builds the hint regressors."""
        inputs, _, teacher = self.split(batch)
        if not self.pairs:
            return
        tap = self._tap(student)
        tap.clear()
        with torch.no_grad():
            self._check_vocab(self.logits(student, inputs), teacher)
            rows = self._feature_rows(student, teacher)
        tap.clear()
        if self.feature_matching == "hint" and len(self.adapters) == 0:
            device = next(student.parameters()).device
            dtype = torch.float64 if any(sf.dtype == torch.float64 for sf, _ in rows) else torch.float32
            for sf, tf in rows:
                self.adapters.append(make_adapter(sf, tf, device=device, dtype=dtype))

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels, teacher = self.split(batch)
        if self.pairs:
            self._tap(student).clear()
        s = self.logits(student, inputs)
        loss, parts = self.loss_from_logits(s, labels, teacher)
        if self.pairs:
            feat = self.feature_loss(self._feature_rows(student, teacher))
            self._tap(student).clear()            # drop the graph references the hooks hold
            loss = loss + self.feature_weight * feat
            parts["feature"] = feat.detach()
        return StepOutput(loss, s, labels, parts)

    def close(self) -> None:
        if self._student_tap is not None:
            self._student_tap[1].remove()
            self._student_tap = None

    def extra_repr(self) -> str:
        pairs = f", feature_pairs={self.pairs}" if self.pairs else ""
        return (f"temperature={self.temperature}, alpha={self.alpha}, tail={self.tail!r}{pairs}, "
                f"{super().extra_repr()}")
