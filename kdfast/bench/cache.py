"""Benchmark of the teacher cache (:mod:`kdfast.cache`), ``kdfast bench --op cache``.

Three measurements, each on this machine with small transformer language models:

- **bytes per token** of each storage kind (top-k k=64 in fp16 / bf16, 12 sampled
  draws, dense fp16) at LLM vocabulary sizes, from the files a build writes
  (records and the per-sample row index);
- **build throughput**: ``TeacherCache.build`` against the teacher's own forward over
  the same batches; the difference is what the top-k / sampling op and the writer add
  (split into the op alone and the rest);
- **a student epoch** trained from the cache (``CachedDataset`` +
  ``sparse_kd_loss``) against one that runs the teacher live (``kd_loss`` on the
  teacher's logits).

Unlike the loss benchmarks (:mod:`kdfast.bench.common`) it has no providers x cases
grid: it writes ``cache.csv`` (one row per measured value), ``cache.md`` (the tables
and the targets) and ``machine.json``.

Example::

    python -m kdfast bench --op cache --quick --out /tmp/cache-bench
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdfast.bench import harness

NAME = "cache"
SUMMARY = ("The teacher cache: bytes per token of each storage kind, the build's overhead over the "
           "teacher forward, a student epoch from the cache vs with the teacher live.")
TEMPERATURE = 2.0


@dataclass(frozen=True)
class Setup:
    """Sizes of one run. Teacher and student are pre-norm causal transformers."""

    vocab: int
    teacher_dim: int
    teacher_layers: int
    student_dim: int
    student_layers: int
    seq: int
    samples: int
    batch: int
    repeats: int
    byte_vocabs: tuple
    byte_tokens: int
    k: int = 64
    draws: int = 12
    teacher_dtype: torch.dtype = torch.float32

    @property
    def tokens(self) -> int:
        return self.seq * self.samples


FULL = Setup(vocab=32000, teacher_dim=768, teacher_layers=6, student_dim=256, student_layers=2, seq=128,
             samples=16, batch=4, repeats=2, byte_vocabs=(32000, 128256), byte_tokens=128)
QUICK = Setup(vocab=4000, teacher_dim=128, teacher_layers=2, student_dim=64, student_layers=1, seq=32,
              samples=8, batch=4, repeats=1, byte_vocabs=(32000,), byte_tokens=64)
# on a GPU: a bf16 teacher of 1024 x 12 layers over 128 sequences of 1024 tokens (batches of 16k tokens)
FULL_GPU = Setup(vocab=32000, teacher_dim=1024, teacher_layers=12, student_dim=512, student_layers=4,
                 seq=1024, samples=128, batch=16, repeats=3, byte_vocabs=(32000, 128256), byte_tokens=128,
                 teacher_dtype=torch.bfloat16)
QUICK_GPU = Setup(vocab=32000, teacher_dim=256, teacher_layers=2, student_dim=128, student_layers=1, seq=256,
                  samples=16, batch=8, repeats=1, byte_vocabs=(32000,), byte_tokens=64,
                  teacher_dtype=torch.bfloat16)


class BenchLM(nn.Module):
    """A pre-norm causal transformer LM: ids ``[B, L]`` -> logits ``[B, L, vocab]``."""

    def __init__(self, vocab: int, dim: int, layers: int, seed: int, max_len: int = 1024) -> None:
        super().__init__()
        gen = torch.random.fork_rng()
        with gen:
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, nhead=max(1, dim // 64), dim_feedforward=4 * dim,
                                               dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            with torch.no_grad():
                self.head.weight.mul_(8.0)  # a peaked teacher distribution, as a trained LM has

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        seq = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos[:seq]
        causal = nn.Transformer.generate_square_subsequent_mask(seq, device=input_ids.device)
        h = self.blocks(h, mask=causal, is_causal=True)
        return self.head(self.norm(h))


class RandomLogits(nn.Module):
    """A stand-in teacher for the bytes-per-token builds: random logits ``[B, L, V]``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(input_ids[0, 0]))
        return 4.0 * torch.randn(*input_ids.shape, self.vocab, generator=g)


def token_data(setup: Setup, vocab: int, samples: int | None = None, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples or setup.samples, setup.seq), generator=g)
    return [{"input_ids": row, "labels": torch.roll(row, -1)} for row in ids]


