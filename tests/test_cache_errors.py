"""kdfast.cache: flipped bytes, truncated and missing files, mismatched teachers and
settings, and bad arguments, each named in the error."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from cache_helpers import TinyClassifier, TinyLM, loader, token_dataset

from kdfast.cache import (
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    Dense,
    Feature,
    Sampled,
    TeacherCache,
    TopK,
)
from kdfast.cache import format as fmt

pytestmark = pytest.mark.filterwarnings("ignore:kdfast.*plain-PyTorch reference:RuntimeWarning")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cache of each kind with features and several shards, built once."""
    root = tmp_path_factory.mktemp("caches")
    items = token_dataset(n=14, empty=(6,))
    feats = {"hidden": Feature(per_token=True, module="body"), "pooled": Feature()}

    def forward(teacher, batch):
        logits = teacher(batch["input_ids"])
        return {"logits": logits, "mask": batch["attention_mask"], "features": {"pooled": logits[:, 0, :3]}}

    caches = {}
    for kind, storage in (("topk", TopK(k=4)), ("sampled", Sampled(num_samples=5)), ("dense", Dense())):
        folder = root / kind
        TeacherCache.build(folder, TinyLM(), loader(items, 4), storage=storage, temperature=2.0,
                           shard_tokens=25, progress=False, fsync=False, forward=forward,
                           features=feats if kind == "topk" else None)
        caches[kind] = folder
    return caches


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _flip(path, pos):
    data = bytearray(open(path, "rb").read())
    data[pos] ^= 0x01 if pos % 2 else 0x80
    open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------------------
