"""``kdfast bench --op cache --quick``: writes its files, measures every storage kind,
and the storage targets (exact byte counts) are met."""

from __future__ import annotations

import csv

import pytest
import torch

from kdfast.__main__ import build_parser
from kdfast.__main__ import main as kdfast_main


def test_quick_cache_benchmark(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert kdfast_main(["bench", "--op", "cache", "--quick", "--out", str(tmp_path), "-q",
                            "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    # one sample of 64 tokens: 2 int64 row offsets = 16 bytes of index
    rows = list(csv.DictReader(open(tmp_path / "cache.csv")))
    values = {(r["section"], r["case"], r["metric"]): float(r["value"]) for r in rows}
    def value(case, metric):
        return values[("bytes", f"{case} V=32000", metric)]

    assert value("sampled-12", "bytes_per_token") == pytest.approx(12 * 3 + 16 / 64, rel=1e-5)
    assert value("topk-64-fp16", "bytes_per_entry") == pytest.approx(4 + 16 / 64 / 64, rel=1e-5)
    assert value("dense-fp16", "bytes_per_token") == pytest.approx(64000 + 16 / 64, rel=1e-5)
    for storage in ("topk-64-fp16", "sampled-12"):
        assert values[("build", storage, "build_s")] > 0 and values[("build", storage, "forward_s")] > 0
    for mode in ("live teacher", "from the cache"):
        assert values[("epoch", mode, "seconds")] > 0
    page = (tmp_path / "cache.md").read_text()
    assert "## Targets" in page and "bytes per entry (with its index) | 4.004 | <= 6 | met" in page
    assert (tmp_path / "machine.json").exists()


def test_cache_is_an_op_of_kdfast_bench():
    args = build_parser().parse_args(["bench", "--op", "cache", "--cache-repeats", "1"])
    assert args.op == ["cache"] and args.cache_repeats == 1
