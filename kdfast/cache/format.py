"""The on-disk format of a teacher cache: storage kinds, field encodings, the header,
checksums and file names. Nothing here runs a teacher or opens a memory map.

A cache is a folder::

    header.json                    written last: the cache is complete when it exists
    r00000-000000.indices          one file per field and shard (fixed-stride records)
    r00000-000000.values
    r00000-000000.offsets          token layout only: per-sample row offsets (int64)
    r00000-000000.feature.<name>   optional teacher features
    r00001-000000.indices          ... shards of rank 1 (multi-process builds)

Every field file is a raw little-endian array of fixed-size records (no prologue),
so ``numpy.memmap`` + ``torch.from_numpy`` read it without a copy. ``docs/cache.md``
specifies it byte by byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

FORMAT_NAME = "kdfast-teacher-cache"
FORMAT_VERSION = 1
HEADER_FILE = "header.json"
PROGRESS_PREFIX = "progress-r"
TMP_SUFFIX = ".tmp"
MAX_COUNT = 4096  # the largest k / num_samples the ops accept

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class CacheError(RuntimeError):
    """Base class of the teacher cache's errors."""


class CacheMismatchError(CacheError, ValueError):
    """The cache (or an unfinished build) was made with other settings than the ones
    given: another teacher, vocabulary size, temperature or storage."""


class CacheCorruptError(CacheError):
    """A file of the cache is missing, truncated, or differs from its checksum."""


# ---------------------------------------------------------------------------
# Element types of the fields
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ElemType:
    """How one element of a field is stored: ``nbytes`` little-endian bytes, read with
    numpy dtype ``numpy`` (``uint24`` as 3 ``uint8``), seen by torch as ``torch_view``."""

    name: str
    nbytes: int
    numpy: str
    torch_view: torch.dtype | None  # dtype of the zero-copy tensor; None: uint8 [..., nbytes]


ELEM_TYPES = {e.name: e for e in (
    ElemType("uint8", 1, "u1", torch.uint8),
    ElemType("uint16", 2, "<u2", torch.uint16),
    ElemType("uint24", 3, "u1", None),
    ElemType("uint32", 4, "<u4", torch.uint32),
    ElemType("int64", 8, "<i8", torch.int64),
    ElemType("float16", 2, "<f2", torch.float16),
    ElemType("bfloat16", 2, "<u2", torch.bfloat16),
    ElemType("float32", 4, "<f4", torch.float32),
)}

FLOAT_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
FLOAT_BY_NAME = {v: k for k, v in FLOAT_DTYPES.items()}


def index_type(vocab_size: int) -> str:
    """The narrowest element type that holds every token id of a ``vocab_size``
    vocabulary: uint8 (V <= 256), uint16 (<= 65536), uint24 (<= 2**24), else uint32."""
    for name, limit in (("uint8", 2**8), ("uint16", 2**16), ("uint24", 2**24)):
        if vocab_size <= limit:
            return name
    return "uint32"


def count_type(num_samples: int) -> str:
    """Element type of the draw counts of a sampled cache."""
    return "uint8" if num_samples <= 255 else "uint16"


def _float_name(dtype: torch.dtype, what: str) -> str:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    return FLOAT_DTYPES[dtype]


