"""kdfast.cache: a build killed with SIGKILL (in a subprocess) and run again gives the
same bytes as a build that never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from cache_helpers import TinyLM, loader, token_dataset

from kdfast.cache import TeacherCache, TopK
from kdfast.cache import format as fmt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
pytestmark = pytest.mark.filterwarnings("ignore:kdfast.*plain-PyTorch reference:RuntimeWarning")


def _run_build(path, kind, **env):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    environ.update({k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, os.path.join(HERE, "cache_helpers.py"), "build", str(path), kind],
                          env=environ, capture_output=True, text=True, timeout=120)


def _files(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted builds, one per kind, in a fresh process each."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for kind in ("topk", "sampled"):
        result = _run_build(root / kind, kind)
        assert result.returncode == 0, result.stderr
        out[kind] = _files(root / kind)
    return out


# The writer thread is at most 3 batches behind the teacher (2 queued, 1 being written), so a
# kill at the teacher's call n >= 5 finds at least one batch written to the shard's .tmp files.
@pytest.mark.parametrize("kind, kills", [
    ("topk", [("KDFAST_TEST_KILL_AT_FORWARD", 5)]),  # mid-shard: temporaries left behind
    ("sampled", [("KDFAST_TEST_KILL_AT_FORWARD", 6), ("KDFAST_TEST_KILL_AT_FORWARD", 5)]),  # twice
    ("sampled", [("KDFAST_TEST_KILL_AT_REPLACE", 2)]),  # inside a commit: one file renamed, not recorded
    ("topk", [("KDFAST_TEST_KILL_AT_REPLACE", 4)]),  # between the shard's renames and its progress file
])
def test_killed_build_resumes_to_identical_bytes(reference, tmp_path, kind, kills):
    path = tmp_path / "cache"
    for var, at in kills:
        result = _run_build(path, kind, **{var: at})
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert not (path / fmt.HEADER_FILE).exists()
        with pytest.raises(Exception, match="unfinished build"):
            TeacherCache.open(path)
    leftovers = os.listdir(path)
    assert any(n.endswith(fmt.TMP_SUFFIX) or n.startswith("r") for n in leftovers)
    result = _run_build(path, kind)
    assert result.returncode == 0, result.stderr
    got = _files(path)
    assert list(got) == list(reference[kind])
    for name, data in reference[kind].items():
        assert got[name] == data, f"{name} differs from the uninterrupted build"
    TeacherCache.open(path).verify()


def test_kill_after_some_shards_resumes_only_the_rest(tmp_path):
    """The resumed run redoes only uncommitted batches: it calls the teacher fewer times."""
    path = tmp_path / "cache"
    result = _run_build(path, "topk", KDFAST_TEST_KILL_AT_FORWARD=9)
    assert result.returncode == -signal.SIGKILL
    state = fmt.loads_checked(open(path / fmt.progress_file(0), "rb").read(), "progress")
    done = state["next_sample"]
    assert 0 < done < 40 and len(state["shards"]) >= 2

    calls = []

    class Counting(TinyLM):
        def forward(self, input_ids, attention_mask=None):
            calls.append(input_ids.shape[0])
            return super().forward(input_ids, attention_mask)

    import torch

    torch.set_num_threads(1)
    from cache_helpers import storage

    cache = TeacherCache.build(path, Counting(), loader(token_dataset(n=40, empty=(5,)), batch_size=3),
                               storage=storage("topk"), temperature=2.0, shard_tokens=20, progress=False,
                               seed=3)
    assert sum(calls) == 40 - done
    assert len(cache) == 40
    assert isinstance(cache.storage, TopK)
