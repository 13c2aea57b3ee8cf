"""Small teachers, datasets and a build script shared by the teacher-cache tests.

``python tests/cache_helpers.py build PATH KIND`` builds a cache in a fresh process
(the crash and CLI tests). ``KDFAST_TEST_KILL_AT_FORWARD=n`` makes the teacher
SIGKILL its own process on its n-th call; ``KDFAST_TEST_KILL_AT_REPLACE=n`` does so
on the n-th ``os.replace`` (inside a shard commit).
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn

VOCAB = 300
HIDDEN = 16


class TinyLM(nn.Module):
    """Token ids ``[B, L]`` -> logits ``[B, L, vocab]`` (HF-style keyword call)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        self.calls = 0
        self.kill_at = int(os.environ.get("KDFAST_TEST_KILL_AT_FORWARD", "0"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.kill_at and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.head(torch.tanh(self.body(self.embed(input_ids))))


class TinyClassifier(nn.Module):
    """Inputs ``[B, 8]`` -> logits ``[B, classes]``."""

    def __init__(self, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(8, 12)
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def token_dataset(n: int = 23, max_len: int = 9, vocab: int = VOCAB, seed: int = 0,
                  empty: tuple = ()) -> list:
    """``n`` dicts ``{"input_ids": [L_i], "labels": [L_i]}`` of random lengths in
    [1, max_len] (0 for the indices in ``empty``)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 0 if i in empty else int(torch.randint(1, max_len + 1, (), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        items.append({"input_ids": ids, "labels": torch.roll(ids, -1)})
    return items


def pad_collate(items: list) -> dict:
    """Right-pads ``input_ids`` / ``labels`` and adds the ``attention_mask``."""
    seq = max(1, max(len(it["input_ids"]) for it in items))
    ids = torch.zeros(len(items), seq, dtype=torch.int64)
    labels = torch.full((len(items), seq), -100, dtype=torch.int64)
    mask = torch.zeros(len(items), seq, dtype=torch.int64)
    for j, it in enumerate(items):
        n = len(it["input_ids"])
        ids[j, :n], labels[j, :n], mask[j, :n] = it["input_ids"], it["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loader(items: list, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=pad_collate)


def storage(kind: str):
    from kdfast.cache import Dense, Sampled, TopK

    return {"topk": TopK(k=8), "topk_bf16": TopK(k=8, dtype=torch.bfloat16),
            "sampled": Sampled(num_samples=12),
            "dense": Dense()}[kind]


def build(path: str, kind: str, **kwargs):
    """The cache the crash tests build (several shards, deterministic on one thread)."""
    from kdfast.cache import TeacherCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    options = {"storage": storage(kind), "temperature": 2.0, "shard_tokens": 20, "progress": False, "seed": 3}
    options.update(kwargs)
    try:
        return TeacherCache.build(path, TinyLM(), loader(token_dataset(n=40, empty=(5,)), batch_size=3),
                                  **options)
    finally:
        torch.set_num_threads(threads)


def _kill_on_replace(n: int) -> None:
    real = os.replace
    calls = [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    os.replace = replace


def dist_worker(rank: int, world: int, init_file: str, path: str, kind: str) -> None:
    """One rank of a gloo build (``torch.multiprocessing.spawn``)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cache = build(path, kind)
        assert len(cache) == 40  # every rank gets the finished cache
    finally:
        dist.destroy_process_group()


# objects for `kdfast cache build --teacher tests/cache_helpers.py:cli_teacher --data ...:cli_data`
def cli_teacher() -> nn.Module:
    return TinyLM()


def cli_data() -> torch.utils.data.DataLoader:
    return loader(token_dataset(n=10), batch_size=4)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        if os.environ.get("KDFAST_TEST_KILL_AT_REPLACE"):
            _kill_on_replace(int(os.environ["KDFAST_TEST_KILL_AT_REPLACE"]))
        build(sys.argv[2], sys.argv[3])