def _check_count(value: object, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ValueError(f"{what}: {name} must be an int in [1, {MAX_COUNT}], got {value!r}")
    return value


# ---------------------------------------------------------------------------
# Storage kinds
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """Store the ``k`` most likely tokens of each row: their ids (narrowest integer
    type that holds V) and their full-vocabulary log-probabilities at the cache's
    temperature in ``dtype`` (``1 - sum(exp(logprobs))`` is the missing mass, for
    ``sparse_kd_loss(tail="residual")``). 2 + 2 bytes per entry for V <= 65536,
    3 + 2 for V <= 2**24, with ``dtype=torch.float16`` / ``torch.bfloat16``."""

    k: int
    dtype: torch.dtype = torch.float16
    kind: ClassVar[str] = "topk"
    values: ClassVar[str] = "logprobs"

    def __post_init__(self) -> None:
        _check_count(self.k, "k", "TopK")
        _float_name(self.dtype, "TopK: dtype")

    def to_json(self) -> dict:
        return {"kind": self.kind, "k": self.k, "dtype": FLOAT_DTYPES[self.dtype]}

    def width(self, vocab_size: int) -> int:
        return self.k


@dataclass(frozen=True)
class Sampled:
    """Store ``num_samples`` draws per row from the teacher's softmax at the cache's
    temperature (Sparse Logit Sampling): each distinct token once, ascending, with
    its draw count (uint8 up to 255 draws, else uint16); unused slots have count 0.
    Weights are ``count / num_samples`` (``sparse_kd_loss(values="probs")``). 12 draws
    cost 12 x 3 = 36 bytes per token for V <= 65536."""

    num_samples: int = 12
    kind: ClassVar[str] = "sampled"
    values: ClassVar[str] = "probs"

    def __post_init__(self) -> None:
        _check_count(self.num_samples, "num_samples", "Sampled")

    def to_json(self) -> dict:
        return {"kind": self.kind, "num_samples": self.num_samples}

    def width(self, vocab_size: int) -> int:
        return self.num_samples


@dataclass(frozen=True)
class Dense:
    """Store the full teacher logits (before the temperature) in ``dtype``: V x 2
    bytes per row in float16 / bfloat16. For small vocabularies (classification)."""

    dtype: torch.dtype = torch.float16
    kind: ClassVar[str] = "dense"
    values: ClassVar[str] = "logits"

    def __post_init__(self) -> None:
        _float_name(self.dtype, "Dense: dtype")

    def to_json(self) -> dict:
        return {"kind": self.kind, "dtype": FLOAT_DTYPES[self.dtype]}

    def width(self, vocab_size: int) -> int:
        return vocab_size


STORAGE_KINDS = ("topk", "sampled", "dense")


def storage_from_json(spec: dict):
    """The storage object of a header's ``storage`` entry."""
    kind = spec.get("kind")
    if kind == "topk":
        return TopK(k=spec["k"], dtype=FLOAT_BY_NAME[spec["dtype"]])
    if kind == "sampled":
        return Sampled(num_samples=spec["num_samples"])
    if kind == "dense":
        return Dense(dtype=FLOAT_BY_NAME[spec["dtype"]])
    raise CacheCorruptError(f"unknown storage kind {kind!r}")


def check_storage(storage: object, what: str = "storage") -> None:
    if not isinstance(storage, (TopK, Sampled, Dense)):
        raise TypeError(f"{what} must be kdfast.cache.TopK(k), Sampled(num_samples) or Dense(), "
                        f"got {type(storage).__name__}")


_FEATURE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Feature:
    """A teacher feature to store next to the outputs (feature distillation).

    ``per_token``: one record per token row (e.g. a transformer's hidden states
    ``[B, L, D]``, stored for the rows the mask keeps), else one per sample (e.g. a CNN's
    feature map ``[B, C, H, W]``). ``dtype``: the stored type. ``module``: the dotted
    name of a submodule of the teacher whose output is stored (a forward hook; the first
    element of a tuple output); None: the ``features`` dict that ``forward`` returns
    must hold the feature.
    """

    per_token: bool = False
    dtype: torch.dtype = torch.float16
    module: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.per_token, bool):
            raise TypeError(f"Feature: per_token must be a bool, got {self.per_token!r}")
        _float_name(self.dtype, "Feature: dtype")
        if self.module is not None and not isinstance(self.module, str):
            raise TypeError(f"Feature: module must be a submodule name (str) or None, got {self.module!r}")

    def to_json(self) -> dict:
        return {"per_token": self.per_token, "dtype": FLOAT_DTYPES[self.dtype], "module": self.module}


