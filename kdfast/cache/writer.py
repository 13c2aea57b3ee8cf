"""Builds a teacher cache: runs the teacher over a dataset once, encodes its outputs
(top-k, sampled or dense) and writes them as shards, resumably and rank by rank.

Crash safety: a shard is written to ``*.tmp`` files, synced, renamed into place,
and then committed by atomically replacing the rank's progress file; shards end at
batch boundaries and the draws of a sampled cache come from a generator seeded by
(seed, first sample of the batch), so a build that is killed and run again redoes
only the uncommitted batches and produces the same bytes as one that never stopped.
Under ``torch.distributed`` each rank builds a contiguous slice of the samples; rank 0
writes ``header.json`` after a barrier.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from kdfast.cache import format as fmt
from kdfast.cache.format import CacheCorruptError, CacheError, CacheMismatchError

DEFAULT_SHARD_BYTES = 256 * 2**20  # shard_tokens=None: about this many bytes of records per shard
DEFAULT_BATCH_SIZE = 16


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"TeacherCache.build: temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_int(value: object, name: str, low: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"TeacherCache.build: {name} must be an int >= {low}"
                         f"{' or None' if optional else ''}, got {value!r}")
    return value


@dataclass
class _Data:
    dataset: Any
    batch_size: int | None
    collate_fn: Callable | None
    num_workers: int = 0
    pin_memory: bool = False


def resolve_data(data: object) -> _Data:
    """The map-style dataset behind ``data`` (a Dataset, a sequence, or an unshuffled
    DataLoader over one) and the loader options to keep."""
    from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

    what = "TeacherCache.build: data"
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise TypeError(f"{what} is a DataLoader over an IterableDataset; the cache keys outputs by "
                            "sample index, so it needs a map-style dataset (__len__ and __getitem__)")
        if data.batch_sampler is None:
            raise ValueError(f"{what} is a DataLoader with batch_size=None; give it a batch size or pass "
                             "the dataset and batch_size=")
        if not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                f"{what}: the DataLoader's sampler is {type(data.sampler).__name__}, but the cache is keyed "
                "by sample index and must visit the samples in order: use shuffle=False and no sampler "
                "(under torchrun each rank takes its own slice; no DistributedSampler is needed)")
        if type(data.batch_sampler) is not BatchSampler:
            raise ValueError(f"{what}: the DataLoader has a custom batch_sampler "
                             f"({type(data.batch_sampler).__name__}); pass the dataset and "
                             "batch_size= instead")
        return _Data(data.dataset, data.batch_size, data.collate_fn, data.num_workers, data.pin_memory)
    if isinstance(data, IterableDataset):
        raise TypeError(f"{what} is an IterableDataset; the cache keys outputs by sample index, so it needs "
                        "a map-style dataset (__len__ and __getitem__)")
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"{what} must be a map-style Dataset (__len__ and __getitem__) or a DataLoader over "
                        f"one, got {type(data).__name__}")
    return _Data(data, None, None)


# ---------------------------------------------------------------------------
# Teacher outputs
# ---------------------------------------------------------------------------


def default_forward(teacher: Callable, batch: Any) -> Any:
    """The default ``forward(teacher, batch)``: a dict batch is passed as keyword
    arguments (without ``labels``) and its ``attention_mask`` selects the stored token
    rows of ``[B, L, V]`` logits; a tuple / list batch passes its first element
    (``(inputs, targets)``); any
    other batch is passed as is. The teacher may return logits, an object with
    ``.logits`` (Hugging Face) or a dict with ``"logits"``."""
    if isinstance(batch, Mapping):
        logits = _logits_of(teacher(**{k: v for k, v in batch.items() if k != "labels"}))
        mask = batch.get("attention_mask") if logits.dim() == 3 else None  # not for [B, V] classifiers
        return {"logits": logits, "mask": mask}
    if isinstance(batch, (tuple, list)):
        return teacher(batch[0])
    return teacher(batch)


def _logits_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError("TeacherCache.build: the teacher's output has no logits (expected a tensor, an object "
                    f"with .logits or a dict with 'logits'), got {type(out).__name__}; pass forward=")


@dataclass
class _Outputs:
    logits: torch.Tensor  # [B, V] or [B, L, V]
    mask: torch.Tensor | None  # [B, L] bool (token layout)
    features: dict


def _normalize_outputs(out: Any, count: int, hooked: dict) -> _Outputs:
    what = "TeacherCache.build: forward"
    mask = lengths = None
    features: dict = {}
    if isinstance(out, Mapping) and "logits" in out:
        logits = out["logits"]
        mask = out.get("mask", out.get("attention_mask"))
        lengths = out.get("lengths")
        features = dict(out.get("features") or {})
    else:
        logits = _logits_of(out)
    features.update(hooked)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() not in (2, 3):
        desc = (f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, torch.Tensor)
                else type(logits).__name__)
        raise ValueError(f"{what} must give floating-point logits [B, V] (one row per sample) or [B, L, V] "
                         f"(token rows), got {desc}")
    if logits.shape[0] != count:
        raise ValueError(f"{what} gave logits for {logits.shape[0]} samples, but the batch holds {count} "
                         "(the first dimension must be the batch)")
    if logits.dim() == 2 and (mask is not None or lengths is not None):
        raise ValueError(f"{what}: a mask or lengths was given with 2-D logits [B, V]; token rows need "
                         "logits [B, L, V]")
    if logits.dim() == 3:
        b, seq = logits.shape[:2]
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=logits.device)
            if lengths.shape != (b,) or lengths.is_floating_point() or bool((lengths < 0).any()) \
                    or bool((lengths > seq).any()):
                raise ValueError(f"{what}: lengths must be {b} integers in [0, {seq}], "
                                 f"got {lengths.tolist()}")
            mask = torch.arange(seq, device=logits.device) < lengths[:, None]
        elif mask is not None:
            mask = torch.as_tensor(mask, device=logits.device)
            if mask.shape != (b, seq):
                raise ValueError(f"{what}: the mask must be [B, L] = {[b, seq]} like the logits, "
                                 f"got {list(mask.shape)}")
            mask = mask != 0
            if bool(mask.all()):
                mask = None
    return _Outputs(logits, mask, features)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: _to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # dict, OrderedDict, Hugging Face BatchEncoding, ...
        except Exception:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _teacher_device(teacher: Any) -> torch.device:
    if isinstance(teacher, torch.nn.Module):
        for p in teacher.parameters():
            return p.device
        for b in teacher.buffers():
            return b.device
    return torch.device("cpu")


def batch_seed(seed: int, first_sample: int) -> int:
    """The seed of the generator that draws a sampled cache's batch starting at
    ``first_sample``: the same batch gets the same draws in a resumed build."""
    digest = hashlib.sha256(f"kdfast-cache:{seed}:{first_sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------
# Encoding one batch
# ---------------------------------------------------------------------------


def _index_dtype(vocab_size: int) -> torch.dtype:
    return torch.int32 if vocab_size < 2**31 else torch.int64


@dataclass
class _Reduced:
    """One batch's outputs reduced on the teacher's device (what is stored, in compact
    types) and copied towards the host; ``ready`` (a CUDA event, or None) marks the end
    of the copies."""

    tensors: dict  # field name -> (tensor, element type of the field)
    lengths: torch.Tensor | None  # rows per sample (token layout)
    samples: int
    vocab: int
    layout: str
    shapes: dict  # feature name -> shape of one record
    ready: Any = None

    def arrays(self) -> tuple[dict, np.ndarray | None]:
        """``({field: numpy records}, rows per sample)``, once the copies are done."""
        if self.ready is not None:
            self.ready.synchronize()
        out = {}
        for name, (t, elem) in self.tensors.items():
            out[name] = fmt.encode_floats(t, elem) if elem in fmt.FLOAT_BY_NAME else fmt.encode_ints(t, elem)
        return out, None if self.lengths is None else self.lengths.numpy().astype(np.int64)


def _host(t: torch.Tensor) -> torch.Tensor:
    """Starts the copy of ``t`` to the host (asynchronous from CUDA, into pinned memory)."""
    return t.to("cpu", non_blocking=True) if t.device.type != "cpu" else t


def reduce_batch(out: _Outputs, storage, temperature: float, seed: int, first_sample: int,
                 features: dict) -> _Reduced:
    """Runs the top-k / sampling op on the batch's logits where they are, keeps the rows of
    the mask, narrows the types, and starts the copies to the host."""
    import kdfast

    logits, mask = out.logits, out.mask
    vocab = logits.shape[-1]
    rows = logits if logits.dim() == 2 else logits.reshape(-1, vocab)
    keep = None if mask is None else mask.reshape(-1)
    id_elem = fmt.index_type(vocab)
    tensors: dict = {}
    if isinstance(storage, fmt.TopK):
        if storage.k > vocab:
            raise ValueError(f"TeacherCache.build: storage TopK(k={storage.k}) needs k <= the vocabulary "
                             f"size, which is {vocab}")
        idx, logp = kdfast.topk_logits(rows, storage.k, temperature=temperature,
                                       index_dtype=_index_dtype(vocab))
        if keep is not None:
            idx, logp = idx[keep], logp[keep]
        value_elem = fmt.FLOAT_DTYPES[storage.dtype]
        tensors["indices"] = (idx, id_elem)
        tensors["values"] = (logp.to(storage.dtype), value_elem)
    elif isinstance(storage, fmt.Sampled):
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(batch_seed(seed, first_sample))
        idx, probs = kdfast.sample_logits(rows, storage.num_samples, temperature=temperature, generator=gen,
                                          index_dtype=_index_dtype(vocab))
        if keep is not None:
            idx, probs = idx[keep], probs[keep]
        counts = torch.round(probs * storage.num_samples).to(torch.int32)
        idx = torch.where(counts > 0, idx, torch.zeros_like(idx))
        count_elem = fmt.count_type(storage.num_samples)
        tensors["indices"] = (idx, id_elem)
        tensors["counts"] = (counts.to(torch.uint8) if count_elem == "uint8" else counts, count_elem)
    else:
        dense = rows if keep is None else rows[keep]
        tensors["logits"] = (dense.to(storage.dtype), fmt.FLOAT_DTYPES[storage.dtype])
    lengths = None
    if logits.dim() == 3:
        b, seq = logits.shape[:2]
        lengths = (torch.full((b,), seq, dtype=torch.int64) if mask is None
                   else mask.sum(1).to(torch.int64))
    shapes = {}
    for name, spec in features.items():
        if name not in out.features:
            source = (f"the output of submodule {spec.module!r}" if spec.module
                      else "forward's 'features' dict")
            raise ValueError(f"TeacherCache.build: feature {name!r} is missing from {source}")
        t = out.features[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"TeacherCache.build: feature {name!r} must be a floating-point tensor, "
                             f"got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        if spec.per_token:
            if logits.dim() != 3 or t.dim() < 2 or tuple(t.shape[:2]) != tuple(logits.shape[:2]):
                raise ValueError(f"TeacherCache.build: per-token feature {name!r} must be [B, L, ...] with "
                                 f"the logits' [B, L] = {list(logits.shape[:-1])}, got {list(t.shape)}")
            flat = t.reshape(-1, *t.shape[2:])
            flat = flat if keep is None else flat[keep.to(flat.device)]
            shapes[name] = list(t.shape[2:])
        else:
            if t.dim() < 1 or t.shape[0] != logits.shape[0]:
                raise ValueError(f"TeacherCache.build: feature {name!r} must be [B, ...] with B = "
                                 f"{logits.shape[0]}, got {list(t.shape)}")
            flat = t
            shapes[name] = list(t.shape[1:])
        tensors[f"feature.{name}"] = (flat.to(spec.dtype), fmt.FLOAT_DTYPES[spec.dtype])
    tensors = {name: (_host(t), elem) for name, (t, elem) in tensors.items()}
    lengths = None if lengths is None else _host(lengths)
    ready = None
    if logits.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return _Reduced(tensors, lengths, logits.shape[0], vocab, "sample" if logits.dim() == 2 else "token",
                    shapes, ready)


# ---------------------------------------------------------------------------
# Shards and progress
# ---------------------------------------------------------------------------


class _ShardWriter:
    """The ``.tmp`` files of one shard being written, with running checksums."""

    def __init__(self, folder: str, stem: str, fields: dict, first_sample: int) -> None:
        self.folder, self.stem, self.fields = folder, stem, fields
        self.first_sample, self.samples, self.rows = first_sample, 0, 0
        self.files, self.hashes, self.sizes = {}, {}, {}
        for name in fields:
            path = os.path.join(folder, f"{stem}.{name}{fmt.TMP_SUFFIX}")
            self.files[name] = open(path, "wb")  # closed in commit() / close()
            self.hashes[name] = hashlib.sha256()
            self.sizes[name] = 0
        if "offsets" in fields:
            self._write("offsets", np.zeros(1, dtype="<i8"))

    def _write(self, name: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if data.size:
            self.files[name].write(data)
            self.hashes[name].update(data)
        self.sizes[name] += data.nbytes

    def append(self, arrays: dict, lengths: np.ndarray | None, samples: int) -> None:
        rows = samples if lengths is None else int(lengths.sum())
        for name, f in self.fields.items():
            if name == "offsets":
                self._write(name, (self.rows + np.cumsum(lengths)).astype("<i8"))
                continue
            array = arrays[name]
            expected = (rows if f.per == "row" else samples) * f.record_bytes
            if array.nbytes != expected:
                raise CacheError(f"TeacherCache.build: {name} of a batch has {array.nbytes} bytes, expected "
                                 f"{expected} (shape {list(array.shape)}); the teacher's outputs "
                                 "changed shape")
            self._write(name, array)
        self.samples += samples
        self.rows += rows

    def commit(self, fsync: bool) -> dict:
        entry = {"stem": self.stem, "first_sample": self.first_sample, "samples": self.samples,
                 "rows": self.rows, "files": {}}
        for name, f in self.files.items():
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            f.close()
            final = os.path.join(self.folder, f"{self.stem}.{name}")
            os.replace(final + fmt.TMP_SUFFIX, final)
            entry["files"][name] = {"bytes": self.sizes[name], "sha256": self.hashes[name].hexdigest()}
        if fsync:
            fmt.fsync_dir(self.folder)
        self.files = {}
        return entry

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}


def load_progress(folder: str, rank: int) -> dict | None:
    path = os.path.join(folder, fmt.progress_file(rank))
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        state = fmt.loads_checked(f.read(), path)
    if state.get("format") != fmt.FORMAT_NAME or state.get("kind") != "progress":
        raise CacheCorruptError(f"{path} is not a kdfast cache progress file")
    return state


def _discard_uncommitted(folder: str, rank: int, committed: int) -> None:
    """Removes this rank's temporary files and its shard files beyond the ``committed``
    first ones (renamed but never recorded in the progress file)."""
    prefix = os.path.join(folder, f"r{rank:05d}-")
    for path in glob.glob(glob.escape(prefix) + "*"):
        base = os.path.basename(path)
        seq = base[len(f"r{rank:05d}-"):].split(".", 1)[0]
        if path.endswith(fmt.TMP_SUFFIX) or (seq.isdigit() and int(seq) >= committed):
            os.remove(path)
    tmp = os.path.join(folder, fmt.progress_file(rank) + fmt.TMP_SUFFIX)
    if os.path.exists(tmp):
        os.remove(tmp)


def _check_committed(folder: str, state: dict) -> None:
    """The committed shards of a resumed rank still have the sizes recorded for them."""
    for shard in state["shards"]:
        for name, f in shard["files"].items():
            path = os.path.join(folder, f"{shard['stem']}.{name}")
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != f["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise CacheCorruptError(f"TeacherCache.build: cannot resume: {path} is {found}, its progress "
                                        f"file says {f['bytes']} bytes; use overwrite=True to start again")


def _remove_leftovers(folder: str) -> None:
    """Progress and temporary files next to a finished cache."""
    for name in os.listdir(folder):
        if name.startswith(fmt.PROGRESS_PREFIX) or name.endswith(fmt.TMP_SUFFIX):
            if fmt.is_cache_file(name):
                os.remove(os.path.join(folder, name))


def _diff(saved: dict, now: dict, prefix: str = "") -> list:
    """``["name: saved -> now", ...]`` for the entries of two configs that differ."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} is {a!r} there but {b!r} now")
    return out


