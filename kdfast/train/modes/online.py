"""Online distillation: peers that teach each other while they all train."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdfast.train._batch import check_sequence_of_modules
from kdfast.train.modes.base import DistillMode, StepOutput, check_classes, check_real

__all__ = ["Online"]


class Online(DistillMode):
    r"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning",
    CVPR 2018): ``K >= 2`` networks train together from scratch, each learning the labels
    and the other networks' predictions. Network ``i`` (the student is network 0, the
    ``peers`` are networks ``1 .. K-1``) minimises

    .. math:: L_i = \mathrm{CE}(z_i, y) + \frac{1}{K-1} \sum_{j \ne i} T^2\,
              \mathrm{KL}\big(\mathrm{softmax}(z_j / T) \,\|\, \mathrm{softmax}(z_i / T)\big)

    and the step's loss is :math:`\sum_i L_i`, each KL term one
    ``self.losses.kd_loss(z_i, z_j, temperature=T)`` call. The cross-entropy is averaged
    over the labelled rows; the KL terms over every row, so unlabelled rows (label
    ``ignore_index`` or no labels) still carry the mutual terms.

    Which gradient a KL term sends where, per ``peer_gradient``:

    * ``False`` (default, the paper's objective): the target ``z_j`` of ``L_i`` is
      detached, so network ``i``'s parameters receive exactly :math:`\nabla L_i` and
      network ``j`` is not pushed towards ``i`` by ``L_i``. All ``K`` networks are updated
      from the same forward pass (the paper updates them one after the other, recomputing
      the predictions between updates; with one optimizer step for all they are
      simultaneous).
    * ``True`` (the joint objective): nothing is detached and ``kd_loss``'s teacher
      gradient flows into ``z_j`` too, so every network descends :math:`\sum_i L_i` as a
      whole: ``KL(p_j || p_i)`` also moves ``p_j`` towards ``p_i`` (a reverse-KL pull
      on network ``j``), a gradient the per-network objectives do not have.

    The loss value is the same either way. The peers are submodules of the mode
    (an ``nn.ModuleList``): :class:`~kdfast.train.Distiller` trains them with the
    student, ``.to()`` moves them and checkpoints save them. Evaluation reports the
    student's agreement with the first peer (:meth:`eval_teacher`).

    Args:
        peers: one or more models with the student's classes, trained alongside it
            (not the student itself, and sharing no parameter with it).
        temperature: ``T > 0`` of the mutual terms (the paper's is 1).
        peer_gradient: ``False``: each network's own objective (targets detached);
            ``True``: the joint objective (gradients through the targets).
        backend, ignore_index, forward: see :class:`DistillMode`.

    Parts reported: ``ce<i>`` and ``kl<i>`` (the averaged KL term of :math:`L_i`) per
    network ``i`` (0 = the student).

    Example::

        >>> peer, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
        >>> mode = kdfast.train.Online([peer])
        >>> out = mode(student, (torch.randn(16, 8), torch.randint(0, 5, (16,))))
        >>> out.loss.backward()
        >>> sorted(out.parts), peer.weight.grad is not None
        (['ce0', 'ce1', 'kl0', 'kl1'], True)
    """

    name = "online"
    needs_teacher = False

    def __init__(self, peers: nn.Module | Sequence[nn.Module], *, temperature: float = 1.0,
                 peer_gradient: bool = False, backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(None, backend=backend, ignore_index=ignore_index, forward=forward)
        fn = "Online"
        models = check_sequence_of_modules(fn, "peers", peers)
        for i, m in enumerate(models):
            for j in range(i):
                if models[j] is m:
                    raise ValueError(f"{fn}: peers[{j}] and peers[{i}] are the same model; every peer "
                                     "must be a separately built model")
        self.peers = nn.ModuleList(models)
        self.temperature = check_real(fn, "temperature", temperature, low=0.0, low_open=True)
        if not isinstance(peer_gradient, bool):
            raise TypeError(f"{fn}: peer_gradient must be a bool, got {type(peer_gradient).__name__}")
        self.peer_gradient = peer_gradient

    def models(self, student: nn.Module) -> list[nn.Module]:
        """All networks that learn from each other: ``[student, *peers]``."""
        return [student, *self.peers]

    def _check_student(self, student: nn.Module) -> None:
        for i, peer in enumerate(self.peers):
            if peer is student:
                raise ValueError(f"Online: peers[{i}] is the student itself; give separately built models")

    def prepare(self, student: nn.Module, batch: Any) -> None:
        """Checks that no peer is, or shares a parameter with, the student."""
        self._check_student(student)
        own = {id(p) for p in student.parameters()}
        for i, peer in enumerate(self.peers):
            if any(id(p) in own for p in peer.parameters()):
                raise ValueError(f"Online: peers[{i}] shares parameters with the student; mutual "
                                 "learning needs separate networks")

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        self._check_student(student)
        inputs, labels = self.unpack(batch)
        logits = [self.logits(m, inputs) for m in self.models(student)]
        for i, z in enumerate(logits[1:]):
            check_classes("Online", logits[0], z, f"peer {i}")
        targets = logits if self.peer_gradient else [z.detach() for z in logits]
        k = len(logits)
        total = logits[0].new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for i, z in enumerate(logits):
            ce = self.cross_entropy(z, labels)
            kl = sum(self.losses.kd_loss(z, targets[j], temperature=self.temperature)
                     for j in range(k) if j != i) / (k - 1)
            total = total + ce + kl
            parts[f"ce{i}"], parts[f"kl{i}"] = ce.detach(), kl.detach()
        return StepOutput(total, logits[0], labels, parts)

    def eval_teacher(self) -> nn.Module:
        """The first peer: evaluation reports the student's agreement with it."""
        return self.peers[0]

    def extra_repr(self) -> str:
        return (f"peers={len(self.peers)}, temperature={self.temperature}, "
                f"peer_gradient={self.peer_gradient}, {super().extra_repr()}")
