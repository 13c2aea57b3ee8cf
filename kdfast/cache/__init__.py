"""On-disk teacher cache: run the teacher once, train students from the cache.

For large vocabularies the full teacher logits cannot be stored; a cache keeps, per
token row, the top-k tokens with their log-probabilities (:class:`TopK`), a few
sampled tokens with draw counts (:class:`Sampled`), or, for small vocabularies, the
dense logits (:class:`Dense`), plus optional teacher features (:class:`Feature`).

- :meth:`TeacherCache.build` runs a teacher over a dataset and writes the cache:
  resumable after a crash (byte-identical result), one shard set per rank under
  ``torchrun``, a tqdm progress bar.
- :meth:`TeacherCache.open` maps it read-only: ``cache[i]`` is sample ``i``'s outputs
  as zero-copy views; :meth:`TeacherCache.verify` recomputes every checksum; opening
  with another vocabulary size, temperature or teacher raises
  :class:`CacheMismatchError`.
- :class:`CachedDataset` yields ``(inputs, targets, teacher_outputs)`` and collates
  them into a :class:`TeacherBatch`, whose :meth:`~TeacherBatch.loss` calls
  :func:`kdfast.sparse_kd_loss` (or :func:`kdfast.kd_loss` for dense caches).
- ``kdfast cache build|info|verify`` on the command line.

Example::

    >>> from kdfast.cache import CachedDataset, TeacherCache, TopK
    >>> TeacherCache.build("cache/", teacher, dataset, storage=TopK(k=64), temperature=2.0)
    >>> data = CachedDataset(dataset, TeacherCache.open("cache/", teacher=teacher))
    >>> for x, y, t in data.loader(batch_size=8, shuffle=True):
    ...     t.loss(student(x), labels=y, tail="residual").backward()

The format is specified in ``docs/cache.md``.
"""

from kdfast.cache.dataset import CachedDataset, TeacherBatch, collate_teacher
from kdfast.cache.format import (
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    Dense,
    Feature,
    Sampled,
    TopK,
    teacher_fingerprint,
)
from kdfast.cache.reader import CachedOutputs, TeacherCache

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CachedDataset",
    "CachedOutputs",
    "Dense",
    "Feature",
    "Sampled",
    "TeacherBatch",
    "TeacherCache",
    "TopK",
    "collate_teacher",
    "teacher_fingerprint",
]