def _our_files(folder: str) -> list:
    """The files of ``folder`` that a cache build writes (what overwrite=True removes)."""
    return [os.path.join(folder, n) for n in os.listdir(folder) if fmt.is_cache_file(n)]


# ---------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------


@dataclass
class _FeatureHooks:
    handles: list = field(default_factory=list)
    captured: dict = field(default_factory=dict)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _hook_features(teacher: Any, features: dict) -> _FeatureHooks:
    hooks = _FeatureHooks()
    for name, spec in features.items():
        if spec.module is None:
            continue
        if not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"TeacherCache.build: features[{name!r}] names module {spec.module!r}, but the "
                            "teacher is not a torch.nn.Module")
        try:
            module = teacher.get_submodule(spec.module)
        except AttributeError:
            raise ValueError(f"TeacherCache.build: features[{name!r}]: the teacher has no submodule "
                             f"{spec.module!r}") from None

        def hook(_mod, _inp, output, name=name):
            if isinstance(output, (tuple, list)):
                output = output[0]
            hooks.captured[name] = output
        hooks.handles.append(module.register_forward_hook(hook))
    return hooks


def build(path: str | os.PathLike, teacher: Any, data: Any, *, storage, temperature: float = 1.0,
          batch_size: int | None = None, forward: Callable | None = None, features: Any = None,
          fingerprint: str | None = None, seed: int = 0, shard_tokens: int | None = None,
          progress: bool = True, device: str | torch.device | None = None, vocab_size: int | None = None,
          overwrite: bool = False, fsync: bool = True):
    """Implementation of :meth:`kdfast.cache.TeacherCache.build` (documented there)."""
    from kdfast.cache.reader import TeacherCache

    fmt.check_storage(storage, "TeacherCache.build: storage")
    temperature = _check_temperature(temperature)
    _check_int(batch_size, "batch_size", 1, optional=True)
    _check_int(seed, "seed", 0)
    _check_int(shard_tokens, "shard_tokens", 1, optional=True)
    _check_int(vocab_size, "vocab_size", 1, optional=True)
    feats = fmt.normalize_features(features)
    if forward is not None and not callable(forward):
        raise TypeError(f"TeacherCache.build: forward must be callable(teacher, batch), got "
                        f"{type(forward).__name__}")
    if not callable(teacher):
        raise TypeError(f"TeacherCache.build: teacher must be callable (a torch.nn.Module), got "
                        f"{type(teacher).__name__}")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
        raise ValueError(f"TeacherCache.build: fingerprint must be a non-empty str or None, got "
                         f"{fingerprint!r}")
    src = resolve_data(data)
    num = len(src.dataset)
    if num == 0:
        raise ValueError("TeacherCache.build: data is empty")
    batch_size = batch_size or src.batch_size or DEFAULT_BATCH_SIZE
    rank, world = _dist()
    folder = os.fspath(path)
    if fingerprint is None:
        fingerprint = fmt.teacher_fingerprint(teacher) if isinstance(teacher, torch.nn.Module) else None
        if fingerprint is None:
            raise TypeError("TeacherCache.build: the teacher is not a torch.nn.Module, so its fingerprint "
                            "cannot be computed: pass fingerprint='...'")
    config = {"storage": storage.to_json(), "temperature": temperature, "seed": seed,
              "batch_size": batch_size, "shard_tokens": shard_tokens,
              "features": {n: f.to_json() for n, f in feats.items()},
              "teacher_fingerprint": fingerprint, "samples": num, "world_size": world}

    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"TeacherCache.build: path {folder!r} exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    action = _check_folder(folder, config, overwrite)  # every rank decides alike, before anyone writes
    _barrier(world)
    if action == "done":  # already built with these settings
        if rank == 0:
            _remove_leftovers(folder)  # a build killed after writing its header
        _barrier(world)
        return TeacherCache.open(folder, vocab_size=vocab_size)
    if action == "clear" and rank == 0:
        for p in _our_files(folder):
            os.remove(p)
        fmt.fsync_dir(folder)
    _barrier(world)

    lo, hi = num * rank // world, num * (rank + 1) // world
    state = load_progress(folder, rank)
    if state is not None and state["config"] != config:  # pragma: no cover - rank 0 checked every rank
        raise CacheMismatchError(f"TeacherCache.build: {folder} holds an unfinished build with other "
                                 "settings")
    if state is None:
        state = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "kind": "progress",
                 "config": config, "rank": rank, "range": [lo, hi], "next_sample": lo, "vocab_size": None,
                 "layout": None, "feature_shapes": None, "shard_tokens": shard_tokens, "shards": []}
    _discard_uncommitted(folder, rank, len(state["shards"]))
    _check_committed(folder, state)

    if state["next_sample"] < hi:
        _build_rank(folder, teacher, src, state, storage, temperature, batch_size, forward, feats, seed,
                    progress, device, vocab_size, fsync, rank, world, hi)
    _barrier(world)
    if rank == 0:
        _finalize(folder, world, config, fsync)
    _barrier(world)
    return TeacherCache.open(folder)


