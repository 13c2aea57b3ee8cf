"""kdfast.cache under torch.distributed: two gloo ranks each write their own shards;
one reader reads the whole cache."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cache_helpers import build, dist_worker

from kdfast.cache import TeacherCache

pytestmark = [
    pytest.mark.filterwarnings("ignore:kdfast.*plain-PyTorch reference:RuntimeWarning"),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_two_process_gloo_build(tmp_path, kind):
    path = tmp_path / "cache"
    mp.spawn(dist_worker, args=(2, str(tmp_path / "init"), str(path), kind), nprocs=2, join=True)
    cache = TeacherCache.open(path, verify=True)
    stems = {s["stem"][:6] for s in cache.shards}
    assert stems == {"r00000", "r00001"}  # both ranks wrote shards
    assert [s["first_sample"] for s in cache.shards] == sorted(s["first_sample"] for s in cache.shards)
    assert not any(n.startswith("progress") or n.endswith(".tmp") for n in os.listdir(path))
    single = build(str(tmp_path / "single"), kind)
    assert len(cache) == len(single) == 40 and cache.num_rows == single.num_rows
    assert torch.equal(cache.lengths(), single.lengths())
    for i in range(len(cache)):
        idx, val = cache.decode(i)
        if kind == "topk":  # the same outputs, only split differently into shards
            ref_idx, ref_val = single.decode(i)
            assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)
        elif val.numel():  # draws depend on the batch seeds, which differ: check they are draws
            assert torch.allclose(val.sum(-1), torch.ones(val.shape[0]))
            assert bool(((idx >= -1) & (idx < 300)).all())
