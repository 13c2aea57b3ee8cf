#!/usr/bin/env python3
"""Language-model distillation from a teacher cache: sampled vs top-k vs dense KD.

A small causal-transformer teacher is trained on real text (the pure-Python sources
of the running interpreter's standard library), then students of one smaller size,
with the same initialisation, data and steps, learn from:

  ce              the true next token only (no teacher);
  dense_kd        the live teacher's full distribution, ``kdfast.kd_loss``;
  sampled12       a cache of 12 draws per token from the teacher (``kdfast.sample_logits``),
                  ``kdfast.sparse_kd_loss(values="probs")``;
  top{k}_renorm   a cache of the teacher's top-k log-probabilities (``kdfast.topk_logits``),
                  ``tail="renormalize"``;
  top{k}_residual the same cache, ``tail="residual"`` (the mass outside the top k as one bucket).

Every student is scored on held-out documents by perplexity (cross-entropy to the true
next token) and by KL(teacher || student) per token, and ``results.json`` /
``results.md`` are written into ``--out``.

    python examples/lm_cache_distill.py --out benchmarks/results/cpu-amd-epyc-2c/lm_cache_distill
    python examples/lm_cache_distill.py --quick --out /tmp/lm_quick      # under a minute

Corpus: every ``*.py`` file of ``sysconfig.get_paths()["stdlib"]`` (the interpreter's own
standard library: code, comments and docstrings; Python Software Foundation License),
without the test suites and the packages Debian ships separately (idlelib, tkinter,
turtledemo, lib2to3, ensurepip), so a fresh Debian + Python 3.11 machine has the same
files. Documents are split into train / held-out by a hash of their path.
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
    heldout_every: int = 10              # about 1 document in heldout_every is held out
    teacher: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(192, 3, 4, 768))
    student: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(128, 2, 4, 512))
    batch_size: int = 16
    teacher_steps: int = 500
    teacher_lr: float = 2e-3
    student_steps: int = 200
    student_lr: float = 3e-3
    student_seqs: int = 1600             # the distillation set: the cache covers these sequences
    eval_seqs: int = 256                 # held-out sequences scored
    temperature: float = 1.0
    alpha: float = 0.0                   # weight of the hard-label CE term in every KD variant
    sample_draws: int = 12
    topk: tuple[int, ...] = (12, 64)
    seed: int = 0


QUICK = Config(vocab_size=2048, seq_len=64, max_docs=120, teacher=ModelConfig(64, 1, 2, 128),
               student=ModelConfig(32, 1, 2, 64), batch_size=8, teacher_steps=120, teacher_lr=3e-3,
               student_steps=40, student_seqs=160, eval_seqs=32, topk=(12,))

# ------------------------------------------------------------------------------------ corpus

# Packages Debian ships outside python3.11 (idle-python3.11, python3-tk, python3-lib2to3,
# python3.11-venv, libpython3.11-testsuite), and Debian's own additions.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3",
                 "ensurepip", "site-packages", "dist-packages", "__pycache__"}
EXCLUDED_FILES = re.compile(r"^(sitecustomize|_distutils_system_mod|_sysconfigdata_.*)\.py$")


def load_corpus(root: Path, max_docs: int | None) -> list[tuple[str, str]]:
    """(relative path, text) of every stdlib source file, sorted by path."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]) or EXCLUDED_FILES.match(rel.name):
            continue
        docs.append((rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")))
    if max_docs is not None:  # an evenly spread subset, not one corner of the library
        step = max(1, len(docs) // max_docs)
        docs = docs[::step][:max_docs]
    return docs


def is_heldout(name: str, every: int) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % every == 0


# --------------------------------------------------------------------------------- tokenizer

PIECE = re.compile(r"[A-Za-z]+|[0-9]+|\n[ \t]*|[ \t]+|.", re.S)


class WordCharTokenizer:
    """Words, numbers, runs of indentation and single characters; no unknown words.

    The text is cut into pieces (letter runs, digit runs, a newline with the indentation
    after it, other whitespace runs, any other single character). The vocabulary holds
    two special tokens (``<doc>`` starts every document, ``<unk>`` stands for a character
    never seen in training), every character seen at least ``min_char_count`` times, and
    then the most frequent multi-character pieces (ties broken by the piece itself) up to
    ``vocab_size``. A piece outside the vocabulary is spelled out character by character.
    Deterministic: the same training texts give the same vocabulary.
    """

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
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
        return cls(pieces)

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
    """The documents one after another, cut into ``[n, seq_len + 1]`` rows (inputs + next)."""
    stream = torch.tensor([t for doc in docs for t in doc], dtype=torch.int64)
    n = (stream.numel() - 1) // seq_len
    starts = torch.arange(n) * seq_len
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


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
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
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
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, std=std)
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
    """AdamW, linear warm-up then cosine decay, gradient clipping; returns seconds spent."""
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
def evaluate(model: nn.Module, teacher: nn.Module | None, seqs: torch.Tensor,
             batch_size: int) -> dict[str, float]:
    """Held-out perplexity and mean KL(teacher || model) per token (both at T = 1)."""
    model.eval()
    if teacher is not None:
        teacher.eval()
    ce_sum = kl_sum = 0.0
    tokens = 0
    for i in range(0, seqs.shape[0], batch_size):
        batch = seqs[i:i + batch_size]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logq = F.log_softmax(model(inputs).double(), -1)
        ce_sum += F.nll_loss(logq.flatten(0, 1), targets.flatten(), reduction="sum").item()
        if teacher is not None:
            logp = F.log_softmax(teacher(inputs).double(), -1)
            kl_sum += (logp.exp() * (logp - logq)).sum().item()
        tokens += targets.numel()
    out = {"heldout_ce": ce_sum / tokens, "heldout_ppl": math.exp(ce_sum / tokens)}
    if teacher is not None:
        out["kl_teacher_student"] = kl_sum / tokens
    return out


# ----------------------------------------------------------------------------- teacher cache


@dataclasses.dataclass
class CachedSignal:
    """The teacher's sparse signal for every position of the distillation set."""

    indices: torch.Tensor        # [n_seqs, seq_len, K] int64, -1 = padding
    values: torch.Tensor         # [n_seqs, seq_len, K] float32 (probs or logprobs)
    values_kind: str             # "probs" or "logprobs"
    bytes_per_token: float       # the stored size, per token
    build_seconds: float


@torch.no_grad()
def build_teacher_cache(kind: str, k: int, teacher: nn.Module, seqs: torch.Tensor, cfg: Config,
                        cache_dir: Path) -> CachedSignal:
    """Run the teacher once over ``seqs`` and keep ``k`` entries per token.

    ``kind`` is ``"sample"`` (``k`` draws, weights count / k) or ``"topk"`` (the ``k``
    largest log-probabilities).
    """
    teacher.eval()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    idx_parts, val_parts = [], []
    for i in range(0, seqs.shape[0], cfg.batch_size):
        logits = teacher(seqs[i:i + cfg.batch_size, :-1])
        if kind == "sample":
            idx, val = kdfast.sample_logits(logits, k, temperature=cfg.temperature, generator=gen)
        else:
            idx, val = kdfast.topk_logits(logits, k, temperature=cfg.temperature)
        idx_parts.append(idx)
        val_parts.append(val)
    indices, values = torch.cat(idx_parts), torch.cat(val_parts)
    # Stored as int16 token ids + float16 values until the on-disk cache is used here.
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{kind}{k}.pt"
    torch.save({"indices": indices.to(torch.int16), "values": values.half()}, path)
    nbytes = path.stat().st_size
    return CachedSignal(indices, values, "probs" if kind == "sample" else "logprobs",
                        nbytes / (indices.shape[0] * indices.shape[1]), time.perf_counter() - start)


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
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        info["kdfast"] = kdfast.build_info()
    except Exception as exc:  # pragma: no cover - informational only
        info["kdfast"] = repr(exc)
    return info


def run(cfg: Config, out: Path, corpus_root: Path, reuse_teacher: bool) -> dict:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)

    docs = load_corpus(corpus_root, cfg.max_docs)
    train_docs = [(n, t) for n, t in docs if not is_heldout(n, cfg.heldout_every)]
    held_docs = [(n, t) for n, t in docs if is_heldout(n, cfg.heldout_every)]
    corpus_hash = hashlib.sha256()
    for name, text in docs:
        corpus_hash.update(name.encode() + b"\0" + text.encode("utf-8", "replace") + b"\0")
    log(f"corpus: {len(docs)} files from {corpus_root} ({len(train_docs)} train, {len(held_docs)} held out)")

    tok = WordCharTokenizer.train([t for _, t in train_docs], cfg.vocab_size)
    (work / "vocab.json").write_text(json.dumps(tok.pieces))
    train_ids = [tok.encode(t) for _, t in train_docs]
    held_ids = [tok.encode(t) for _, t in held_docs]
    train_seqs = to_sequences(train_ids, cfg.seq_len)
    held_seqs = to_sequences(held_ids, cfg.seq_len)[: cfg.eval_seqs]
    n_train_tokens = sum(map(len, train_ids))
    spelled = sum(1 for doc in train_ids[:50] for t in doc if len(tok.pieces[t]) == 1)
    log(f"tokenizer: V={len(tok)}, {n_train_tokens} train tokens, {train_seqs.shape[0]} train / "
        f"{held_seqs.shape[0]} held-out sequences of {cfg.seq_len}")

    # ---- teacher
    torch.manual_seed(cfg.seed)
    teacher = TinyLM(cfg.teacher, len(tok), cfg.seq_len)
    ckpt = work / "teacher.pt"
    teacher_cfg_key = json.dumps([dataclasses.asdict(cfg), corpus_hash.hexdigest()], sort_keys=True)
    if reuse_teacher and ckpt.exists() and torch.load(ckpt)["key"] == teacher_cfg_key:
        saved = torch.load(ckpt)
        teacher.load_state_dict(saved["state_dict"])
        teacher_seconds = saved["seconds"]
        log("teacher: reused the checkpoint")
    else:
        order = batch_order(train_seqs.shape[0], cfg.batch_size, cfg.teacher_steps, cfg.seed + 1)
        log(f"teacher: {count_params(teacher)} parameters, {cfg.teacher_steps} steps")

        def ce_loss(ids, inputs, targets, logits):
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

        teacher_seconds = train(teacher, train_seqs, order, cfg.teacher_lr, ce_loss)
        torch.save({"key": teacher_cfg_key, "state_dict": teacher.state_dict(),
                    "seconds": teacher_seconds}, ckpt)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    teacher_eval = evaluate(teacher, None, held_seqs, cfg.batch_size)
    log(f"teacher: {teacher_seconds:.0f} s, held-out ppl {teacher_eval['heldout_ppl']:.2f}")

    # ---- the distillation set: a fixed subset of the training sequences
    pick = torch.randperm(train_seqs.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 2))
    distill_seqs = train_seqs[pick[: cfg.student_seqs]]
    order = batch_order(distill_seqs.shape[0], cfg.batch_size, cfg.student_steps, cfg.seed + 3)
    T, alpha = cfg.temperature, cfg.alpha
    vocab = len(tok)

    variants: list[dict] = []

    def ce_loss(ids, inputs, targets, logits):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def dense_loss(ids, inputs, targets, logits):
        with torch.no_grad():
            t_logits = teacher(inputs)
        return kdfast.kd_loss(logits, t_logits, targets, temperature=T, alpha=alpha)

    variants.append({"name": "ce", "signal": "true next token only", "bytes_per_token": 0,
                     "loss": ce_loss})
    variants.append({"name": "dense_kd", "signal": "live teacher, full distribution (kd_loss)",
                     "bytes_per_token": 4 * vocab, "loss": dense_loss})

    caches: list[tuple[str, str, int, str, str]] = [
        ("sampled%d" % cfg.sample_draws, "sample", cfg.sample_draws, "renormalize",
         f"cache: {cfg.sample_draws} teacher draws/token (sample_logits), values=probs")]
    for k in cfg.topk:
        for tail in ("renormalize", "residual"):
            caches.append((f"top{k}_{tail[:6] if tail == 'renormalize' else tail}", "topk", k, tail,
                           f"cache: top-{k} logprobs (topk_logits), tail={tail}"))
    built: dict[tuple[str, int], CachedSignal] = {}
    for name, kind, k, tail, desc in caches:
        if (kind, k) not in built:
            built[kind, k] = build_teacher_cache(kind, k, teacher, distill_seqs, cfg, work / "cache")
            log(f"cache {kind}{k}: {built[kind, k].bytes_per_token:.1f} B/token, "
                f"{built[kind, k].build_seconds:.1f} s")
        sig = built[kind, k]

        def sparse_loss(ids, inputs, targets, logits, sig=sig, tail=tail):
            return kdfast.sparse_kd_loss(logits, sig.indices[ids], sig.values[ids], targets,
                                         values=sig.values_kind, temperature=T, tail=tail, alpha=alpha)

        variants.append({"name": name, "signal": desc, "bytes_per_token": sig.bytes_per_token,
                         "cache_build_seconds": sig.build_seconds, "loss": sparse_loss})

    rows = []
    for v in variants:
        torch.manual_seed(cfg.seed + 4)  # the same initial student for every variant
        student = TinyLM(cfg.student, vocab, cfg.seq_len)
        seconds = train(student, distill_seqs, order, cfg.student_lr, v["loss"])
        metrics = evaluate(student, teacher, held_seqs, cfg.batch_size)
        row = {k: val for k, val in v.items() if k != "loss"}
        row.update(metrics, train_seconds=seconds)
        rows.append(row)
        log(f"student {v['name']:16s} ppl {metrics['heldout_ppl']:8.2f}  KL {metrics['kl_teacher_student']:.4f}"
            f"  {seconds:.0f} s")

    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "config": dataclasses.asdict(cfg),
        "corpus": {"root": str(corpus_root), "files": len(docs), "train_files": len(train_docs),
                   "heldout_files": len(held_docs), "sha256": corpus_hash.hexdigest(),
                   "licence": "Python Software Foundation License (the CPython standard library)"},
        "tokenizer": {"vocab_size": vocab, "train_tokens": n_train_tokens,
                      "single_char_fraction_first_50_docs": spelled / max(1, sum(map(len, train_ids[:50])))},
        "teacher": {"params": count_params(teacher), "train_seconds": teacher_seconds, **teacher_eval},
        "student_params": count_params(TinyLM(cfg.student, vocab, cfg.seq_len)),
        "distill_tokens": distill_seqs.shape[0] * cfg.seq_len,
        "students": rows,
        "machine": machine_info(),
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(result))
    log(f"done in {result['total_seconds']:.0f} s: {out / 'results.md'}")
    return result