def _check_folder(folder: str, config: dict, overwrite: bool) -> str:
    """What to do with ``folder`` before a build: ``"clear"`` (``overwrite``: remove any
    cache files, finished or not), ``"done"`` (a finished cache with these settings) or
    ``"build"`` (empty, or an unfinished build with these settings to resume). Other
    settings raise :class:`CacheMismatchError` listing the differences, a corrupt header /
    progress file :class:`CacheCorruptError`."""
    if overwrite:
        return "clear" if any(fmt.is_cache_file(n) for n in os.listdir(folder)) else "build"
    header_path = os.path.join(folder, fmt.HEADER_FILE)
    if os.path.exists(header_path):
        names, what = [fmt.HEADER_FILE], "a finished cache"
    else:
        names = sorted(n for n in os.listdir(folder)
                       if n.startswith(fmt.PROGRESS_PREFIX) and n.endswith(".json"))
        what = "an unfinished build"
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                saved = fmt.loads_checked(f.read(), path)
            saved = saved["build"] if name == fmt.HEADER_FILE else saved["config"]
        except (CacheCorruptError, KeyError) as exc:
            raise CacheCorruptError(f"TeacherCache.build: {folder} holds {what} whose {name} is corrupt "
                                    f"({exc}); use overwrite=True to replace it") from None
        if saved == config:
            continue
        raise CacheMismatchError(f"TeacherCache.build: {folder} holds {what} ({name}) with other settings: "
                                 + "; ".join(_diff(saved, config)) + ". Use another path, the same settings "
                                 "to resume, or overwrite=True to replace it")
    return "done" if names == [fmt.HEADER_FILE] else "build"


