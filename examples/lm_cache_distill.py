#!/usr/bin/env python3
"""Language-model distillation from a teacher cache: sampled vs top-k vs dense KD.

A small causal-transformer teacher is trained on real text (the pure-Python sources of
the running interpreter's standard library), then students of one smaller size, with
the same initialisation, data, steps and optimiser, learn from:

  ce               the true next token only (no teacher);
  dense_kd         the live teacher's full distribution at every step (``kdfast.kd_loss``);
  sampled12        a ``kdfast.cache`` of 12 draws per token from the teacher
                   (``kdfast.sample_logits``), ``kdfast.sparse_kd_loss(values="probs")``;
  top{k}_renorm    a ``kdfast.cache`` of the teacher's top-k log-probabilities
                   (``kdfast.topk_logits``), ``tail="renormalize"``;
  top{k}_residual  the same cache, ``tail="residual"`` (the mass outside the top k as one bucket).

Every student is scored on held-out documents by perplexity (cross-entropy to the true
next token) and by KL(teacher || student) per token, both at T = 1; ``results.json`` and
``results.md`` go into ``--out``, the teacher checkpoint, vocabulary and caches into
``<out>/work`` (ignored by git).

    python examples/lm_cache_distill.py --out benchmarks/results/cpu-amd-epyc-2c/lm_cache_distill
    python examples/lm_cache_distill.py --quick --out /tmp/lm_quick      # tiny sizes, seconds

Corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (the interpreter's
own standard library: code, comments and docstrings; Python Software Foundation License
Version 2), without the test suites and the parts Debian packages separately (idlelib,
tkinter, turtledemo, lib2to3, ensurepip), so any CPython 3.11 install, including a fresh
Debian one, has it. Files are split into train / held-out by a hash of their path.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import kdfast  # noqa: E402
from kdfast.cache import CachedDataset, Sampled, TeacherCache, TopK  # noqa: E402

# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class ModelConfig:
    dim: int
    layers: int
    heads: int
    ff: int


@dataclasses.dataclass
class Config:
    vocab_size: int = 8192
    seq_len: int = 128
    max_docs: int | None = None          # None: the whole corpus
    heldout_every: int = 10              # about 1 file in heldout_every is held out
    teacher: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(192, 3, 4, 768))
    student: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(128, 2, 4, 512))
    batch_size: int = 16
    teacher_steps: int = 500
    teacher_lr: float = 2e-3
    student_steps: int = 150
    student_lr: float = 3e-3
    student_seqs: int = 1200             # the distillation set (the caches cover it): 2 epochs
    eval_seqs: int = 256                 # held-out sequences scored
    temperature: float = 1.0             # the same for every KD variant
    alpha: float = 0.0                   # weight of the hard-label CE term, the same for every KD variant
    sample_draws: int = 12
    topk: tuple[int, ...] = (12, 64)
    seeds: int = 3                       # ce, dense_kd and the sampled cache: students of this many seeds
    seed: int = 0


QUICK = Config(vocab_size=2048, seq_len=64, max_docs=80, teacher=ModelConfig(64, 1, 2, 128),
               student=ModelConfig(32, 1, 2, 64), batch_size=8, teacher_steps=120, teacher_lr=3e-3,
               student_steps=50, student_seqs=200, eval_seqs=48, topk=(12,), seeds=1)

TEACHER_KEYS = ("vocab_size", "seq_len", "max_docs", "heldout_every", "teacher", "batch_size",
                "teacher_steps", "teacher_lr", "seed")

# ------------------------------------------------------------------------------------ corpus

# Packages Debian ships outside python3.11 (idle-python3.11, python3-tk, python3-lib2to3,
# python3.11-venv, libpython3.11-testsuite), and Debian's own additions.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3",
                 "ensurepip", "site-packages", "dist-packages", "__pycache__"}
EXCLUDED_FILES = re.compile(r"^(sitecustomize|_distutils_system_mod|_sysconfigdata_.*)\.py$")
CORPUS_LICENCE = "Python Software Foundation License Version 2 (CPython standard library sources)"


def load_corpus(root: Path, max_docs: int | None) -> list[tuple[str, str]]:
    """``(path relative to root, text)`` of every standard-library source file, by path."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]) or EXCLUDED_FILES.match(rel.name):
            continue
        docs.append((rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")))
    if max_docs is not None:  # an evenly spread subset, not one corner of the library
        docs = docs[:: max(1, len(docs) // max_docs)][:max_docs]
    return docs


def is_heldout(name: str, every: int) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % every == 0


# --------------------------------------------------------------------------------- tokenizer

PIECE = re.compile(r"[A-Za-z]+|[0-9]+|\n[ \t]*|[ \t]+|.", re.S)


class WordCharTokenizer:
    """Words, numbers, indentation runs and single characters; no unknown words.

    The text is cut into pieces: letter runs, digit runs, a newline with the indentation
    after it, other space / tab runs, any other single character. The vocabulary holds
    ``<doc>`` (starts every file), ``<unk>`` (a character seen fewer than
    ``min_char_count`` times in training), every other character, and then the most
    frequent multi-character pieces (ties broken by the piece) up to ``vocab_size``. A
    piece outside the vocabulary is spelled character by character. Deterministic.
    """

    def __init__(self, pieces: list[str], coverage: float):
        self.pieces = pieces
        self.coverage = coverage  # fraction of the training pieces that are one token
        self.index = {p: i for i, p in enumerate(pieces)}
        self.doc, self.unk = self.index["<doc>"], self.index["<unk>"]

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, min_char_count: int = 10) -> WordCharTokenizer:
        counts: collections.Counter[str] = collections.Counter()
        chars: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(PIECE.findall(text))
            chars.update(text)
        pieces = ["<doc>", "<unk>"] + sorted(c for c, n in chars.items() if n >= min_char_count)
        words = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p], p))
        pieces += words[: max(0, vocab_size - len(pieces))]
        known = set(pieces)
        coverage = sum(n for p, n in counts.items() if p in known) / max(1, sum(counts.values()))
        return cls(pieces, coverage)

    def encode(self, text: str) -> list[int]:
        ids = [self.doc]
        index, unk = self.index, self.unk
        for piece in PIECE.findall(text):
            i = index.get(piece)
            if i is not None:
                ids.append(i)
            else:
                ids.extend(index.get(ch, unk) for ch in piece)
        return ids

    def __len__(self) -> int:
        return len(self.pieces)


