"""Reads a finished teacher cache through read-only (copy-on-write) memory maps:
``cache[i]`` is a zero-copy view of sample ``i``'s stored outputs; ``verify()``
recomputes every checksum."""

from __future__ import annotations

import bisect
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdfast.cache import format as fmt
from kdfast.cache.format import CacheCorruptError, CacheError, CacheMismatchError

MAX_MAPPED_SHARDS = 64  # shards a reader keeps mapped at once


@dataclass(frozen=True)
class Codec:
    """What decoding a cache's records needs."""

    kind: str  # "topk", "sampled", "dense"
    values: str  # "logprobs", "probs", "logits"
    layout: str  # "token" or "sample"
    index_elem: str | None  # element type of the stored token ids
    width: int  # entries per row: k, num_samples or V
    num_samples: int | None = None  # draws per row (sampled)
    temperature: float = 1.0
    token_features: tuple = ()  # names of the per-token features
    vocab_size: int | None = None  # V of the teacher's logits


@dataclass
class CachedOutputs:
    """The teacher outputs of one sample as stored: zero-copy views of the cache.

    Token layout: ``[n, K]`` for the sample's ``n`` token rows; sample layout:
    ``[K]``. ``indices``: the stored token ids (uint8 / uint16 / uint32, or uint8
    ``[..., 3]`` for 3-byte ids; None for a dense cache); ``values``: top-k
    log-probabilities (float16 / bfloat16 / float32), sampled draw counts (uint8 /
    uint16), or dense logits; ``features``: ``{name: tensor}``. :meth:`decode` gives
    what :func:`kdfast.sparse_kd_loss` takes. The views are backed by private
    (copy-on-write) maps, so writing to them never changes the file.
    """

    indices: torch.Tensor | None
    values: torch.Tensor
    features: dict
    codec: Codec = field(repr=False)

    @property
    def num_rows(self) -> int:
        """Token rows of the sample (1 in the sample layout)."""
        return 1 if self.codec.layout == "sample" else int(self.values.shape[0])

    def decode(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(indices, values)``: indices int64 with ``-1`` padding (None for dense),
        values in ``dtype``: log-probabilities (top-k), weights ``count / num_samples``
        (sampled, 0 on padding) or logits (dense).

        Example::

            >>> idx, logp = cache[0].decode()
            >>> loss = kdfast.sparse_kd_loss(student_logits, idx, logp, values=cache.values)
        """
        return decode(self.codec, self.indices, self.values, dtype)


def decode(codec: Codec, indices: torch.Tensor | None, values: torch.Tensor,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Stored records -> ``(int64 indices with -1 padding or None, values in dtype)``."""
    if codec.kind == "dense":
        return None, values.to(dtype)
    idx = fmt.decode_indices(indices, codec.index_elem)
    if codec.kind == "topk":
        return idx, values.to(dtype)
    counts = values.to(torch.int64)
    idx = torch.where(counts > 0, idx, torch.full_like(idx, -1))
    return idx, counts.to(dtype) / codec.num_samples


def _expect(path: str, name: str, have: Any, given: Any, hint: str = "") -> None:
    raise CacheMismatchError(f"teacher cache {path}: {name} is {have!r} in the cache but {given!r} was "
                             f"expected{hint}")


class TeacherCache:
    """A finished on-disk teacher cache, opened read-only.

    Build one with :meth:`build`, open it with :meth:`open` (any number of processes
    may read it at once). ``len(cache)`` samples; ``cache[i]`` their outputs as
    :class:`CachedOutputs` (zero-copy views); :meth:`collate` pads a list of them into
    a :class:`~kdfast.cache.TeacherBatch` for the loss; :meth:`verify` recomputes every
    checksum; :meth:`info` describes it.

    Example::

        >>> from kdfast.cache import TeacherCache, TopK
        >>> cache = TeacherCache.build("cache/", teacher, dataset, storage=TopK(k=64), temperature=2.0)
        >>> cache = TeacherCache.open("cache/", teacher=teacher, temperature=2.0)
        >>> idx, logp = cache[0].decode()     # [n, 64] int64, [n, 64] float32
    """

    def __init__(self, path: str, header: dict) -> None:
        self.path = path
        self.header = header
        self.storage = fmt.storage_from_json(header["storage"])
        self.fields = fmt.fields_from_json(header["fields"])
        self.shards = header["shards"]
        self._firsts = [s["first_sample"] for s in self.shards]
        self._maps: OrderedDict = OrderedDict()
        index_elem = self.fields["indices"].elem if "indices" in self.fields else None
        self.codec = Codec(kind=self.storage.kind, values=header["values"], layout=header["layout"],
                           index_elem=index_elem, width=self.storage.width(header["vocab_size"]),
                           num_samples=getattr(self.storage, "num_samples", None),
                           temperature=header["temperature"],
                           token_features=tuple(n for n, f in header["features"].items() if f["per_token"]),
                           vocab_size=header["vocab_size"])

    # -- building and opening ------------------------------------------------

    @classmethod
    def build(cls, path: str | os.PathLike, teacher: Any, data: Any, *, storage, temperature: float = 1.0,
              batch_size: int | None = None, forward=None, features=None, fingerprint: str | None = None,
              seed: int = 0, shard_tokens: int | None = None, progress: bool = True, device=None,
              vocab_size: int | None = None, overwrite: bool = False, fsync: bool = True) -> TeacherCache:
        """Runs ``teacher`` over ``data`` once and writes its outputs to the folder ``path``.

        Args:
            path: the cache's folder (created; a finished cache with the same settings
                is returned as is, an unfinished one is resumed).
            teacher: a ``torch.nn.Module`` (put in eval mode for the build, then restored)
                or any callable with ``fingerprint=``.
            data: a map-style dataset, or an unshuffled ``DataLoader`` over one (its
                ``collate_fn``, ``num_workers`` and ``batch_size`` are used). Outputs are
                keyed by sample index ``0 .. len(data) - 1``.
            storage: :class:`TopK` ``(k, dtype)``, :class:`Sampled` ``(num_samples)`` or
                :class:`Dense` ``(dtype)``.
            temperature: ``T`` of the stored log-probabilities / draws (not applied to
                dense logits, but recorded and checked all the same).
            batch_size: samples per teacher call (default: the DataLoader's, else 16).
            forward: ``forward(teacher, batch)`` -> logits ``[B, V]`` (one row per
                sample) or ``[B, L, V]`` (token rows), an object with ``.logits``, or a dict
                ``{"logits": ..., "mask": [B, L] | "lengths": [B], "features": {name: ...}}``;
                only the rows the mask keeps are stored. Default: see
                :func:`kdfast.cache.writer.default_forward` (dict batches: their
                ``attention_mask``). The batch is moved to ``device`` first.
            features: teacher features to store: names (per-sample, from ``forward``'s
                ``features``) or ``{name: Feature(per_token=..., dtype=..., module=...)}``.
            fingerprint: identifies the teacher (default: sha256 of its ``state_dict``).
            seed: seeds the draws of a sampled cache (per batch, from the seed and the
                batch's first sample index).
            shard_tokens: token rows per shard, which ends at the batch that reaches it
                (default: about 256 MiB of records).
            progress: a tqdm progress bar (rank 0).
            device: where the teacher runs (default: its parameters' device).
            vocab_size: the expected vocabulary size, checked.
            overwrite: start afresh: remove the cache files in ``path`` (finished or not,
                any settings) first. Without it, a finished cache with the same settings is
                returned, an unfinished one resumed, and other settings raise
                :class:`CacheMismatchError`.
            fsync: sync files and folder at each commit (crash safety; off only for tests
                and benchmarks).

        Under ``torch.distributed`` call it on every rank: each writes its slice of
        the samples, rank 0 writes the header, and every rank gets the opened cache.

        Returns:
            the opened :class:`TeacherCache`.
        """
        from kdfast.cache import writer

        return writer.build(path, teacher, data, storage=storage, temperature=temperature,
                            batch_size=batch_size, forward=forward, features=features,
                            fingerprint=fingerprint, seed=seed, shard_tokens=shard_tokens, progress=progress,
                            device=device, vocab_size=vocab_size, overwrite=overwrite, fsync=fsync)

    @classmethod
    def open(cls, path: str | os.PathLike, *, vocab_size: int | None = None, temperature: float | None = None,
             teacher: torch.nn.Module | None = None, fingerprint: str | None = None, storage=None,
             verify: bool = False) -> TeacherCache:
        """Opens the finished cache in ``path``, checking what is given.

        ``vocab_size``, ``temperature``, ``fingerprint`` (or ``teacher``, whose
        fingerprint is computed) and ``storage``: when given and different from the
        cache's, :class:`CacheMismatchError` names the field and both values. The
        header's checksum and every file's size are always checked
        (:class:`CacheCorruptError`); ``verify=True`` also checks every file's checksum.
        """
        folder = os.fspath(path)
        header_path = os.path.join(folder, fmt.HEADER_FILE)
        if not os.path.isdir(folder):
            raise CacheError(f"teacher cache {folder}: no such folder")
        if not os.path.exists(header_path):
            if any(fmt.is_cache_file(n) for n in os.listdir(folder)):
                raise CacheError(f"teacher cache {folder} is an unfinished build (no {fmt.HEADER_FILE} yet); "
                                 "run the same TeacherCache.build again to resume it")
            raise CacheError(f"{folder} is not a kdfast teacher cache: it has no {fmt.HEADER_FILE}")
        with open(header_path, "rb") as f:
            header = fmt.loads_checked(f.read(), header_path)
        _check_header(folder, header)
        cache = cls(folder, header)
        cache._check_files(hash_files=False)
        if vocab_size is not None and vocab_size != header["vocab_size"]:
            _expect(folder, "vocab_size", header["vocab_size"], vocab_size)
        if temperature is not None and not math.isclose(float(temperature), header["temperature"],
                                                        rel_tol=1e-12, abs_tol=0.0):
            _expect(folder, "temperature", header["temperature"], temperature)
        if teacher is not None:
            fp = fmt.teacher_fingerprint(teacher)
            if fp != header["teacher_fingerprint"]:
                _expect(folder, "teacher_fingerprint", header["teacher_fingerprint"], fp,
                        " (the teacher given is not the one the cache was built from)")
        if fingerprint is not None and fingerprint != header["teacher_fingerprint"]:
            _expect(folder, "teacher_fingerprint", header["teacher_fingerprint"], fingerprint)
        if storage is not None:
            fmt.check_storage(storage, "TeacherCache.open: storage")
            if storage.to_json() != header["storage"]:
                _expect(folder, "storage", header["storage"], storage.to_json())
        if verify:
            cache.verify()
        return cache

    # -- properties ------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``"topk"``, ``"sampled"`` or ``"dense"``."""
        return self.storage.kind

    @property
    def values(self) -> str:
        """What the decoded values are: ``"logprobs"`` (top-k), ``"probs"`` (sampled) or
        ``"logits"`` (dense); the ``values=`` of :func:`kdfast.sparse_kd_loss`."""
        return self.header["values"]

    @property
    def layout(self) -> str:
        """``"token"`` (token rows per sample) or ``"sample"`` (one row per sample)."""
        return self.header["layout"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def temperature(self) -> float:
        return self.header["temperature"]

    @property
    def fingerprint(self) -> str:
        return self.header["teacher_fingerprint"]

    @property
    def num_rows(self) -> int:
        """Token rows over all samples."""
        return self.header["rows"]

    @property
    def feature_names(self) -> list:
        return list(self.header["features"])

    def __len__(self) -> int:
        return self.header["samples"]

    def __repr__(self) -> str:
        return (f"TeacherCache({self.path!r}, {self.kind} {self.header['storage']}, samples={len(self)}, "
                f"rows={self.num_rows}, vocab_size={self.vocab_size}, temperature={self.temperature})")

    # -- reading ---------------------------------------------------------------

    def _shard(self, s: int) -> dict:
        """``{field: tensor over the whole shard}``, zero-copy on a private map (lazily;
        the :data:`MAX_MAPPED_SHARDS` most recently used shards stay mapped, since each
        map holds a file descriptor)."""
        arrays = self._maps.get(s)
        if arrays is not None:
            self._maps.move_to_end(s)
        else:
            shard = self.shards[s]
            arrays = {}
            for name, f in self.fields.items():
                elem = fmt.ELEM_TYPES[f.elem]
                shape = (f.records(shard["samples"], shard["rows"]), *f.shape)
                if f.elem == "uint24":
                    shape += (3,)
                path = os.path.join(self.path, f"{shard['stem']}.{name}")
                if math.prod(shape) == 0:
                    arr = np.zeros(shape, dtype=elem.numpy)
                else:
                    arr = np.memmap(path, mode="c", dtype=elem.numpy, shape=shape)
                arrays[name] = fmt.torch_view(arr, f.elem)
            self._maps[s] = arrays
            while len(self._maps) > MAX_MAPPED_SHARDS:
                self._maps.popitem(last=False)  # views handed out keep their own map alive
        return arrays

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point():
                i = int(i)
            else:
                raise TypeError(f"TeacherCache indices must be integers, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} is out of range for a teacher cache of {n} samples")
        s = bisect.bisect_right(self._firsts, i) - 1
        return s, i - self.shards[s]["first_sample"]

    def __getitem__(self, i: int) -> CachedOutputs:
        s, local = self._locate(i)
        arrays = self._shard(s)
        if self.layout == "token":
            offsets = arrays["offsets"]
            a, b = int(offsets[local]), int(offsets[local + 1])
            rows = slice(a, b)
        else:
            rows = local
        out = {}
        feats = {}
        for name, f in self.fields.items():
            if name == "offsets":
                continue
            value = arrays[name][rows] if f.per == "row" else arrays[name][local]
            if name.startswith("feature."):
                feats[name[len("feature."):]] = value
            else:
                out[name] = value
        values = out.get("values", out.get("counts", out.get("logits")))
        return CachedOutputs(out.get("indices"), values, feats, self.codec)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def decode(self, i: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``self[i].decode(dtype)``: int64 indices with -1 padding (None for dense) and
        float values for :func:`kdfast.sparse_kd_loss` (``values=self.values``)."""
        return self[i].decode(dtype)

    def lengths(self) -> torch.Tensor:
        """Token rows of every sample, int64 ``[len(self)]`` (ones in the sample layout)."""
        if self.layout == "sample":
            return torch.ones(len(self), dtype=torch.int64)
        parts = [self._shard(s)["offsets"].diff() for s in range(len(self.shards))]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def collate(self, items, *, dtype: torch.dtype = torch.float32, pad_to: int | None = None):
        """Pads a list of :class:`CachedOutputs` into a :class:`~kdfast.cache.TeacherBatch`
        (see :func:`kdfast.cache.collate_teacher`)."""
        from kdfast.cache.dataset import collate_teacher

        return collate_teacher(items, dtype=dtype, pad_to=pad_to)

    def close(self) -> None:
        """Drops the memory maps (views handed out keep theirs alive)."""
        self._maps = OrderedDict()

    def __getstate__(self) -> dict:
        # pickled for DataLoader workers: each process maps the files itself
        return {"path": self.path, "header": self.header}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["header"])

    # -- checks ----------------------------------------------------------------

    def _files(self):
        for shard in self.shards:
            for name, f in self.fields.items():
                yield (os.path.join(self.path, f"{shard['stem']}.{name}"), shard, name,
                       f.file_bytes(shard["samples"], shard["rows"]))

    def _check_files(self, *, hash_files: bool) -> list:
        problems = []
        for path, shard, name, expected in self._files():
            recorded = shard["files"][name]
            if not os.path.exists(path):
                problems.append(f"{path} is missing")
                continue
            size = os.path.getsize(path)
            if size != expected or recorded["bytes"] != expected:
                problems.append(f"{path} has {size} bytes, expected {expected}")
                continue
            if hash_files and fmt.file_sha256(path) != recorded["sha256"]:
                problems.append(f"{path} does not match its sha256 checksum in {fmt.HEADER_FILE}")
        if problems and not hash_files:
            raise CacheCorruptError(f"teacher cache {self.path} is corrupt: " + "; ".join(problems)
                                    + " (run verify() for a full check)")
        return problems

    def verify(self) -> dict:
        """Checks the whole cache: the header (checksum and consistency), every file's size
        and sha256, the row offsets, and that stored token ids are below the vocabulary
        size. Raises :class:`CacheCorruptError` naming every bad file; returns a summary
        when all is well: files and bytes checked, and ``other_files`` in the folder that
        are not part of the cache (ignored).

        Example::

            >>> TeacherCache.open("cache/").verify()["files"]
            3
        """
        header_path = os.path.join(self.path, fmt.HEADER_FILE)
        if not os.path.exists(header_path):
            raise CacheCorruptError(f"teacher cache {self.path}: {header_path} is missing")
        with open(header_path, "rb") as f:
            on_disk = fmt.loads_checked(f.read(), header_path)
        if on_disk != self.header:
            raise CacheCorruptError(f"{header_path} changed since the cache was opened")
        _check_header(self.path, on_disk)
        problems = self._check_files(hash_files=True)
        if not problems:
            self._maps = OrderedDict()
            problems = self._check_contents()
        if problems:
            raise CacheCorruptError(f"teacher cache {self.path} is corrupt: " + "; ".join(problems))
        files = sum(1 for _ in self._files()) + 1
        total = sum(e for *_, e in self._files()) + os.path.getsize(header_path)
        known = {os.path.basename(p) for p, *_ in self._files()} | {fmt.HEADER_FILE}
        extra = sorted(n for n in os.listdir(self.path) if n not in known)
        return {"path": self.path, "ok": True, "files": files, "bytes": total, "other_files": extra}

    def _check_contents(self) -> list:
        problems = []
        for s, shard in enumerate(self.shards):
            arrays = self._shard(s)
            stem = os.path.join(self.path, shard["stem"])
            if "offsets" in arrays:
                off = arrays["offsets"]
                if int(off[0]) != 0 or int(off[-1]) != shard["rows"] or bool((off.diff() < 0).any()):
                    problems.append(f"{stem}.offsets: the row offsets are not 0 .. {shard['rows']} in order")
            raw = arrays.get("indices")
            step = max(1, (1 << 22) // max(1, self.codec.width))  # rows per piece: int64 ids of ~32 MiB
            for start in range(0, 0 if raw is None else raw.shape[0], step):
                idx = fmt.decode_indices(raw[start:start + step], self.fields["indices"].elem)
                if idx.numel() and int(idx.max()) >= self.vocab_size:
                    problems.append(f"{stem}.indices: a token id is >= the vocabulary size {self.vocab_size}")
                    break
        self._maps = OrderedDict()
        return problems

    def info(self) -> dict:
        """The cache at a glance: storage, sizes, bytes per token / entry, features."""
        h = self.header
        data_bytes = sum(e for *_, e in self._files())
        rows = max(1, h["rows"])
        out = {
            "path": self.path,
            "format_version": h["format_version"],
            "storage": h["storage"],
            "values": h["values"],
            "layout": h["layout"],
            "vocab_size": h["vocab_size"],
            "temperature": h["temperature"],
            "teacher_fingerprint": h["teacher_fingerprint"],
            "seed": h["seed"],
            "samples": h["samples"],
            "rows": h["rows"],
            "shards": len(self.shards),
            "fields": {n: f"{f.elem} x {list(f.shape)} per {f.per}" for n, f in self.fields.items()},
            "features": h["features"],
            "bytes": data_bytes,
            "bytes_per_token": data_bytes / rows,
        }
        if self.kind != "dense":
            output_bytes = sum(f.file_bytes(s["samples"], s["rows"]) for s in self.shards
                               for n, f in self.fields.items() if not n.startswith("feature."))
            out["bytes_per_token_outputs"] = output_bytes / rows
            out["bytes_per_entry"] = output_bytes / (rows * self.codec.width)
        return out


def _check_header(path: str, h: dict) -> None:
    """Consistency of a parsed header (its checksum is already checked)."""
    if h.get("format") != fmt.FORMAT_NAME:
        raise CacheCorruptError(f"teacher cache {path}: {fmt.HEADER_FILE} is not a kdfast "
                                "teacher cache header")
    if h.get("format_version") != fmt.FORMAT_VERSION:
        raise CacheError(f"teacher cache {path}: format version {h.get('format_version')} is not supported "
                         f"by this kdfast (it reads version {fmt.FORMAT_VERSION})")
    try:
        storage = fmt.storage_from_json(h["storage"])
        fields = fmt.fields_from_json(h["fields"])
        features = {n: fmt.Feature(per_token=f["per_token"], dtype=fmt.FLOAT_BY_NAME[f["dtype"]],
                                   module=f["module"]) for n, f in h["features"].items()}
        shapes = {n: f["shape"] for n, f in h["features"].items()}
        expected = fmt.make_fields(storage, h["vocab_size"], h["layout"], features, shapes)
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheCorruptError(f"teacher cache {path}: {fmt.HEADER_FILE} is inconsistent "
                                f"({exc!r})") from None
    if expected != fields:
        raise CacheCorruptError(f"teacher cache {path}: the fields of {fmt.HEADER_FILE} do not "
                                "match its storage")
    nxt = rows = 0
    for shard in h["shards"]:
        if shard["first_sample"] != nxt or shard["samples"] < 0 or shard["rows"] < 0:
            raise CacheCorruptError(f"teacher cache {path}: shard {shard.get('stem')} does not continue at "
                                    f"sample {nxt}")
        if h["layout"] == "sample" and shard["rows"] != shard["samples"]:
            raise CacheCorruptError(f"teacher cache {path}: shard {shard['stem']} has rows != samples")
        if set(shard["files"]) != set(fields):
            raise CacheCorruptError(f"teacher cache {path}: shard {shard['stem']} lists other files "
                                    "than the fields")
        nxt += shard["samples"]
        rows += shard["rows"]
    if nxt != h["samples"] or rows != h["rows"]:
        raise CacheCorruptError(f"teacher cache {path}: the shards hold {nxt} samples / {rows} rows, the "
                                f"header says {h['samples']} / {h['rows']}")
