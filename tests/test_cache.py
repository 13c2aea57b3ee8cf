"""kdfast.cache: round trips of every storage kind, variable lengths, features, the
reader's views and the Dataset wrapper."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from cache_helpers import HIDDEN, VOCAB, TinyClassifier, TinyLM, loader, pad_collate, token_dataset

import kdfast
from kdfast.cache import (
    CachedDataset,
    Dense,
    Feature,
    Sampled,
    TeacherBatch,
    TeacherCache,
    TopK,
    collate_teacher,
)
from kdfast.cache import format as fmt
from kdfast.cache.writer import batch_seed

pytestmark = pytest.mark.filterwarnings("ignore:kdfast.*plain-PyTorch reference:RuntimeWarning")

T = 2.0


def _batched_rows(teacher, items, batch_size, fn):
    """Per sample: ``fn(logits rows of the sample [n, V], first sample of its batch)``
    over the same padded batches the build ran."""
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = pad_collate(items[start:start + batch_size])
            logits = teacher(batch["input_ids"])
            mask = batch["attention_mask"].bool()
            res = fn(logits, start)
            for j in range(logits.shape[0]):
                out.append(tuple(r[j][mask[j]] for r in res))
    return out


def _build(tmp_path, storage, items, *, batch_size=4, name="c", **kw):
    return TeacherCache.build(tmp_path / name, TinyLM(), loader(items, batch_size), storage=storage,
                              temperature=T, progress=False, fsync=False, **kw)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_topk_round_trip_matches_the_op(tmp_path, dtype):
    items = token_dataset(n=13, empty=(4,))
    cache = _build(tmp_path, TopK(k=8, dtype=dtype), items, shard_tokens=15)
    assert len(cache.shards) > 2 and cache.kind == "topk" and cache.values == "logprobs"
    ref = _batched_rows(TinyLM(), items, 4, lambda logits, _: kdfast.topk_logits(logits, 8, temperature=T))
    for i, (idx, logp) in enumerate(ref):
        got_idx, got_val = cache.decode(i)
        assert got_idx.dtype == torch.int64 and got_val.dtype == torch.float32
        assert torch.equal(got_idx, idx)
        assert torch.equal(got_val, logp.to(dtype).float())
        assert cache[i].values.dtype == dtype
    assert cache[4].num_rows == 0 and cache.decode(4)[0].shape == (0, 8)


def test_topk_values_are_full_vocabulary_logprobs_of_the_top_tokens(tmp_path):
    """Independent of the op: float64 log_softmax of a one-sample forward."""
    items = token_dataset(n=9)
    cache = _build(tmp_path, TopK(k=5), items)
    teacher = TinyLM().double()
    for i, it in enumerate(items):
        with torch.no_grad():
            logits = teacher(it["input_ids"][None])[0]
        logp = torch.log_softmax(logits / T, -1)
        idx, val = cache.decode(i)
        assert torch.allclose(val.double(), logp.gather(1, idx), rtol=2e-3, atol=2e-3)
        kept = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, idx, True)
        lowest_kept = logits.gather(1, idx).min(1).values
        highest_other = logits.masked_fill(kept, -torch.inf).max(1).values
        assert bool((lowest_kept >= highest_other - 1e-6).all())
        assert bool((val[:, :-1] >= val[:, 1:] - 1e-3).all())  # descending


def test_sampled_round_trip_matches_the_op(tmp_path):
    items = token_dataset(n=11, empty=(0,))
    seed = 7
    cache = _build(tmp_path, Sampled(num_samples=12), items, seed=seed, shard_tokens=10)
    assert cache.values == "probs" and cache.fields["counts"].elem == "uint8"

    def draw(logits, start):
        g = torch.Generator().manual_seed(batch_seed(seed, start))
        return kdfast.sample_logits(logits, 12, temperature=T, generator=g)

    ref = _batched_rows(TinyLM(), items, 4, draw)
    for i, (idx, probs) in enumerate(ref):
        got_idx, got_p = cache.decode(i)
        assert torch.equal(got_idx, idx)
        assert torch.equal(got_p, probs)
        if got_p.numel():
            assert torch.allclose(got_p.sum(-1), torch.ones(got_p.shape[0]))
            counts = cache[i].values.long()
            assert bool((counts.sum(-1) == 12).all())


def test_sampled_counts_above_255_draws_use_uint16(tmp_path):
    items = token_dataset(n=3)
    cache = _build(tmp_path, Sampled(num_samples=300), items)
    assert cache.fields["counts"].elem == "uint16" and cache[0].values.dtype == torch.uint16
    _, p = cache.decode(1)
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_round_trip(tmp_path, dtype):
    items = token_dataset(n=7)
    cache = _build(tmp_path, Dense(dtype=dtype), items)
    ref = _batched_rows(TinyLM(), items, 4, lambda logits, _: (logits,))
    for i, (logits,) in enumerate(ref):
        idx, val = cache.decode(i)
        assert idx is None and torch.equal(val, logits.to(dtype).float())
        assert cache[i].values.dtype == dtype


def test_sample_layout_classifier(tmp_path):
    """Logits [B, V]: one row per sample, no offsets file, records [K]."""
    x = torch.randn(10, 8)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (10,)))
    cache = TeacherCache.build(tmp_path / "c", TinyClassifier(), data, storage=Dense(dtype=torch.float32),
                               batch_size=3, progress=False, fsync=False)
    assert cache.layout == "sample" and "offsets" not in cache.fields and len(cache) == 10
    with torch.no_grad():  # batched as the build did (the last bits depend on the batch)
        ref = torch.cat([TinyClassifier()(x[s:s + 3]) for s in range(0, 10, 3)])
        ref4 = torch.cat([TinyClassifier()(x[s:s + 4]) for s in range(0, 10, 4)])
    for i in range(10):
        assert cache[i].values.shape == (10,)
        assert torch.equal(cache.decode(i)[1], ref[i])
    top = TeacherCache.build(tmp_path / "t", TinyClassifier(), data, storage=TopK(k=3), batch_size=4,
                             progress=False, fsync=False)
    idx, _ = kdfast.topk_logits(ref4, 3)
    for i in range(10):
        assert torch.equal(top.decode(i)[0], idx[i])
    assert top.lengths().tolist() == [1] * 10


@pytest.mark.parametrize("vocab, elem", [(200, "uint8"), (256, "uint8"), (257, "uint16"), (65536, "uint16"),
                                         (65537, "uint24"), (2**24, "uint24"), (2**24 + 1, "uint32")])
def test_index_type_is_the_narrowest_and_round_trips(vocab, elem):
    assert fmt.index_type(vocab) == elem
    ids = torch.tensor([0, 1, vocab // 2, vocab - 2, vocab - 1], dtype=torch.int64)
    raw = fmt.encode_ints(ids, elem)
    assert raw.nbytes == ids.numel() * fmt.ELEM_TYPES[elem].nbytes
    view = fmt.torch_view(raw, elem)
    assert torch.equal(fmt.decode_indices(view, elem), ids)


def test_uint24_indices_in_a_cache(tmp_path):
    vocab = 70000

    def forward(teacher, batch):
        return teacher(batch[0])

    lin = torch.nn.Linear(4, vocab)
    x = torch.randn(6, 3, 4)
    data = torch.utils.data.TensorDataset(x)
    cache = TeacherCache.build(tmp_path / "c", lin, data, storage=TopK(k=4), batch_size=4, forward=forward,
                               progress=False, fsync=False)
    assert cache.fields["indices"].elem == "uint24" and cache[0].indices.shape == (3, 4, 3)
    with torch.no_grad():
        idx, _ = kdfast.topk_logits(lin(x), 4)
    for i in range(6):
        assert torch.equal(cache.decode(i)[0], idx[i])
    # 3-byte ids + 2-byte values, plus the offsets (7 int64) over 18 rows x 4 entries
    assert cache.info()["bytes_per_entry"] == pytest.approx((18 * 4 * 5 + 7 * 8) / (18 * 4))


# ---------------------------------------------------------------------------
# Variable lengths, forward variants, features
# ---------------------------------------------------------------------------


def test_variable_lengths_and_offsets(tmp_path):
    items = token_dataset(n=17, empty=(3, 16))
    cache = _build(tmp_path, TopK(k=4), items, shard_tokens=8)
    lengths = [len(it["input_ids"]) for it in items]
    assert cache.lengths().tolist() == lengths
    assert cache.num_rows == sum(lengths)
    assert [cache[i].num_rows for i in range(17)] == lengths


def test_forward_with_lengths_and_features(tmp_path):
    """A custom forward giving ``lengths`` and per-sample features, and a per-token
    feature hooked from a submodule."""
    items = token_dataset(n=9)
    teacher = TinyLM()

    def forward(t, batch):
        logits = t(batch["input_ids"])
        pooled = logits.mean(1)[:, :5]
        return {"logits": logits, "lengths": batch["attention_mask"].sum(1), "features": {"pooled": pooled}}

    feats = {"pooled": Feature(dtype=torch.float32), "hidden": Feature(per_token=True, module="body")}
    cache = TeacherCache.build(tmp_path / "c", teacher, loader(items, 4), storage=TopK(k=3), forward=forward,
                               features=feats, progress=False, fsync=False)
    assert cache.feature_names == ["hidden", "pooled"]  # sorted by name
    with torch.no_grad():
        for start in range(0, 9, 4):
            batch = pad_collate(items[start:start + 4])
            hidden = teacher.body(teacher.embed(batch["input_ids"]))
            pooled = teacher(batch["input_ids"]).mean(1)[:, :5]
            for j in range(hidden.shape[0]):
                out = cache[start + j]
                n = len(items[start + j]["input_ids"])
                assert torch.equal(out.features["hidden"], hidden[j, :n].half())
                assert torch.equal(out.features["pooled"], pooled[j])
    batch = cache.collate([cache[i] for i in range(4)])
    assert batch.features["hidden"].shape == (4, batch.values.shape[1], HIDDEN)
    assert batch.features["pooled"].shape == (4, 5)



def test_hugging_face_style_output_and_dict_batches(tmp_path):
    """A teacher returning an object with ``.logits`` and taking keyword inputs."""

    class Output(dict):
        def __getattr__(self, name):
            return self[name]

    class HFLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = TinyLM()

        def forward(self, input_ids, attention_mask=None):
            return Output(logits=self.lm(input_ids), hidden_states=None)

    items = token_dataset(n=6)
    cache = TeacherCache.build(tmp_path / "c", HFLike(), loader(items, 4), storage=TopK(k=4), progress=False,
                               fsync=False)
    plain = _build(tmp_path, TopK(k=4), items, name="plain")
    for i in range(6):
        assert torch.equal(cache.decode(i)[0], plain.decode(i)[0])


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------


def test_views_are_zero_copy_and_writes_never_reach_the_file(tmp_path):
    cache = _build(tmp_path, TopK(k=4), token_dataset(n=5))
    a, b = cache[1], cache[1]
    assert a.values.data_ptr() == b.values.data_ptr()  # the same mapped bytes, no copy
    shard = cache.shards[0]
    path = os.path.join(cache.path, f"{shard['stem']}.values")
    before = open(path, "rb").read()
    a.values.fill_(0)  # a private (copy-on-write) page
    assert open(path, "rb").read() == before
    assert cache.verify()["other_files"] == []
    (tmp_path / "c" / "notes.txt").write_text("mine")
    assert cache.verify()["other_files"] == ["notes.txt"]


def test_open_from_another_process_state_and_pickle(tmp_path):
    cache = _build(tmp_path, Sampled(num_samples=6), token_dataset(n=8))
    clone = pickle.loads(pickle.dumps(cache))
    for i in range(8):
        for x, y in zip(clone.decode(i), cache.decode(i)):
            assert torch.equal(x, y)


def test_negative_index_and_out_of_range(tmp_path):
    cache = _build(tmp_path, TopK(k=4), token_dataset(n=5))
    assert torch.equal(cache.decode(-1)[0], cache.decode(4)[0])
    with pytest.raises(IndexError, match="out of range"):
        cache[5]
    with pytest.raises(TypeError, match="integers"):
        cache[1.0]


def test_info_reports_bytes_per_token(tmp_path):
    items = token_dataset(n=10)
    cache = _build(tmp_path, Sampled(num_samples=12), items)
    info = cache.info()
    rows = sum(len(it["input_ids"]) for it in items)
    files = sum(os.path.getsize(os.path.join(cache.path, f))
                for f in os.listdir(cache.path) if f != "header.json")
    assert info["rows"] == rows and info["bytes"] == files
    assert info["bytes_per_token"] == pytest.approx(files / rows)
    # uint16 ids + uint8 counts, and 11 int64 offsets
    assert info["bytes_per_token"] == pytest.approx(12 * 3 + 8 * 11 / rows)


def test_rebuild_with_the_same_settings_returns_the_finished_cache(tmp_path):
    items = token_dataset(n=6)
    cache = _build(tmp_path, TopK(k=4), items)
    stamp = {f: os.stat(os.path.join(cache.path, f)).st_mtime_ns for f in os.listdir(cache.path)}
    again = _build(tmp_path, TopK(k=4), items)
    assert {f: os.stat(os.path.join(cache.path, f)).st_mtime_ns for f in os.listdir(cache.path)} == stamp
    assert again.header == cache.header


def test_teacher_mode_is_restored(tmp_path):
    teacher = TinyLM().train()
    TeacherCache.build(tmp_path / "c", teacher, loader(token_dataset(n=3)), storage=TopK(k=2), progress=False,
                       fsync=False)
    assert teacher.training


def test_progress_bar(tmp_path, capsys):
    TeacherCache.build(tmp_path / "c", TinyLM(), loader(token_dataset(n=6), 2), storage=TopK(k=2),
                       progress=True, fsync=False)
    err = capsys.readouterr().err
    assert "kdfast cache build" in err and "6/6" in err


# ---------------------------------------------------------------------------
# Dataset wrapper and the loss
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_cached_dataset_batches_and_loss(tmp_path, kind):
    items = token_dataset(n=10, empty=(2,))
    storage = {"topk": TopK(k=6), "sampled": Sampled(num_samples=8), "dense": Dense()}[kind]
    cache = _build(tmp_path, storage, items)
    data = CachedDataset(items, cache)
    assert len(data) == 10
    inputs, targets, outputs = data[3]
    assert torch.equal(inputs["input_ids"], items[3]["input_ids"])
    assert torch.equal(targets, items[3]["labels"]) and outputs.num_rows == len(targets)
    x, y, tb = next(iter(data.loader(batch_size=4, shuffle=False)))
    assert isinstance(tb, TeacherBatch) and tb.values_kind == cache.values and tb.temperature == T
    lengths = [len(it["input_ids"]) for it in items[:4]]
    assert tb.lengths.tolist() == lengths and x["input_ids"].shape == (4, max(lengths))
    assert torch.equal(tb.mask, torch.arange(max(lengths)) < torch.tensor(lengths)[:, None])
    assert bool((y[~tb.mask] == -100).all())

    student = torch.randn(4, max(lengths), VOCAB, requires_grad=True)
    loss = tb.loss(student, y, alpha=0.25)
    # the same loss from the packed rows of every sample, decoded one by one
    rows = torch.cat([student[j, :n] for j, n in enumerate(lengths)])
    labels = torch.cat([items[j]["labels"] for j in range(4)])
    dec = [cache.decode(j) for j in range(4)]
    if kind == "dense":
        ref = kdfast.kd_loss(rows, torch.cat([d[1] for d in dec]), labels, temperature=T, alpha=0.25)
    else:
        ref = kdfast.sparse_kd_loss(rows, torch.cat([d[0] for d in dec]), torch.cat([d[1] for d in dec]),
                                    labels,
                                    values=cache.values, temperature=T, alpha=0.25)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.grad is not None and bool((student.grad[~tb.mask] == 0).all())


def test_teacher_batch_loss_pads_to_a_longer_student(tmp_path):
    items = token_dataset(n=4)
    cache = _build(tmp_path, TopK(k=6), items)
    tb = collate_teacher([cache[i] for i in range(4)])
    seq = tb.values.shape[1]
    student = torch.randn(4, seq + 3, VOCAB)
    short = tb.loss(student[:, :seq])
    assert torch.allclose(tb.loss(student), short)
    with pytest.raises(ValueError, match="cover"):
        tb.loss(student[:, : seq - 1])
    padded = collate_teacher([cache[i] for i in range(4)], pad_to=seq + 3)
    assert padded.values.shape[1] == seq + 3
    with pytest.raises(ValueError, match="pad_to"):
        collate_teacher([cache[i] for i in range(4)], pad_to=seq - 1)


def test_cached_dataset_with_worker_processes(tmp_path):
    items = token_dataset(n=8)
    cache = _build(tmp_path, TopK(k=4), items)
    data = CachedDataset(items, cache)
    got = [tb.indices for _, _, tb in data.loader(batch_size=4, num_workers=2)]
    want = [tb.indices for _, _, tb in data.loader(batch_size=4)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_cached_dataset_tuple_items_and_sample_layout(tmp_path):
    x = torch.randn(9, 8)
    y = torch.randint(0, 10, (9,))
    data = torch.utils.data.TensorDataset(x, y)
    cache = TeacherCache.build(tmp_path / "c", TinyClassifier(), data, storage=TopK(k=4), progress=False,
                               fsync=False, temperature=3.0)
    xb, yb, tb = next(iter(CachedDataset(data, cache).loader(batch_size=5)))
    assert torch.equal(xb, x[:5]) and torch.equal(yb, y[:5])
    assert tb.indices.shape == (5, 4) and tb.mask is None
    with torch.no_grad():
        ref_idx, ref_lp = kdfast.topk_logits(TinyClassifier()(x[:5]), 4, temperature=3.0)
    assert torch.equal(tb.indices, ref_idx)
    student = torch.randn(5, 10)
    assert torch.allclose(tb.loss(student, yb),
                          kdfast.sparse_kd_loss(student, ref_idx, ref_lp.half().float(), yb, temperature=3.0))


def test_cached_dataset_refuses_another_length(tmp_path):
    cache = _build(tmp_path, TopK(k=4), token_dataset(n=5))
    with pytest.raises(ValueError, match="5"):
        CachedDataset(token_dataset(n=6), cache)


def test_teacher_batch_to_and_pin(tmp_path):
    cache = _build(tmp_path, TopK(k=4), token_dataset(n=3))
    tb = collate_teacher([cache[i] for i in range(3)])
    moved = tb.to("cpu")
    assert torch.equal(moved.indices, tb.indices)
    assert np.array_equal(moved.lengths.numpy(), tb.lengths.numpy())


def test_teacher_batch_loss_without_labels_skips_padding_and_needs_labels_for_alpha(tmp_path):
    items = token_dataset(n=4)
    cache = _build(tmp_path, TopK(k=6), items)
    tb = collate_teacher([cache[i] for i in range(4)])
    student = torch.randn(4, tb.values.shape[1], VOCAB)
    rows = torch.cat([student[j, :n] for j, n in enumerate(tb.lengths.tolist())])
    dec = [cache.decode(j) for j in range(4)]
    ref = kdfast.sparse_kd_loss(rows, torch.cat([d[0] for d in dec]), torch.cat([d[1] for d in dec]),
                                temperature=T)
    assert torch.allclose(tb.loss(student), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="alpha > 0 needs labels"):
        tb.loss(student, alpha=0.5)


def test_dict_batches_of_a_sequence_classifier(tmp_path):
    """Dict batches with an attention_mask and [B, V] logits: one row per sample."""

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = TinyLM()

        def forward(self, input_ids, attention_mask):
            logits = self.lm(input_ids) * attention_mask[..., None]
            return {"logits": logits.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1)}

    items = token_dataset(n=6)
    cache = TeacherCache.build(tmp_path / "c", Classifier(), loader(items, 4), storage=Dense(torch.float32),
                               progress=False, fsync=False)
    assert cache.layout == "sample" and len(cache) == 6
    with torch.no_grad():
        batch = pad_collate(items[:4])
        ref = Classifier()(batch["input_ids"], batch["attention_mask"])["logits"]
    assert torch.allclose(cache.decode(2)[1], ref[2])


def test_reader_keeps_a_bounded_number_of_shards_mapped(tmp_path, monkeypatch):
    from kdfast.cache import reader

    monkeypatch.setattr(reader, "MAX_MAPPED_SHARDS", 2)
    items = token_dataset(n=12)
    cache = _build(tmp_path, TopK(k=4), items, batch_size=2, shard_tokens=5)
    assert len(cache.shards) > 4
    held = [cache[i] for i in range(12)]  # views outlive the eviction of their shard's map
    assert len(cache._maps) == 2
    fresh = TeacherCache.open(cache.path)
    for i, out in enumerate(held):
        assert torch.equal(out.decode()[0], fresh.decode(i)[0])