# Corruption
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_verify_detects_a_flipped_byte_in_every_file(built, tmp_path, kind):
    folder = _copy(built[kind], tmp_path)
    TeacherCache.open(folder).verify()
    files = sorted(f for f in os.listdir(folder) if f != fmt.HEADER_FILE)
    suffixes = {f.split(".", 1)[1] for f in files}
    assert "offsets" in suffixes and len(files) >= 2 * len(suffixes)
    for name in files:
        path = folder / name
        size = os.path.getsize(path)
        if size == 0:
            continue
        original = open(path, "rb").read()
        for pos in sorted({0, size // 2, size - 1}):
            _flip(path, pos)
            cache = TeacherCache.open(folder)  # sizes are right: opening does not hash
            with pytest.raises(CacheCorruptError, match=name.replace(".", r"\.")):
                cache.verify()
            open(path, "wb").write(original)
    TeacherCache.open(folder).verify()


def test_any_changed_byte_of_the_header_is_detected(built, tmp_path):
    folder = _copy(built["topk"], tmp_path)
    path = folder / fmt.HEADER_FILE
    original = open(path, "rb").read()
    step = max(1, len(original) // 97)
    for pos in list(range(0, len(original), step)) + [len(original) - 1]:
        for change in (lambda b: b ^ 0x01, lambda b: b ^ 0x20, lambda b: 0x20 if b != 0x20 else 0x0A):
            data = bytearray(original)
            data[pos] = change(data[pos])
            open(path, "wb").write(bytes(data))
            with pytest.raises(CacheCorruptError, match=r"header\.json"):
                TeacherCache.open(folder)
    open(path, "wb").write(original)
    TeacherCache.open(folder, verify=True)


def test_header_corrupted_after_opening(built, tmp_path):
    folder = _copy(built["sampled"], tmp_path)
    cache = TeacherCache.open(folder)
    _flip(folder / fmt.HEADER_FILE, 40)
    with pytest.raises(CacheCorruptError, match=r"header\.json"):
        cache.verify()


@pytest.mark.parametrize("damage", ["truncate", "extend", "remove"])
def test_open_detects_a_truncated_extended_or_missing_file(built, tmp_path, damage):
    folder = _copy(built["topk"], tmp_path)
    name = sorted(f for f in os.listdir(folder) if f.endswith(".values"))[1]
    path = folder / name
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 1)
    elif damage == "extend":
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        os.remove(path)
    with pytest.raises(CacheCorruptError, match=name.replace(".", r"\.")):
        TeacherCache.open(folder)


def test_verify_names_every_bad_file(built, tmp_path):
    folder = _copy(built["dense"], tmp_path)
    names = sorted(f for f in os.listdir(folder) if f.endswith(".logits"))[:2]
    for name in names:
        _flip(folder / name, 3)
    with pytest.raises(CacheCorruptError) as exc:
        TeacherCache.open(folder).verify()
    assert all(n in str(exc.value) for n in names)


def test_not_a_cache_and_unfinished_build(tmp_path):
    with pytest.raises(CacheError, match="no such folder"):
        TeacherCache.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match=r"no header\.json"):
        TeacherCache.open(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / fmt.progress_file(0)).write_bytes(b"{}")
    with pytest.raises(CacheError, match="unfinished build"):
        TeacherCache.open(tmp_path / "half")


def test_unsupported_format_version(built, tmp_path):
    folder = _copy(built["topk"], tmp_path)
    header = fmt.loads_checked(open(folder / fmt.HEADER_FILE, "rb").read(), "h")
    header["format_version"] = 99
    (folder / fmt.HEADER_FILE).write_bytes(fmt.dumps_checked(header))
    with pytest.raises(CacheError, match="format version 99"):
        TeacherCache.open(folder)


def test_corrupt_progress_file_is_not_resumed_silently(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / fmt.progress_file(0)).write_bytes(b'{"broken": ')
    with pytest.raises(CacheCorruptError, match=r"progress-r00000\.json"):
        TeacherCache.build(folder, TinyLM(), loader(token_dataset(n=4)), storage=TopK(k=2), progress=False)
    cache = TeacherCache.build(folder, TinyLM(), loader(token_dataset(n=4)), storage=TopK(k=2),
                               progress=False,
                               overwrite=True)
    assert len(cache) == 4 and not (folder / fmt.progress_file(0)).exists()


def _stop_after(batches):
    """A forward that raises on its call number ``batches + 1`` (an interrupted build)."""
    calls = [0]

    def forward(teacher, batch):
        calls[0] += 1
        if calls[0] > batches:
            raise KeyboardInterrupt
        return {"logits": teacher(batch["input_ids"]), "mask": batch["attention_mask"]}
    return forward


def test_resume_refuses_a_damaged_committed_shard(tmp_path):
    folder = tmp_path / "c"
    items = token_dataset(n=12)
    options = {"storage": TopK(k=3), "shard_tokens": 1, "progress": False, "fingerprint": "fp"}
    with pytest.raises(KeyboardInterrupt):
        TeacherCache.build(folder, TinyLM(), loader(items, 2), forward=_stop_after(3), **options)
    name = sorted(f for f in os.listdir(folder) if f.endswith(".values"))[0]
    os.truncate(folder / name, 2)
    with pytest.raises(CacheCorruptError, match=rf"cannot resume: .*{name}.* is 2 bytes"):
        TeacherCache.build(folder, TinyLM(), loader(items, 2), **options)
    cache = TeacherCache.build(folder, TinyLM(), loader(items, 2), overwrite=True, **options)
    cache.verify()


def test_leftovers_of_a_build_killed_after_its_header_are_removed(built, tmp_path):
    folder = _copy(built["topk"], tmp_path)
    header = fmt.loads_checked(open(folder / fmt.HEADER_FILE, "rb").read(), "h")
    (folder / fmt.progress_file(0)).write_bytes(b"stale")
    (folder / (fmt.HEADER_FILE + fmt.TMP_SUFFIX)).write_bytes(b"stale")
    feats = {"hidden": Feature(per_token=True, module="body"), "pooled": Feature()}

    def forward(teacher, batch):  # the fixture's forward: same settings, so the build is done
        raise AssertionError("the teacher must not run again")

    cache = TeacherCache.build(folder, TinyLM(), loader(token_dataset(n=14, empty=(6,)), 4),
                               storage=TopK(k=4), temperature=2.0, shard_tokens=25, progress=False,
                               forward=forward, features=feats)
    assert cache.header == header
    assert sorted(os.listdir(folder)) == sorted(os.listdir(built["topk"]))


# ---------------------------------------------------------------------------
# Mismatched teacher and settings
# ---------------------------------------------------------------------------


def test_open_refuses_another_teacher_vocab_temperature_or_storage(built):
    folder = built["topk"]
    cache = TeacherCache.open(folder, vocab_size=300, temperature=2.0, teacher=TinyLM(), storage=TopK(k=4))
    other = TinyLM(seed=1)
    with pytest.raises(CacheMismatchError, match=r"teacher_fingerprint.*not the one the cache was"):
        TeacherCache.open(folder, teacher=other)
    with pytest.raises(CacheMismatchError, match=r"vocab_size is 300 in the cache but 301"):
        TeacherCache.open(folder, vocab_size=301)
    with pytest.raises(CacheMismatchError, match=r"temperature is 2.0 in the cache but 1.0"):
        TeacherCache.open(folder, temperature=1.0)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        TeacherCache.open(folder, fingerprint="sha256:0")
    with pytest.raises(CacheMismatchError, match="storage"):
        TeacherCache.open(folder, storage=TopK(k=5))
    assert isinstance(CacheMismatchError("x"), ValueError)
    assert cache.fingerprint == fmt.teacher_fingerprint(TinyLM())


def test_fingerprint_sees_one_changed_weight():
    a, b = TinyLM(), TinyLM()
    assert fmt.teacher_fingerprint(a) == fmt.teacher_fingerprint(b)
    with torch.no_grad():
        b.head.bias[7] = torch.nextafter(b.head.bias[7], torch.tensor(10.0))
    assert fmt.teacher_fingerprint(a) != fmt.teacher_fingerprint(b)
    assert fmt.teacher_fingerprint(a) != fmt.teacher_fingerprint(a.half())


def test_build_refuses_a_folder_built_with_another_teacher(tmp_path):
    items = token_dataset(n=5)
    TeacherCache.build(tmp_path / "c", TinyLM(), loader(items), storage=TopK(k=3), progress=False,
                       fsync=False)
    with pytest.raises(CacheMismatchError, match=r"teacher_fingerprint is 'sha256:.*' there but"):
        TeacherCache.build(tmp_path / "c", TinyLM(seed=2), loader(items), storage=TopK(k=3), progress=False)
    with pytest.raises(CacheMismatchError, match=r"temperature is 1\.0 there but 3\.0 now"):
        TeacherCache.build(tmp_path / "c", TinyLM(), loader(items), storage=TopK(k=3), temperature=3.0,
                           progress=False)
    with pytest.raises(CacheMismatchError, match="vocab_size"):
        TeacherCache.build(tmp_path / "c", TinyLM(), loader(items), storage=TopK(k=3), vocab_size=12,
                           progress=False)
    rebuilt = TeacherCache.build(tmp_path / "c", TinyLM(seed=2), loader(items), storage=TopK(k=3),
                                 progress=False, overwrite=True, fsync=False)
    assert rebuilt.fingerprint == fmt.teacher_fingerprint(TinyLM(seed=2))


def test_resume_refuses_other_settings(tmp_path):
    """An unfinished build (a progress file) is resumed only with the same settings."""
    items = token_dataset(n=12)
    folder = tmp_path / "c"

    class Stop(Exception):
        pass

    calls = [0]

    def forward(teacher, batch):
        calls[0] += 1
        if calls[0] == 3:
            raise Stop
        return {"logits": teacher(batch["input_ids"]), "mask": batch["attention_mask"]}

    with pytest.raises(Stop):
        TeacherCache.build(folder, TinyLM(), loader(items, 2), storage=TopK(k=3), shard_tokens=1,
                           forward=forward, progress=False, fingerprint="fp")
    assert (folder / fmt.progress_file(0)).exists()
    with pytest.raises(CacheMismatchError, match=r"unfinished build.*batch_size is 2 there but 3 now"):
        TeacherCache.build(folder, TinyLM(), loader(items, 3), storage=TopK(k=3), shard_tokens=1,
                           progress=False, fingerprint="fp")
    with pytest.raises(CacheMismatchError, match=r"storage\.k is 3 there but 4 now"):
        TeacherCache.build(folder, TinyLM(), loader(items, 2), storage=TopK(k=4), shard_tokens=1,
                           progress=False, fingerprint="fp")
    cache = TeacherCache.build(folder, TinyLM(), loader(items, 2), storage=TopK(k=3), shard_tokens=1,
                               progress=False, fingerprint="fp")
    assert len(cache) == 12


# ---------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: TopK(k=0), "TopK: k must be an int in"),
    (lambda: TopK(k=2.0), "TopK: k must be an int"),
    (lambda: TopK(k=True), "TopK: k must be an int"),
    (lambda: TopK(k=5000), r"\[1, 4096\]"),
    (lambda: TopK(k=4, dtype=torch.float64), "TopK: dtype must be"),
    (lambda: Sampled(num_samples=0), "Sampled: num_samples"),
    (lambda: Dense(dtype=torch.int8), "Dense: dtype"),
    (lambda: Feature(per_token=1), "Feature: per_token"),
    (lambda: Feature(dtype=torch.int32), "Feature: dtype"),
])
def test_bad_storage_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def _build(tmp_path, **kw):
    options = {"teacher": TinyLM(), "data": loader(token_dataset(n=5)), "storage": TopK(k=3),
               "progress": False, "fsync": False}
    options.update(kw)
    return TeacherCache.build(tmp_path / "c", **options)


