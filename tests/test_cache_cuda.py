"""kdfast.cache with the teacher on a GPU (skipped without one): the outputs are reduced
on the GPU and match the ops there; a student on the GPU trains from the cache."""

from __future__ import annotations

import pytest
import torch
from cache_helpers import VOCAB, TinyLM, loader, pad_collate, token_dataset

import kdfast
from kdfast.cache import CachedDataset, Dense, Feature, Sampled, TeacherCache, TopK
from kdfast.cache.writer import batch_seed

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available"),
    pytest.mark.filterwarnings("ignore:kdfast.*plain-PyTorch reference:RuntimeWarning"),
]


@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_build_on_the_gpu_matches_the_ops_there(tmp_path, kind):
    items = token_dataset(n=10, empty=(3,))
    teacher = TinyLM().cuda()
    storage = {"topk": TopK(k=8), "sampled": Sampled(num_samples=12), "dense": Dense()}[kind]
    cache = TeacherCache.build(tmp_path / "c", teacher, loader(items, 4), storage=storage, temperature=2.0,
                               seed=5, progress=False, features={"h": Feature(per_token=True, module="body")})
    assert cache.fingerprint == kdfast.cache.teacher_fingerprint(TinyLM())  # device-independent
    with torch.no_grad():
        for start in range(0, 10, 4):
            batch = pad_collate(items[start:start + 4])
            logits = teacher(batch["input_ids"].cuda())
            mask = batch["attention_mask"].bool()
            if kind == "topk":
                ref = kdfast.topk_logits(logits, 8, temperature=2.0)
            elif kind == "sampled":
                g = torch.Generator(device="cuda").manual_seed(batch_seed(5, start))
                ref = kdfast.sample_logits(logits, 12, temperature=2.0, generator=g)
            hidden = teacher.body(teacher.embed(batch["input_ids"].cuda())).cpu()
            for j in range(logits.shape[0]):
                idx, val = cache.decode(start + j)
                if kind == "dense":
                    assert torch.equal(val, logits[j].cpu()[mask[j]].half().float())
                    continue
                assert torch.equal(idx, ref[0][j].cpu()[mask[j]])
                want = ref[1][j].cpu()[mask[j]]
                assert torch.equal(val, want.half().float() if kind == "topk" else want)
                assert torch.equal(cache[start + j].features["h"], hidden[j][mask[j]].half())


def test_student_on_the_gpu_trains_from_the_cache(tmp_path):
    items = token_dataset(n=8)
    cache = TeacherCache.build(tmp_path / "c", TinyLM().cuda(), loader(items, 4), storage=TopK(k=8),
                               progress=False)
    student = TinyLM(seed=3).cuda()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for x, y, tb in CachedDataset(items, cache).loader(batch_size=4, pin_memory=True):
        tb = tb.to("cuda", non_blocking=True)
        loss = tb.loss(student(x["input_ids"].cuda()), y.cuda(), alpha=0.5)
        assert loss.is_cuda and torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert student.head.weight.shape[0] == VOCAB
