#!/usr/bin/env python3
"""Rows per chunk of ``kdfast.fused_linear_kd_loss``: forward + backward time and peak extra
memory for several ``chunk_size`` values against the unfused ``kdfast.kd_loss`` on
materialised logits (fp32, T=2, the SmolLM-135M head H=576, V=49152 by default).

Each configuration runs ``--repeats`` timed calls (the fastest and the median are
printed) and one call under the harness's memory measurement; the unfused loss runs
first and last, to show how much the machine's load moved in between. Prints a
markdown table.

    python benchmarks/fused_linear_chunks.py --n 4096 --chunks 0,64,128,160,224,320,512
    python benchmarks/fused_linear_chunks.py --n 256 --chunks 0,32 --vocab 4096 --repeats 1   # seconds

``0`` is the automatic size (:func:`kdfast.fused_linear.auto_chunk_size`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

import kdfast  # noqa: E402
from kdfast.bench import harness  # noqa: E402
from kdfast.fused_linear import auto_chunk_size  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="rows (tokens), default 4096")
    p.add_argument("--hidden", type=int, default=576, help="hidden size, default 576")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary, default 49152")
    p.add_argument("--chunks", default="0,128,224,512", help="comma-separated chunk sizes, 0 = automatic")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration, default 3")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = p.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if any(c < 0 for c in chunks) or args.repeats < 1:
        p.error("--chunks must be >= 0 and --repeats >= 1")

    n, h, v = args.n, args.hidden, args.vocab
    gen = torch.Generator().manual_seed(0)
    scale = 2 / h**0.5
    h_s = torch.randn(n, h, generator=gen).requires_grad_(True)
    w_s = (torch.randn(v, h, generator=gen) * scale).requires_grad_(True)
    h_t, w_t = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * scale

    def reset() -> None:
        h_s.grad = w_s.grad = None

    def unfused() -> torch.Tensor:
        loss = kdfast.kd_loss(h_s @ w_s.T, h_t @ w_t.T, temperature=2.0)
        loss.backward()
        return loss.detach()

    def fused(chunk: int):
        def step() -> torch.Tensor:
            loss = kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, temperature=2.0, chunk_size=chunk or None)
            loss.backward()
            return loss.detach()
        return step

    auto = auto_chunk_size(n, v, 12, torch.device("cpu"))
    configs = [("unfused kd_loss", unfused)]
    configs += [(f"fused, {c or auto} rows" + (" (automatic)" if c == 0 else ""), fused(c)) for c in chunks]
    configs += [("unfused kd_loss (again)", unfused)]
    info = harness.machine_info("cpu")
    print(f"N={n} H={h} V={v} fp32 T=2 forward + backward; {harness.describe_machine(info)}\n")
    print("| configuration | fastest s | median s | peak extra MiB | other processes' CPU share |")
    print("| --- | --- | --- | --- | --- |")
    for name, step in configs:
        monitor = harness.CpuLoadMonitor().start()
        times = []
        for _ in range(args.repeats):
            reset()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        busy = monitor.stop().get("other_cpu_busy", float("nan"))
        mem = float("nan") if args.no_memory else harness.peak_extra_memory(step, reset=reset) / 2**20
        print(f"| {name} | {min(times):.2f} | {statistics.median(times):.2f} | {mem:.0f} "
              f"| {100 * busy:.0f}% |", flush=True)
        reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