@pytest.mark.parametrize("kwargs, match", [
    ({"storage": "topk"}, "storage must be kdfast.cache.TopK"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"shard_tokens": 0}, "shard_tokens"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"forward": 3}, "forward must be callable"),
    ({"features": {"a/b": Feature()}}, "name 'a/b'"),
    ({"features": {"x": "per_token"}}, r"features\['x'\] must be a kdfast.cache.Feature"),
    ({"features": 5}, "features must be None"),
    ({"features": {"h": Feature(module="nope")}}, "no submodule 'nope'"),
    ({"features": ["pooled"]}, "feature 'pooled' is missing"),
    ({"fingerprint": ""}, "fingerprint must be a non-empty str"),
    ({"teacher": lambda x: x}, "pass fingerprint="),
    ({"teacher": 5}, "teacher must be callable"),
    ({"storage": TopK(k=301)}, r"TopK\(k=301\) needs k <= the vocabulary size, which is 300"),
    ({"data": []}, "data is empty"),
    ({"data": 7}, "map-style Dataset"),
    ({"data": torch.utils.data.DataLoader(list(range(4)), shuffle=True)}, "RandomSampler.*shuffle=False"),
    ({"data": torch.utils.data.DataLoader(list(range(4)), batch_size=None)}, "batch_size=None"),
])
def test_bad_build_arguments(tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError, CacheError), match=match):
        _build(tmp_path, **kwargs)