def _best(fn, repeats: int, device: str = "cpu") -> float:
    """Best (least) wall time of ``repeats`` runs of ``fn``, in seconds (the device
    synchronised before and after each)."""
    times = []
    for _ in range(repeats):
        harness.synchronize(device)
        t0 = time.perf_counter()
        fn()
        harness.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _teacher(setup: Setup, device: str) -> BenchLM:
    dtype = setup.teacher_dtype if device.startswith("cuda") else torch.float32
    return BenchLM(setup.vocab, setup.teacher_dim, setup.teacher_layers, seed=0).to(device, dtype).eval()


def _storages():
    from kdfast.cache import Dense, Sampled, TopK

    return {"topk-64-fp16": TopK(k=64), "topk-64-bf16": TopK(k=64, dtype=torch.bfloat16),
            "sampled-12": Sampled(num_samples=12), "dense-fp16": Dense()}


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def measure_bytes(setup: Setup, folder: Path, log) -> list:
    """Builds a small cache of each kind at each vocabulary size; bytes per token and
    per entry from its files."""
    from kdfast.cache import TeacherCache

    rows = []
    seq = 64
    samples = max(1, setup.byte_tokens // seq)
    for vocab in setup.byte_vocabs:
        items = [{"input_ids": torch.full((seq,), i, dtype=torch.int64)} for i in range(samples)]
        loader = torch.utils.data.DataLoader(items, batch_size=max(1, samples // 2))
        for name, storage in _storages().items():
            path = folder / f"bytes-{name}-{vocab}"
            cache = TeacherCache.build(path, RandomLogits(vocab), loader, storage=storage,
                                       temperature=TEMPERATURE, fingerprint=f"random-{vocab}", progress=False)
            info = cache.info()
            index_bytes = sum(s["files"]["offsets"]["bytes"] for s in cache.shards)
            width = storage.width(vocab)
            value_field = cache.fields.get("values") or cache.fields.get("counts") or cache.fields["logits"]
            rows.append({"storage": name, "vocab": vocab, "tokens": info["rows"],
                         "index_type": cache.fields["indices"].elem if "indices" in cache.fields else "-",
                         "value_type": value_field.elem, "entries": width,
                         "bytes_per_token": info["bytes_per_token"],
                         "bytes_per_entry": info["bytes"] / (info["rows"] * width),
                         "index_bytes_per_token": index_bytes / info["rows"]})
            log(f"  bytes: {name} V={vocab}: {info['bytes_per_token']:.2f} B/token")
            shutil.rmtree(path)
    return rows


def measure_build(setup: Setup, folder: Path, log, device: str = "cpu") -> list:
    """Teacher forward alone vs the cache build, over the same batches."""
    import kdfast
    from kdfast.cache import Sampled, TeacherCache, TopK, teacher_fingerprint

    teacher = _teacher(setup, device)
    items = token_data(setup, setup.vocab)
    loader = torch.utils.data.DataLoader(items, batch_size=setup.batch)

    def forward_only():
        with torch.inference_mode():
            for batch in loader:
                teacher(batch["input_ids"].to(device, non_blocking=True))

    t_forward = _best(forward_only, setup.repeats, device)
    with torch.inference_mode():
        logits = [teacher(b["input_ids"].to(device)) for b in loader]
    t0 = time.perf_counter()
    teacher_fingerprint(teacher)
    t_fingerprint = time.perf_counter() - t0
    rows = []
    kinds = (("topk-64-fp16", TopK(k=setup.k)), ("sampled-12", Sampled(num_samples=setup.draws)))
    for name, storage in kinds:
        if isinstance(storage, TopK):
            def op(x, storage=storage):
                return kdfast.topk_logits(x, storage.k, temperature=TEMPERATURE, index_dtype=torch.int32)
            kernel = "topk_logits"
        else:
            def op(x, storage=storage):
                g = torch.Generator(device=x.device).manual_seed(0)
                return kdfast.sample_logits(x, storage.num_samples, temperature=TEMPERATURE, generator=g,
                                            index_dtype=torch.int32)
            kernel = "sample_logits"

        def ops_only(op=op):
            for x in logits:
                op(x)

        t_op = _best(ops_only, setup.repeats, device)

        def build(storage=storage, name=name):  # the last one is kept: the epoch reads it
            path = folder / f"build-{name}"
            if path.exists():
                shutil.rmtree(path)
            TeacherCache.build(path, teacher, loader, storage=storage, temperature=TEMPERATURE,
                               fingerprint="bench-teacher", progress=False)

        t_build = _best(build, setup.repeats, device)
        overhead = (t_build - t_forward) / t_forward
        rows.append({"storage": name, "tokens": setup.tokens, "forward_s": t_forward, "build_s": t_build,
                     "overhead": overhead, "op_s": t_op, "rest_s": t_build - t_forward - t_op,
                     "writer_overhead": (t_build - t_forward - t_op) / t_forward,
                     "fingerprint_s": t_fingerprint,
                     "op_impl": ("kernel" if kdfast.has_kernel(kernel, device.split(":")[0])
                                 else "plain-PyTorch reference")})
        log(f"  build: {name}: forward {t_forward:.2f} s, build {t_build:.2f} s ({100 * overhead:+.1f}%), "
            f"op alone {t_op:.2f} s")
    logits.clear()  # free the logits before the next measurement
    return rows


def measure_epoch(setup: Setup, folder: Path, log, device: str = "cpu") -> list:
    """One student epoch with the teacher live vs from a top-k cache."""
    import kdfast
    from kdfast.cache import CachedDataset, TeacherCache, TopK

    teacher = _teacher(setup, device)
    items = token_data(setup, setup.vocab)
    loader = torch.utils.data.DataLoader(items, batch_size=setup.batch)
    # the top-k cache of the build measurement (the same teacher and data), else a new one
    cache = TeacherCache.build(folder / "build-topk-64-fp16", teacher, loader, storage=TopK(k=setup.k),
                               temperature=TEMPERATURE, fingerprint="bench-teacher", progress=False)
    data = CachedDataset(items, cache)

    def student():
        s = BenchLM(setup.vocab, setup.student_dim, setup.student_layers, seed=1).to(device)
        return s, torch.optim.SGD(s.parameters(), lr=1e-3)

    def live():
        s, opt = student()
        for batch in loader:
            ids = batch["input_ids"].to(device, non_blocking=True)
            with torch.no_grad():
                t = teacher(ids)
            out = s(ids)
            loss = kdfast.kd_loss(out.flatten(0, 1), t.flatten(0, 1), temperature=TEMPERATURE)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def from_cache():
        s, opt = student()
        for x, _, tb in data.loader(batch_size=setup.batch, pin_memory=device.startswith("cuda")):
            tb = tb.to(device, non_blocking=True)
            loss = tb.loss(s(x["input_ids"].to(device, non_blocking=True)), tail="residual")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def read_only():
        for _ in data.loader(batch_size=setup.batch):
            pass

    def student_alone():
        s, opt = student()
        for batch in loader:
            out = s(batch["input_ids"].to(device, non_blocking=True))
            out.float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = {"live teacher": _best(live, setup.repeats, device),
             "from the cache": _best(from_cache, setup.repeats, device),
             "cache reads alone": _best(read_only, setup.repeats, device),
             "student step alone": _best(student_alone, setup.repeats, device)}
    for name, t in times.items():
        log(f"  epoch: {name}: {t:.2f} s")
    impl = ("kernel" if kdfast.has_kernel("sparse_kd_loss_fused", device.split(":")[0])
            else "plain-PyTorch reference")
    return [{"mode": name, "tokens": setup.tokens, "seconds": t, "tokens_per_s": setup.tokens / t,
             "speedup": times["live teacher"] / t, "sparse_loss_impl": impl} for name, t in times.items()]


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def targets(byte_rows: list, build_rows: list) -> list:
    from kdfast.bench.common import target

    out = []
    for r in byte_rows:
        if r["storage"] == "sampled-12":
            out.append(target(f"sampled, 12 draws, V={r['vocab']}: bytes per token (with its index)",
                              r["bytes_per_token"], ".2f", 64, False))
        if r["storage"].startswith("topk-64"):
            out.append(target(f"top-k k=64 {r['value_type']}, V={r['vocab']}: bytes per entry "
                              "(with its index)", r["bytes_per_entry"], ".3f", 6, False))
    for r in build_rows:
        out.append(target(f"{r['storage']} build: time added to the teacher forward (op: {r['op_impl']})",
                          100 * r["overhead"], ".1f", 10, False, goal_text="<= 10 %"))
        out.append(target(f"{r['storage']} build: time the writer adds (build - forward - op alone)",
                          100 * r["writer_overhead"], ".1f", 10, False, goal_text="<= 10 %"))
    return out


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(x) for x in row) + " |" for row in rows)]