def _build_rank(folder, teacher, src: _Data, state: dict, storage, temperature, batch_size, forward, feats,
                seed, progress, device, vocab_size, fsync, rank, world, hi) -> None:
    """Runs the teacher over this rank's uncommitted batches; a writer thread encodes,
    writes and commits them behind the teacher (at most two batches behind)."""
    from torch.utils.data import DataLoader, Subset

    start = state["next_sample"]
    lo = state["range"][0]
    subset = Subset(src.dataset, range(start, hi))
    kwargs = {"batch_size": batch_size, "shuffle": False, "num_workers": src.num_workers,
              "pin_memory": src.pin_memory}
    if src.collate_fn is not None:
        kwargs["collate_fn"] = src.collate_fn
    batches = iter(DataLoader(subset, **kwargs))  # worker processes start before the writer thread
    dev = torch.device(device) if device is not None else _teacher_device(teacher)
    forward = forward or default_forward
    was_training = getattr(teacher, "training", None)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    hooks = _hook_features(teacher, feats)
    bar = _progress_bar(progress and rank == 0, total=hi - lo, initial=start - lo,
                        desc="kdfast cache build" + (f" (rank 0 of {world})" if world > 1 else ""))
    writer = _Writer(folder, rank, state, storage, feats, vocab_size, fsync, hi)
    next_sample = start
    try:
        for batch in batches:
            count = min(batch_size, hi - next_sample)
            hooks.captured.clear()
            with torch.inference_mode():
                out = forward(teacher, _to_device(batch, dev))
                out = _normalize_outputs(out, count, dict(hooks.captured))
                reduced = reduce_batch(out, storage, temperature, seed, next_sample, feats)
            del out
            writer.submit(reduced)
            next_sample += count
            if bar is not None:
                bar.update(count)
        writer.finish()
    finally:
        writer.stop()  # after an error: the batches already handed over are still written
        hooks.remove()
        if bar is not None:
            bar.close()
        if was_training:
            teacher.train()
    if next_sample != hi:
        raise CacheError(f"TeacherCache.build: the data loader stopped at sample {next_sample} of rank "
                         f"{rank}'s slice [{lo}, {hi}); it must yield every sample of the dataset")