def render_markdown(r: dict) -> str:
    cfg, t = r["config"], r["teacher"]
    lines = [
        "# Language-model distillation from a teacher cache",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']['cpu_model']}, {r['machine']['cpu_count']} cores, "
        f"torch {r['machine']['torch']} ({r['machine']['torch_threads']} thread(s)).",
        "",
        f"Corpus: {r['corpus']['files']} standard-library source files ({r['corpus']['train_files']} train, "
        f"{r['corpus']['heldout_files']} held out), V = {r['tokenizer']['vocab_size']}, "
        f"{r['tokenizer']['train_tokens']} train tokens. Teacher {t['params']} parameters "
        f"({cfg['teacher']['layers']} layers, d={cfg['teacher']['dim']}), held-out perplexity "
        f"{t['heldout_ppl']:.2f}; students {r['student_params']} parameters "
        f"({cfg['student']['layers']} layers, d={cfg['student']['dim']}), {cfg['student_steps']} steps of "
        f"{cfg['batch_size']}x{cfg['seq_len']} tokens over {r['distill_tokens']} distillation tokens, "
        f"T = {cfg['temperature']}, alpha = {cfg['alpha']}.",
        "",
        "| variant | teacher signal | bytes/token | held-out ppl | KL(teacher ‖ student) | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in r["students"]:
        lines.append(f"| {row['name']} | {row['signal']} | {row['bytes_per_token']:.0f} | "
                     f"{row['heldout_ppl']:.2f} | {row['kl_teacher_student']:.4f} | {row['train_seconds']:.0f} |")
    lines.append(f"| (teacher) | | | {t['heldout_ppl']:.2f} | 0 | {t['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json / results.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in under a minute")
    parser.add_argument("--corpus-root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="the standard library to read (default: this interpreter's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="load <out>/work/teacher.pt when it was trained with the same settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(QUICK if args.quick else Config(), args.out, args.corpus_root, args.reuse_teacher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