def write_report(out: Path, setup: Setup, info: dict, copy_bw: float, byte_rows: list, build_rows: list,
                 epoch_rows: list, quick: bool, device: str = "cpu") -> list:
    """Writes ``cache.csv``, ``cache.md`` and ``machine.json``; returns the targets."""
    from kdfast.bench.common import targets_markdown

    goals = targets(byte_rows, build_rows)
    with open(out / f"{NAME}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "case", "metric", "value"])
        for r in byte_rows:
            for key in ("bytes_per_token", "bytes_per_entry", "index_bytes_per_token"):
                w.writerow(["bytes", f"{r['storage']} V={r['vocab']}", key, f"{r[key]:.6f}"])
        for r in build_rows:
            for key in ("forward_s", "build_s", "overhead", "op_s", "rest_s", "writer_overhead",
                        "fingerprint_s"):
                w.writerow(["build", r["storage"], key, f"{r[key]:.6f}"])
        for r in epoch_rows:
            for key in ("seconds", "tokens_per_s", "speedup"):
                w.writerow(["epoch", r["mode"], key, f"{r[key]:.6f}"])
    s = setup
    teacher_dtype = harness.DTYPE_NAMES[setup.teacher_dtype if device.startswith("cuda") else torch.float32]
    lines = [f"# teacher cache benchmark on {device} ({harness.machine_tag(info)})", "",
             f"- machine: {harness.describe_machine(info)}",
             f"- date: {info['date']}, git {info['git_commit']}",
             f"- load average before the run: {info.get('loadavg_before')}"]
    lines += [f"- {line}" for line in harness.load_lines(info)]
    lines += [f"- teacher: causal transformer, d={s.teacher_dim}, {s.teacher_layers} layers, V={s.vocab}, "
              f"{teacher_dtype}; "
              f"student: d={s.student_dim}, {s.student_layers} layers; {s.samples} sequences of {s.seq} "
              f"tokens in batches of {s.batch}; T={TEMPERATURE}; times are the best of {s.repeats} runs",
              "- builds write through the page cache with fsync at each shard commit (the default)"]
    if quick:
        lines.append("- QUICK run: tiny models, numbers are rough")

    lines += ["", "## Bytes per token", "",
              "From the files of a build (random logits, sequences of 64 tokens): the fixed-stride "
              "records and the per-sample row offsets (8 bytes per sample + 8, the last column).", ""]
    lines += _table(["storage", "V", "token ids", "values", "entries / token", "bytes / token",
                     "bytes / entry", "index bytes / token"],
                    [[r["storage"], r["vocab"], r["index_type"], r["value_type"], r["entries"],
                      f"{r['bytes_per_token']:.2f}", f"{r['bytes_per_entry']:.3f}",
                      f"{r['index_bytes_per_token']:.3f}"] for r in byte_rows])

    lines += ["", "## Build throughput", "",
              f"`TeacherCache.build` over {s.tokens} tokens vs the teacher's forward alone over the same "
              "batches (`torch.inference_mode`); `op alone` = the top-k / sampling op on the same "
              "logits; `writer` = build - forward - op alone: encoding, copies to the host, writing, "
              "checksums and fsync, done by a thread behind the teacher (below 0 when that overlap "
              "also hides some of the op). "
              "The teacher fingerprint (sha256 of the weights, once per build) is apart: "
              f"{build_rows[0]['fingerprint_s']:.2f} s here.", ""]
    lines += _table(["storage", "forward s", "build s", "added", "op alone s", "writer s", "op",
                     "build tokens/s"],
                    [[r["storage"], f"{r['forward_s']:.3f}", f"{r['build_s']:.3f}",
                      f"{100 * r['overhead']:+.1f}%", f"{r['op_s']:.3f}", f"{r['rest_s']:.3f}", r["op_impl"],
                      f"{r['tokens'] / r['build_s']:.0f}"] for r in build_rows])

    impl = epoch_rows[0]["sparse_loss_impl"]
    lines += ["", "## Student epoch", "",
              f"One epoch of SGD on the student over {s.tokens} tokens: `live teacher` runs the teacher "
              "(`torch.no_grad`) and `kdfast.kd_loss` on its full logits; `from the cache` reads a top-k "
              "k=64 cache through `CachedDataset` and trains with `sparse_kd_loss` "
              f"(`tail=\"residual\"`; {impl}); `cache reads alone` only iterates the loader (decode + "
              "pad); `student step alone` is the student's forward + backward without any teacher.", ""]
    lines += _table(["mode", "epoch s", "tokens/s", "speed-up vs live"],
                    [[r["mode"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}"]
                     for r in epoch_rows])
    lines += ["", targets_markdown(goals)]
    (out / f"{NAME}.md").write_text("\n".join(lines).rstrip() + "\n")
    harness.write_machine(info, copy_bw, out / "machine.json")
    return goals


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options only this benchmark has."""
    p.add_argument("--cache-vocab", type=int, default=None, metavar="V",
                   help="vocabulary of the teacher / student of the build and epoch runs "
                        f"(default {FULL.vocab}; {QUICK.vocab} with --quick)")
    p.add_argument("--cache-repeats", type=int, default=None, metavar="N",
                   help=f"runs of each timing, the best is kept (default {FULL.repeats})")


def run(args: argparse.Namespace) -> list:
    """Runs the benchmark with the parsed ``args`` (``quick``, ``out``, ``threads``,
    ``quiet`` and the options of :func:`add_arguments`); returns the targets."""
    from kdfast.bench.common import resolve_device

    device = resolve_device(getattr(args, "device", "auto") or "auto")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if device.startswith("cuda"):
        setup = QUICK_GPU if args.quick else FULL_GPU
    else:
        setup = QUICK if args.quick else FULL
    changes = {}
    if getattr(args, "cache_vocab", None):
        changes["vocab"] = args.cache_vocab
    if getattr(args, "cache_repeats", None):
        changes["repeats"] = args.cache_repeats
    if changes:
        from dataclasses import replace

        setup = replace(setup, **changes)
    quiet = getattr(args, "quiet", False)
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    info = harness.machine_info(device)
    out = args.out or Path("kdfast-bench") / harness.machine_tag(info)
    out.mkdir(parents=True, exist_ok=True)
    log(f"kdfast bench cache: {harness.describe_machine(info)} -> {out}")
    copy_bw = harness.copy_bandwidth(device, nbytes=64 * 2**20, budget_s=0.2)
    wait = getattr(args, "wait_quiet", 0.0) or 0.0
    if wait > 0 and not harness.wait_for_quiet(wait, log=log):
        log(f"the machine did not get quiet within {wait:g} s; running anyway")
    before = harness.CpuLoadMonitor().start()
    time.sleep(0.5 if args.quick else 1.0)
    info["cpu_load_before"] = before.stop()
    monitor = harness.CpuLoadMonitor().start()
    import warnings

    with tempfile.TemporaryDirectory(prefix="kdfast-cache-bench-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="kdfast.*plain-PyTorch reference")
        folder = Path(tmp)
        byte_rows = measure_bytes(setup, folder, log)
        build_rows = measure_build(setup, folder, log, device)
        epoch_rows = measure_epoch(setup, folder, log, device)
    info["cpu_load_during"] = monitor.stop()
    info["loadavg_after"] = list(os.getloadavg())
    goals = write_report(out, setup, info, copy_bw, byte_rows, build_rows, epoch_rows, args.quick, device)
    if not quiet:
        print((out / f"{NAME}.md").read_text())
        print(f"wrote {out}/{NAME}.csv, {NAME}.md, machine.json")
    return goals


def main(argv: list | None = None, *, default_out=None) -> int:
    """``python -m kdfast.bench.cache`` / ``benchmarks/bench_cache.py``."""
    p = argparse.ArgumentParser(prog="kdfast bench --op cache", description=SUMMARY)
    p.add_argument("--quick", action="store_true", help="tiny models: a smoke run in seconds")
    p.add_argument("--out", type=Path, default=None, help="output folder (default ./kdfast-bench/<machine>)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS until other processes use < 5%% of the CPUs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.out is None and default_out is not None:
        args.out = default_out("cpu")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