def test_iterable_dataset_is_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3, dtype=torch.int64)

    with pytest.raises(TypeError, match="IterableDataset"):
        _build(tmp_path, data=Stream())
    with pytest.raises(TypeError, match="IterableDataset"):
        _build(tmp_path, data=torch.utils.data.DataLoader(Stream()))


@pytest.mark.parametrize("forward, match", [
    (lambda t, b: t(b["input_ids"])[:1], "logits for 1 samples, but the batch holds 4"),
    (lambda t, b: t(b["input_ids"])[0, 0], r"\[B, V\].*got torch.float32 \[300\]"),
    (lambda t, b: t(b["input_ids"]).long(), "floating-point logits"),
    (lambda t, b: {"logits": t(b["input_ids"]), "mask": b["attention_mask"][:, :1]}, "mask must be"),
    (lambda t, b: {"logits": t(b["input_ids"]), "lengths": torch.tensor([1, 2, 3, 99])}, "lengths must be"),
    (lambda t, b: {"logits": t(b["input_ids"])[:, 0], "mask": b["attention_mask"]}, "token rows need"),
    (lambda t, b: "nothing", "no logits"),
])
def test_bad_forward_outputs(tmp_path, forward, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _build(tmp_path, forward=forward)


def test_per_token_feature_needs_token_rows(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(4, 8))
    with pytest.raises(ValueError, match="per-token feature 'h'"):
        TeacherCache.build(tmp_path / "c", TinyClassifier(), data, storage=TopK(k=2), progress=False,
                           features={"h": Feature(per_token=True, module="body")})


def test_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        TeacherCache.build(tmp_path / "file", TinyLM(), loader(token_dataset(n=2)), storage=TopK(k=2))