class _Writer:
    """A thread that turns reduced batches into shards, in order: appends each to the
    open shard, closes and commits the shard when it reaches ``shard_tokens`` rows or
    the slice ends (the commit protocol is in :class:`_ShardWriter` and the progress
    file). Errors are raised in the caller at the next :meth:`submit` or :meth:`finish`."""

    def __init__(self, folder: str, rank: int, state: dict, storage, feats: dict, vocab_size: int | None,
                 fsync: bool, hi: int, depth: int = 2) -> None:
        import queue
        import threading

        self.folder, self.rank, self.state, self.storage, self.feats = folder, rank, state, storage, feats
        self.vocab_size, self.fsync, self.hi = vocab_size, fsync, hi
        self.queue: Any = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.shard: _ShardWriter | None = None
        self.fields: dict | None = None
        self.next_sample = state["next_sample"]
        self.thread = threading.Thread(target=self._run, name="kdfast-cache-writer", daemon=True)
        self.thread.start()

    def submit(self, item: _Reduced) -> None:
        import queue

        while True:
            self._raise()
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Waits until every batch is written and committed."""
        self.submit(None)
        self.thread.join()
        self._raise()

    def stop(self) -> None:
        if self.thread.is_alive():
            import queue

            while self.thread.is_alive():
                try:
                    self.queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self.thread.join()
        if self.shard is not None:
            self.shard.close()  # an unfinished shard: its .tmp files are discarded by the next run
            self.shard = None

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after an error
            try:
                self._write(item)
            except BaseException as exc:  # handed to the caller
                self.error = exc

    def _write(self, item: _Reduced) -> None:
        state = self.state
        arrays, lengths = item.arrays()
        _record_shapes(state, item.vocab, item.layout, item.shapes, self.vocab_size, self.feats)
        if self.fields is None:
            self.fields = fmt.make_fields(self.storage, item.vocab, item.layout, self.feats,
                                          state["feature_shapes"])
            if state["shard_tokens"] is None:
                row_bytes = sum(f.record_bytes for f in self.fields.values())
                state["shard_tokens"] = max(1, DEFAULT_SHARD_BYTES // max(1, row_bytes))
        if self.shard is None:
            stem = fmt.shard_stem(self.rank, len(state["shards"]))
            self.shard = _ShardWriter(self.folder, stem, self.fields, self.next_sample)
        self.shard.append(arrays, lengths, item.samples)
        self.next_sample += item.samples
        if self.shard.rows >= state["shard_tokens"] or self.next_sample >= self.hi:
            entry = self.shard.commit(self.fsync)
            self.shard = None
            state["shards"].append(entry)
            state["next_sample"] = self.next_sample
            progress = os.path.join(self.folder, fmt.progress_file(self.rank))
            fmt.write_atomic(progress, fmt.dumps_checked(state), fsync=self.fsync)


def _record_shapes(state: dict, vocab: int, layout: str, shapes: dict, vocab_size: int | None,
                   feats: dict) -> None:
    if vocab_size is not None and vocab != vocab_size:
        raise CacheMismatchError(f"TeacherCache.build: vocab_size={vocab_size} was given, but the teacher's "
                                 f"logits have {vocab} columns")
    if state["vocab_size"] is None:
        state["vocab_size"], state["layout"], state["feature_shapes"] = vocab, layout, shapes
        return
    for what, saved, now in (("vocabulary size", state["vocab_size"], vocab),
                             ("layout", state["layout"], layout),
                             ("feature shapes", state["feature_shapes"], shapes)):
        if saved != now:
            raise CacheError(f"TeacherCache.build: the teacher's {what} changed from {saved!r} to {now!r} "
                             "between batches")


def _progress_bar(enabled: bool, **kwargs):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(unit="sample", dynamic_ncols=True, **kwargs)


def _finalize(folder: str, world: int, config: dict, fsync: bool) -> None:
    """Rank 0 after every rank finished: checks the ranks agree, writes ``header.json``
    and removes the progress files."""
    states = []
    for r in range(world):
        s = load_progress(folder, r)
        if s is None:
            raise CacheError(f"TeacherCache.build: rank {r} left no progress file in {folder}")
        if s["config"] != config:
            raise CacheMismatchError(f"TeacherCache.build: rank {r} was built with other settings than rank "
                                     f"0: "
                                     + "; ".join(_diff(s["config"], config)))
        if s["next_sample"] != s["range"][1]:
            raise CacheError(f"TeacherCache.build: rank {r} has not finished (next sample "
                             f"{s['next_sample']}, slice {s['range']})")
        states.append(s)
    measured = [s for s in states if s["vocab_size"] is not None]
    first = measured[0]
    for s in measured[1:]:
        for key in ("vocab_size", "layout", "feature_shapes"):
            if s[key] != first[key]:
                raise CacheMismatchError(f"TeacherCache.build: rank {s['rank']} has {key} {s[key]!r}, rank "
                                         f"{first['rank']} {first[key]!r}")
    storage = fmt.storage_from_json(config["storage"])
    feats = {n: fmt.Feature(per_token=f["per_token"], dtype=fmt.FLOAT_BY_NAME[f["dtype"]], module=f["module"])
             for n, f in config["features"].items()}
    fields = fmt.make_fields(storage, first["vocab_size"], first["layout"], feats, first["feature_shapes"])
    shards = [shard for s in states for shard in s["shards"]]
    header = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "storage": config["storage"],
        "values": storage.values,
        "layout": first["layout"],
        "vocab_size": first["vocab_size"],
        "temperature": config["temperature"],
        "teacher_fingerprint": config["teacher_fingerprint"],
        "seed": config["seed"],
        "samples": config["samples"],
        "rows": sum(s["rows"] for s in shards),
        "shard_tokens": first["shard_tokens"],
        "fields": {n: f.to_json() for n, f in fields.items()},
        "features": {n: {**f.to_json(), "shape": first["feature_shapes"][n]} for n, f in feats.items()},
        "shards": shards,
        "build": config,
    }
    fmt.write_atomic(os.path.join(folder, fmt.HEADER_FILE), fmt.dumps_checked(header), fsync=fsync)
    for r in range(world):
        os.remove(os.path.join(folder, fmt.progress_file(r)))
    if fsync:
        fmt.fsync_dir(folder)