def to_sequences(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """The files one after another, cut into ``[n, seq_len + 1]`` rows (inputs + next token)."""
    stream = torch.tensor([t for doc in docs for t in doc], dtype=torch.int64)
    n = (stream.numel() - 1) // seq_len
    return stream[(torch.arange(n) * seq_len)[:, None] + torch.arange(seq_len + 1)]


# ------------------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv, self.proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.ff), nn.Linear(cfg.ff, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Pre-LayerNorm causal transformer, learned positions, output tied to the embedding."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        residual_std = 0.02 / math.sqrt(2 * cfg.layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=residual_std if name.endswith(("proj.weight", "fc2.weight")) else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.embed.weight)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- training


def batch_order(n_seqs: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Sequence ids of every step: shuffled epochs, the same for every model given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    perm = torch.empty(0, dtype=torch.int64)
    while len(order) < steps:
        if perm.numel() < batch_size:
            perm = torch.cat([perm, torch.randperm(n_seqs, generator=gen)])
        order.append(perm[:batch_size])
        perm = perm[batch_size:]
    return order


def train(model: nn.Module, seqs: torch.Tensor, order: list[torch.Tensor], lr: float, loss_fn) -> float:
    """AdamW, linear warm-up then cosine decay, gradient clipping; returns the seconds spent.

    ``loss_fn(ids, inputs, targets, logits)`` gives the step's loss (``ids``: the batch's
    sequence ids, which key the teacher cache).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, len(order) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / len(order))))))
    model.train()
    start = time.perf_counter()
    for ids in order:
        batch = seqs[ids]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = loss_fn(ids, inputs, targets, model(inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, teacher: nn.Module | None, seqs: torch.Tensor, batch_size: int,
             topk: tuple[int, ...] = ()) -> dict[str, float]:
    """Held-out cross-entropy / perplexity to the true next token, and with a teacher the
    mean KL(teacher || model) per token (both at T = 1). ``topk``: also the model's mean
    probability mass on its k most likely tokens."""
    model.eval()
    ce_sum = kl_sum = 0.0
    mass = dict.fromkeys(topk, 0.0)
    tokens = 0
    for i in range(0, seqs.shape[0], batch_size):
        batch = seqs[i:i + batch_size]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logq = F.log_softmax(model(inputs).float(), -1)
        ce_sum += F.nll_loss(logq.flatten(0, 1), targets.flatten(), reduction="none").double().sum().item()
        if teacher is not None:
            logp = F.log_softmax(teacher(inputs).float(), -1)
            kl_sum += (logp.exp() * (logp - logq)).sum(-1).double().sum().item()
        for k in topk:
            mass[k] += logq.topk(k, -1).values.exp().sum(-1).double().sum().item()
        tokens += targets.numel()
    out = {"heldout_ce": ce_sum / tokens, "heldout_ppl": math.exp(ce_sum / tokens)}
    if teacher is not None:
        out["kl_teacher_student"] = kl_sum / tokens
    out.update({f"top{k}_mass": m / tokens for k, m in mass.items()})
    return out


# ----------------------------------------------------------------------------- teacher cache


def build_teacher_cache(storage: Sampled | TopK, teacher: nn.Module, seqs: torch.Tensor, cfg: Config,
                        folder: Path, seed: int) -> tuple[CachedDataset, dict, float]:
    """Runs the teacher once over the distillation set and writes its ``storage`` to
    ``folder`` (a ``kdfast.cache``, rebuilt from scratch; ``seed`` seeds sampled draws);
    returns the dataset that pairs each sequence with its cached teacher rows, the cache's
    ``info()`` and the build's seconds.
    """
    data = torch.utils.data.TensorDataset(seqs[:, :-1], seqs[:, 1:])  # item i: (inputs, targets)
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    TeacherCache.build(folder, teacher, data, storage=storage, temperature=cfg.temperature,
                       batch_size=cfg.batch_size, seed=seed, vocab_size=teacher.embed.num_embeddings,
                       progress=False)
    seconds = time.perf_counter() - start
    cache = TeacherCache.open(folder, teacher=teacher, temperature=cfg.temperature, storage=storage)
    return CachedDataset(data, cache), cache.info(), seconds


def cached_loss(cached: CachedDataset, tail: str, alpha: float):
    """The step loss of a cache variant: the batch's teacher rows, read from the cache's
    memory maps and decoded, against the student (``TeacherBatch.loss`` calls
    ``kdfast.sparse_kd_loss`` with the cache's values kind and temperature)."""

    def loss_fn(ids, inputs, targets, logits):
        _, _, teacher_rows = cached.collate([cached[i] for i in ids.tolist()])
        return teacher_rows.loss(logits, labels=targets, tail=tail, alpha=alpha)

    return loss_fn


# ------------------------------------------------------------------------------- experiment


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ops = ("kd_loss_fused", "topk_logits", "sample_logits", "sparse_kd_loss_fused")
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg": list(os.getloadavg()), "kdfast": kdfast.build_info(),
            "kdfast_cpu_kernels": {op: kdfast.has_kernel(op, "cpu") for op in ops}}


def ce_loss(ids, inputs, targets, logits):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def get_teacher(cfg: Config, tok: WordCharTokenizer, train_seqs: torch.Tensor, corpus_sha: str, work: Path,
                reuse: bool) -> tuple[TinyLM, float]:
    """Trains the teacher (saved to ``work/teacher.pt``), or loads it with ``reuse`` when
    the checkpoint was trained with the same settings on the same corpus."""
    torch.manual_seed(cfg.seed)
    teacher = TinyLM(cfg.teacher, len(tok), cfg.seq_len)
    ckpt = work / "teacher.pt"
    key = json.dumps([{k: dataclasses.asdict(cfg)[k] for k in TEACHER_KEYS}, corpus_sha], sort_keys=True)
    saved = torch.load(ckpt) if reuse and ckpt.exists() else None
    if saved is not None and saved["key"] == key:
        teacher.load_state_dict(saved["state_dict"])
        log("teacher: loaded the checkpoint")
        seconds = saved["seconds"]
    else:
        log(f"teacher: {count_params(teacher)} parameters, {cfg.teacher_steps} steps")
        order = batch_order(train_seqs.shape[0], cfg.batch_size, cfg.teacher_steps, cfg.seed + 1)
        seconds = train(teacher, train_seqs, order, cfg.teacher_lr, ce_loss)
        torch.save({"key": key, "state_dict": teacher.state_dict(), "seconds": seconds}, ckpt)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, seconds


def run(cfg: Config, out: Path, corpus_root: Path, reuse_teacher: bool = False) -> dict:
    t_start = time.perf_counter()
    loadavg_before = list(os.getloadavg())
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")  # checkpoint, vocabulary and caches stay local

    # ---- corpus, tokenizer, sequences
    docs = load_corpus(corpus_root, cfg.max_docs)
    if not docs:
        raise SystemExit(f"no standard-library sources under {corpus_root}; pass --corpus-root")
    train_docs = [(n, t) for n, t in docs if not is_heldout(n, cfg.heldout_every)]
    held_docs = [(n, t) for n, t in docs if is_heldout(n, cfg.heldout_every)]
    corpus_sha = hashlib.sha256()
    for name, text in docs:
        corpus_sha.update(name.encode() + b"\0" + text.encode("utf-8", "replace") + b"\0")
    log(f"corpus: {len(docs)} files from {corpus_root} ({len(train_docs)} train, {len(held_docs)} held out)")

    tok = WordCharTokenizer.train([t for _, t in train_docs], cfg.vocab_size)
    (work / "vocab.json").write_text(json.dumps(tok.pieces))
    train_ids = [tok.encode(t) for _, t in train_docs]
    train_seqs = to_sequences(train_ids, cfg.seq_len)
    held_seqs = to_sequences([tok.encode(t) for _, t in held_docs], cfg.seq_len)[: cfg.eval_seqs]
    vocab = len(tok)
    log(f"tokenizer: V={vocab}, {sum(map(len, train_ids))} train tokens ({tok.coverage:.1%} of the "
        f"pieces one token each), {train_seqs.shape[0]} train / {held_seqs.shape[0]} held-out sequences "
        f"of {cfg.seq_len}")

    # ---- teacher
    teacher, teacher_seconds = get_teacher(cfg, tok, train_seqs, corpus_sha.hexdigest(), work, reuse_teacher)
    teacher_eval = evaluate(teacher, None, held_seqs, cfg.batch_size, topk=cfg.topk)
    log(f"teacher: {teacher_seconds:.0f} s of training, held-out ppl {teacher_eval['heldout_ppl']:.2f}")

    # ---- the distillation set (a fixed subset of the training sequences) and its caches
    pick = torch.randperm(train_seqs.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 2))
    distill_seqs = train_seqs[pick[: cfg.student_seqs]]
    T, alpha = cfg.temperature, cfg.alpha

    def dense_loss(ids, inputs, targets, logits):
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return kdfast.kd_loss(logits, teacher_logits, targets, temperature=T, alpha=alpha)

    sampled = f"sampled{cfg.sample_draws}"
    specs = {"ce": ("true next token only", None, None),
             "dense_kd": ("live teacher forward every step, fp32 logits (kd_loss)", None, None),
             sampled: (f"cache: {cfg.sample_draws} draws/token (sample_logits), values=probs",
                       Sampled(cfg.sample_draws), "renormalize")}
    for k in cfg.topk:
        for tail, short in (("renormalize", "renorm"), ("residual", "residual")):
            specs[f"top{k}_{short}"] = (f"cache: top-{k} logprobs (topk_logits), tail={tail}", TopK(k), tail)
    caches: dict = {}
    cache_info: dict = {}

    def student_row(name: str, rep: int) -> dict:
        """Trains and scores one student; ``rep`` > 0: another student initialisation, batch
        order and (sampled cache) set of draws."""
        signal, storage, tail = specs[name]
        row: dict = {"name": name, "signal": signal, "rep": rep}
        if storage is None:
            loss_fn = ce_loss if name == "ce" else dense_loss
            row["bytes_per_token"] = 0 if name == "ce" else 4 * vocab
        else:
            cache_name = name.split("_")[0] + (f"_rep{rep}" if isinstance(storage, Sampled) and rep else "")
            if cache_name not in caches:
                caches[cache_name], info, seconds = build_teacher_cache(
                    storage, teacher, distill_seqs, cfg, work / "cache" / cache_name, seed=cfg.seed + rep)
                cache_info[cache_name] = {"storage": info["storage"], "bytes": info["bytes"],
                                          "bytes_per_token": info["bytes_per_token"],
                                          "build_seconds": seconds}
                log(f"cache {cache_name}: {info['bytes_per_token']:.2f} B/token, built in {seconds:.1f} s")
            loss_fn = cached_loss(caches[cache_name], tail, alpha)
            row.update(cache=cache_name, bytes_per_token=cache_info[cache_name]["bytes_per_token"])
        torch.manual_seed(cfg.seed + 4 + 1000 * rep)
        student = TinyLM(cfg.student, vocab, cfg.seq_len)
        order = batch_order(distill_seqs.shape[0], cfg.batch_size, cfg.student_steps,
                            cfg.seed + 3 + 1000 * rep)
        seconds = train(student, distill_seqs, order, cfg.student_lr, loss_fn)
        metrics = evaluate(student, teacher, held_seqs, cfg.batch_size, topk=cfg.topk)
        log(f"student {name:15s} {f'(rep {rep}) ' if rep else ''}ppl {metrics['heldout_ppl']:8.2f}  "
            f"KL {metrics['kl_teacher_student']:.4f}  {seconds:.0f} s")
        return {**row, **metrics, "train_seconds": seconds}

    # ---- students: same initialisation, batches, steps and optimiser; then the repeats
    rows = [student_row(name, 0) for name in specs]
    repeats = [student_row(name, rep) for rep in range(1, cfg.seeds) for name in ("ce", "dense_kd", sampled)]

    result = {
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "config": dataclasses.asdict(cfg),
        "corpus": {"root": str(corpus_root), "files": len(docs), "train_files": len(train_docs),
                   "heldout_files": len(held_docs), "sha256": corpus_sha.hexdigest(),
                   "licence": CORPUS_LICENCE},
        "tokenizer": {"kind": "words + characters (WordCharTokenizer)", "vocab_size": vocab,
                      "piece_coverage": tok.coverage, "train_tokens": sum(map(len, train_ids)),
                      "heldout_tokens_scored": held_seqs.shape[0] * cfg.seq_len},
        "teacher": {"params": count_params(teacher), "train_seconds": teacher_seconds,
                    "train_tokens_seen": cfg.teacher_steps * cfg.batch_size * cfg.seq_len, **teacher_eval},
        "student_params": count_params(TinyLM(cfg.student, vocab, cfg.seq_len)),
        "distill_tokens": distill_seqs.shape[0] * cfg.seq_len,
        "student_tokens_seen": cfg.student_steps * cfg.batch_size * cfg.seq_len,
        "caches": cache_info,
        "students": rows,
        "repeats": repeats,
        "spread": spread(rows + repeats),
        "machine": {**machine_info(), "loadavg_before": loadavg_before},
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(result))
    log(f"done in {result['total_seconds']:.0f} s: {out / 'results.md'}")
    return result


def spread(rows: list[dict]) -> dict:
    """Mean and sample standard deviation of perplexity and KL per variant over its seeds."""
    out: dict = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        out[name] = {"n": len(mine)}
        for key in ("heldout_ppl", "kl_teacher_student"):
            vals = [r[key] for r in mine]
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            out[name][key] = {"mean": mean, "sd": sd, "values": vals}
    return out


def compare(rows: dict, a: str, b: str) -> str:
    """One line: how variant ``a`` differs from ``b`` (relative change of perplexity and KL)."""
    ra, rb = rows[a], rows[b]
    dp = 100 * (ra["heldout_ppl"] / rb["heldout_ppl"] - 1)
    dk = 100 * (ra["kl_teacher_student"] / rb["kl_teacher_student"] - 1)
    return (f"- `{a}` vs `{b}`: perplexity {ra['heldout_ppl']:.2f} vs {rb['heldout_ppl']:.2f} ({dp:+.1f} %), "
            f"KL {ra['kl_teacher_student']:.4f} vs {rb['kl_teacher_student']:.4f} ({dk:+.1f} %), "
            f"{ra['bytes_per_token']:.0f} vs {rb['bytes_per_token']:.0f} bytes/token")


def render_markdown(r: dict) -> str:
    cfg, t, m, corpus, tok = r["config"], r["teacher"], r["machine"], r["corpus"], r["tokenizer"]
    kernels = ", ".join(f"{op} {'fused' if ok else 'plain-PyTorch fallback'}"
                        for op, ok in m["kdfast_cpu_kernels"].items())
    builds = ", ".join(f"{n} {c['build_seconds']:.0f} s" for n, c in r["caches"].items())
    masses = ", ".join(f"top-{k} {t[f'top{k}_mass']:.3f}" for k in cfg["topk"])
    lines = [
        "# Language-model distillation from a teacher cache",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']} with "
        f"{m['torch_threads']} thread(s), Python {m['python']}; kdfast CPU ops: {kernels}. "
        f"Total {r['total_seconds'] / 60:.1f} min.",
        "",
        f"Corpus: {corpus['files']} Python standard-library source files under `{corpus['root']}` "
        f"({corpus['train_files']} train, {corpus['heldout_files']} held out; sha256 "
        f"`{corpus['sha256'][:16]}`). Tokenizer: words + characters, V = {tok['vocab_size']}, "
        f"{tok['train_tokens']} train tokens.",
        f"Teacher: {t['params']} parameters ({cfg['teacher']['layers']} layers, "
        f"d = {cfg['teacher']['dim']}), {cfg['teacher_steps']} steps of {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens. Students: {r['student_params']} parameters "
        f"({cfg['student']['layers']} layers, d = {cfg['student']['dim']}), same initialisation and "
        f"batches, {cfg['student_steps']} steps over {r['distill_tokens']} distillation tokens, "
        f"T = {cfg['temperature']}, alpha = {cfg['alpha']}. Scored on {tok['heldout_tokens_scored']} "
        "held-out tokens.",
        "",
        "| variant | teacher signal | bytes/token | held-out ppl | KL(teacher ‖ student) | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in r["students"]:
        bpt = f"{row['bytes_per_token']:.0f}" + (" (live)" if row["name"] == "dense_kd" else "")
        lines.append(f"| {row['name']} | {row['signal']} | {bpt} | {row['heldout_ppl']:.2f} | "
                     f"{row['kl_teacher_student']:.4f} | {row['train_seconds']:.0f} |")
    lines.append(f"| (teacher) | | | {t['heldout_ppl']:.2f} | 0 | {t['train_seconds']:.0f} |")
    lines += [
        "",
        "Bytes/token: the cache's files over its token rows (`TeacherCache.info()`); for `dense_kd`, "
        "the fp32 logits the live teacher hands over at each step. Train s: the student's training "
        "loop, including the teacher's forward (`dense_kd`) or the cache reads (cache variants); each "
        f"cache was built once ({builds}). The teacher's mean top-k probability mass on held-out "
        f"tokens: {masses}.",
        "",
        "Relative to dense KD and to CE:",
        "",
    ]
    rows = {row["name"]: row for row in r["students"]}
    sampled = f"sampled{cfg['sample_draws']}"
    pairs = [(sampled, "dense_kd"), (sampled, "ce"), ("dense_kd", "ce")]
    pairs += [(f"top{k}_{tail}", "dense_kd") for k in cfg["topk"] for tail in ("renorm", "residual")]
    lines += [compare(rows, a, b) for a, b in pairs]
    if r["repeats"]:
        n = cfg["seeds"]
        lines += ["", f"Over {n} seeds (student initialisation, batch order and, for `{sampled}`, the "
                  "cache's draws; seed 0 is the table above):", "",
                  "| variant | held-out ppl per seed | mean ± sd | KL per seed | mean ± sd |",
                  "| --- | --- | ---: | --- | ---: |"]
        for name, st in r["spread"].items():
            if st["n"] < 2:
                continue
            ppl, kl = st["heldout_ppl"], st["kl_teacher_student"]
            ppls = ", ".join(f"{v:.2f}" for v in ppl["values"])
            kls = ", ".join(f"{v:.4f}" for v in kl["values"])
            lines.append(f"| {name} | {ppls} | {ppl['mean']:.2f} ± {ppl['sd']:.2f} | {kls} | "
                         f"{kl['mean']:.4f} ± {kl['sd']:.4f} |")
        by_rep = {(row["name"], row["rep"]): row for row in r["students"] + r["repeats"]}
        for other in ("dense_kd", "ce"):
            d_ppl = [by_rep[sampled, i]["heldout_ppl"] - by_rep[other, i]["heldout_ppl"] for i in range(n)]
            d_kl = [by_rep[sampled, i]["kl_teacher_student"] - by_rep[other, i]["kl_teacher_student"]
                    for i in range(n)]
            lines += ["", f"`{sampled}` minus `{other}`, seed by seed: perplexity "
                      + ", ".join(f"{d:+.2f}" for d in d_ppl) + "; KL " + ", ".join(f"{d:+.4f}" for d in d_kl)
                      + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json / results.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    parser.add_argument("--corpus-root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="the standard library to read (default: this interpreter's)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="weight of the hard-label CE term in every KD variant (default 0)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="students of ce, dense_kd and the sampled cache with this many seeds "
                             "(default: 3, or 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="load <out>/work/teacher.pt when it was trained with the same settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(QUICK if args.quick else Config())
    if args.alpha is not None:
        cfg.alpha = args.alpha
    if args.seeds is not None:
        cfg.seeds = args.seeds
    run(cfg, args.out, args.corpus_root, args.reuse_teacher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
