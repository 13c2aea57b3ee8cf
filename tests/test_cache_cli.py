"""``kdfast cache build|info|verify``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kdfast.__main__ import main
from kdfast.cache import TeacherCache
from kdfast.cache import format as fmt

HERE = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(HERE, "cache_helpers.py")
pytestmark = pytest.mark.filterwarnings("ignore:kdfast.*plain-PyTorch reference:RuntimeWarning")


def _build_args(path, *extra):
    return ["cache", "build", str(path), "--teacher", f"{HELPERS}:cli_teacher",
            "--data", f"{HELPERS}:cli_data",
            "--no-progress", *extra]


def test_build_info_verify(tmp_path, capsys):
    path = tmp_path / "cache"
    assert main(_build_args(path, "--storage", "sampled", "--num-samples", "12", "--temperature", "1.5",
                            "--shard-tokens", "10", "--feature", "hidden=body:token")) == 0
    assert "built" in capsys.readouterr().out
    cache = TeacherCache.open(path, temperature=1.5)
    assert cache.kind == "sampled" and len(cache) == 10 and len(cache.shards) > 1
    assert cache.header["features"]["hidden"]["per_token"] is True

    assert main(["cache", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sampled num_samples=12" in out and "bytes/token" in out
    assert "hidden: float16 [16] per token" in out
    assert main(["cache", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 10 and info["bytes_per_token"] > 0

    assert main(["cache", "verify", str(path), "--temperature", "1.5"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["cache", "verify", str(path), "--temperature", "2"]) == 1
    assert "temperature is 1.5 in the cache but 2.0" in capsys.readouterr().err

    name = sorted(f for f in os.listdir(path) if f.endswith(".counts"))[-1]
    data = bytearray(open(path / name, "rb").read())
    data[-1] ^= 0xFF
    open(path / name, "wb").write(bytes(data))
    assert main(["cache", "verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert name in err and "checksum" in err


def test_build_topk_and_dense_and_resume_is_a_no_op(tmp_path, capsys):
    path = tmp_path / "topk"
    assert main(_build_args(path, "--k", "5", "--dtype", "bf16")) == 0
    cache = TeacherCache.open(path)
    assert cache.storage.k == 5 and cache.storage.dtype == torch.bfloat16
    mtime = os.stat(path / fmt.HEADER_FILE).st_mtime_ns
    assert main(_build_args(path, "--k", "5", "--dtype", "bf16")) == 0
    assert os.stat(path / fmt.HEADER_FILE).st_mtime_ns == mtime
    assert main(_build_args(path, "--k", "6")) == 1  # other settings
    assert "storage.k is 5 there but 6 now" in capsys.readouterr().err
    assert main(_build_args(path, "--k", "6", "--overwrite")) == 0
    assert TeacherCache.open(path).storage.k == 6
    assert main(_build_args(tmp_path / "dense", "--storage", "dense")) == 0
    assert TeacherCache.open(tmp_path / "dense").kind == "dense"


def test_bad_cli_arguments(tmp_path, capsys):
    assert main(["cache", "build", str(tmp_path / "c"), "--teacher", "nocolon",
                 "--data", f"{HELPERS}:cli_data"]) == 2
    assert "module:attr" in capsys.readouterr().err
    assert main(["cache", "build", str(tmp_path / "c"), "--teacher", f"{HELPERS}:nothing",
                 "--data", f"{HELPERS}:cli_data"]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    assert main(["cache", "build", str(tmp_path / "c"), "--teacher", "/no/such.py:x", "--data", "a:b"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(_build_args(tmp_path / "c", "--k", "0")) == 2
    assert "TopK: k must be" in capsys.readouterr().err
    assert main(["cache", "info", str(tmp_path / "nothing")]) == 1
    with pytest.raises(SystemExit):
        main(["cache", "build", str(tmp_path / "c"), "--storage", "full"])