def normalize_features(features: object) -> dict:
    """``features`` of a build (None, names, or ``{name: Feature}``) as ``{name: Feature}``."""
    if features is None:
        return {}
    if isinstance(features, str):
        features = [features]
    if isinstance(features, dict):
        items = list(features.items())
    else:
        try:
            items = [(name, Feature()) for name in features]
        except TypeError:
            raise TypeError("features must be None, a list of names or a dict {name: Feature(...)}, "
                            f"got {type(features).__name__}") from None
    out = {}
    for name, spec in items:
        if not isinstance(name, str) or not _FEATURE_NAME.match(name):
            raise ValueError(f"features: name {name!r} must be 1-100 characters of letters, digits, "
                             "'_', '.', '-' (it is part of a file name)")
        if spec is None:
            spec = Feature()
        if not isinstance(spec, Feature):
            raise TypeError(f"features[{name!r}] must be a kdfast.cache.Feature, got {type(spec).__name__}")
        out[name] = spec
    return out


# ---------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One file per shard: fixed-size records of ``shape`` elements of ``elem``, one
    record per token row (``per="row"``), per sample (``"sample"``), or the
    ``samples + 1`` row offsets of the token layout (``"offset"``)."""

    name: str
    elem: str
    shape: tuple
    per: str

    @property
    def record_bytes(self) -> int:
        return ELEM_TYPES[self.elem].nbytes * math.prod(self.shape)

    def records(self, samples: int, rows: int) -> int:
        return {"row": rows, "sample": samples, "offset": samples + 1}[self.per]

    def file_bytes(self, samples: int, rows: int) -> int:
        return self.records(samples, rows) * self.record_bytes

    def to_json(self) -> dict:
        return {"elem": self.elem, "shape": list(self.shape), "per": self.per}


def make_fields(storage, vocab_size: int, layout: str, features: dict, feature_shapes: dict) -> dict:
    """The fields of a cache, ``{file suffix: Field}``, in file order."""
    fields = {}
    if layout == "token":
        fields["offsets"] = Field("offsets", "int64", (), "offset")
    if isinstance(storage, TopK):
        fields["indices"] = Field("indices", index_type(vocab_size), (storage.k,), "row")
        fields["values"] = Field("values", FLOAT_DTYPES[storage.dtype], (storage.k,), "row")
    elif isinstance(storage, Sampled):
        fields["indices"] = Field("indices", index_type(vocab_size), (storage.num_samples,), "row")
        fields["counts"] = Field("counts", count_type(storage.num_samples), (storage.num_samples,), "row")
    else:
        fields["logits"] = Field("logits", FLOAT_DTYPES[storage.dtype], (vocab_size,), "row")
    for name, spec in features.items():
        fields[f"feature.{name}"] = Field(f"feature.{name}", FLOAT_DTYPES[spec.dtype],
                                          tuple(feature_shapes[name]), "row" if spec.per_token else "sample")
    return fields


def fields_from_json(spec: dict) -> dict:
    return {name: Field(name, f["elem"], tuple(f["shape"]), f["per"]) for name, f in spec.items()}


def shard_stem(rank: int, seq: int) -> str:
    return f"r{rank:05d}-{seq:06d}"


_CACHE_FILE = re.compile(r"^(r\d{5}-\d{6}\..+|progress-r\d{5}\.json(\.tmp)?|header\.json(\.tmp)?)$")


def is_cache_file(name: str) -> bool:
    """Whether a file name is one a cache build writes (shard, progress, header, temporary)."""
    return bool(_CACHE_FILE.match(name))


def progress_file(rank: int) -> str:
    return f"{PROGRESS_PREFIX}{rank:05d}.json"


# ---------------------------------------------------------------------------
# Encoding and decoding (torch <-> stored bytes)
# ---------------------------------------------------------------------------


def encode_ints(values: torch.Tensor, elem: str) -> np.ndarray:
    """Non-negative integer tensor -> a numpy array of ``elem`` (uint24: ``[..., 3]`` bytes)."""
    v = values.detach().cpu()
    if elem == "uint24":
        b = v.to(torch.int32).contiguous().numpy().astype("<i4", copy=False).view(np.uint8)
        return np.ascontiguousarray(b.reshape(*v.shape, 4)[..., :3])
    # through numpy: torch's uint16 / uint32 support is partial
    return v.to(torch.int64).numpy().astype(ELEM_TYPES[elem].numpy)


def encode_floats(values: torch.Tensor, elem: str) -> np.ndarray:
    """Float tensor -> numpy array holding the bytes of ``elem`` (bfloat16 as uint16 bits)."""
    t = values.detach().to(FLOAT_BY_NAME[elem]).cpu().contiguous()
    if elem == "bfloat16":
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy().astype(ELEM_TYPES[elem].numpy, copy=False)


def torch_view(array: np.ndarray, elem: str) -> torch.Tensor:
    """The zero-copy tensor of a numpy array read as ``elem``."""
    t = torch.from_numpy(array)
    if elem == "bfloat16":
        return t.view(torch.bfloat16)
    return t


def decode_indices(raw: torch.Tensor, elem: str) -> torch.Tensor:
    """Stored token ids (a zero-copy view) -> int64."""
    if elem == "uint24":
        b = raw.to(torch.int64)
        return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return raw.to(torch.int64)


# ---------------------------------------------------------------------------
# Checksummed JSON (header and progress files)
# ---------------------------------------------------------------------------


def canonical_json(obj: dict) -> bytes:
    """The one byte form of a JSON document: sorted keys, one-space indent, final newline."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps_checked(obj: dict) -> bytes:
    """``obj`` with a ``checksum`` entry (sha256 of the canonical form without it), canonical."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return canonical_json({**body, "checksum": sha256_bytes(canonical_json(body))})


def loads_checked(data: bytes, what: str) -> dict:
    """Parses a file written by :func:`dumps_checked`; any changed byte raises
    :class:`CacheCorruptError` naming ``what`` (the file's canonical form and checksum
    are both checked, so a changed space is caught as well as a changed digit)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CacheCorruptError(f"{what} is not valid JSON ({exc}): the file is corrupt") from None
    if not isinstance(obj, dict) or "checksum" not in obj:
        raise CacheCorruptError(f"{what} has no checksum: the file is corrupt or not a kdfast cache file")
    body = {k: v for k, v in obj.items() if k != "checksum"}
    try:
        canonical = canonical_json(obj)
    except ValueError:
        raise CacheCorruptError(f"{what} is corrupt (non-finite number)") from None
    if canonical != data or sha256_bytes(canonical_json(body)) != obj["checksum"]:
        raise CacheCorruptError(f"{what} does not match its checksum: the file is corrupt")
    return obj


def write_atomic(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Writes ``data`` to ``path + ".tmp"``, syncs it, renames it over ``path`` and syncs
    the folder: a reader (or a crash) sees the old file or the new one, never a part."""
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Makes the renames in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Teacher fingerprint
# ---------------------------------------------------------------------------


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """``"sha256:<hex>"`` over the teacher's ``state_dict``: every entry's name, dtype,
    shape and bytes, in order. Same weights give the same fingerprint on any device;
    changing one weight changes it.

    Example::

        >>> teacher_fingerprint(torch.nn.Linear(4, 3))[:7]
        'sha256:'
    """
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher_fingerprint: teacher must be a torch.nn.Module, got "
                        f"{type(teacher).__name__}; pass fingerprint='...' for other teachers")
    h = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}|object|{value!r}\n".encode())
            continue
        t = value.detach()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        flat = t.reshape(-1)
        step = max(1, (1 << 26) // max(1, t.element_size()))  # 64 MiB pieces (GPU tensors copied in parts)
        for start in range(0, flat.numel(), step):
            piece = flat[start:start + step].cpu().contiguous()
            h.update(piece.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()
