#!/usr/bin/env python3
"""Distil a small causal LM with a Hugging Face ``Trainer``: ``kdfast.integrations.hf.DistillationTrainer``.

1. A character-level tokenizer is built from the text (``tokenizers``, no download).
2. A teacher (a small Llama) is trained on the text with the plain ``transformers.Trainer``.
3. Two students (a smaller GPT-2, same initialisation, data order and steps) are trained:
   ``ce``, on the next token only (``alpha=1``: the hard-label part alone), and ``distilled``,
   with ``DistillationTrainer`` (the teacher's softened distribution, ``alpha`` of the
   hard labels), or from a ``kdfast.cache`` teacher cache with ``--cache``.
4. Both are scored on held-out text: perplexity and KL(teacher || student) per token, at T = 1.

Text: the first paragraph of every public function / class docstring of a set of the Python
standard library's modules (the running interpreter's own), split into train / held-out.

    python examples/hf_trainer_distill.py                     # about 3 minutes on 2 CPU cores
    python examples/hf_trainer_distill.py --quick --steps 6   # tiny, seconds
    python examples/hf_trainer_distill.py --cache --gradient-accumulation 2 --bf16

The last line printed is ``RESULT {json}`` with the losses and scores.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.integrations import require  # noqa: E402

transformers = require("transformers", extra="hf", feature="examples/hf_trainer_distill.py")
from kdfast.cache import TeacherCache, TopK  # noqa: E402
from kdfast.integrations.hf import DistillationTrainer  # noqa: E402

MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
           "functools", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "os", "pathlib",
           "pickle", "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
           "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile")


# --------------------------------------------------------------------------- text and tokenizer


def docstrings(max_chars: int) -> list[str]:
    """First paragraphs of the public docstrings of :data:`MODULES`, cut to ``max_chars``."""
    texts: list[str] = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            text = " ".join(doc.split("\n\n")[0].split())[:max_chars]
            if len(text) >= 16 and text not in texts:
                texts.append(text)
    return texts


def char_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """One token per character seen in ``texts``, plus <pad> and <unk>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1}
    for c in sorted(set("".join(texts))):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


# --------------------------------------------------------------------------- models and scores


def teacher_model(vocab: int, width: int, layers: int, seq: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=seq, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def student_model(vocab: int, width: int, seq: int) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=1, n_head=2,
                                  pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg)


@torch.no_grad()
def score(model, teacher, batches) -> dict[str, float]:
    """Held-out perplexity of ``model`` and its KL(teacher || model) per token, at T = 1."""
    model.eval()
    nll = kl = 0.0
    count = 0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = model(**inputs).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        nll += F.cross_entropy(s[keep], labels[keep], reduction="sum").item()
        if teacher is not None:
            t = teacher(**inputs).logits[:, :-1].float()
            kl += F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), log_target=True,
                           reduction="sum").item()
        count += int(keep.sum())
    out = {"heldout_ppl": math.exp(nll / count)}
    if teacher is not None:
        out["kl_teacher_student"] = kl / count
    return out


def training_args(out: Path, a: argparse.Namespace, steps: int, lr: float, batch: int, ga: int = 1):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", seed=a.seed,
        use_cpu=not torch.cuda.is_available(), bf16=a.bf16, disable_tqdm=True, dataloader_num_workers=0)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="student optimizer steps (default 200, quick 30)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default 400, quick 60)")
    p.add_argument("--quick", action="store_true", help="tiny models and data (seconds)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label part")
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True)")
    p.add_argument("--cache", action="store_true", help="distil from a kdfast teacher cache (top-32)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    steps = a.steps or (30 if a.quick else 200)
    teacher_steps = a.teacher_steps or (60 if a.quick else 400)
    seq, batch = (48, 8) if a.quick else (96, 16)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = a.out or Path(tempfile.mkdtemp(prefix="hf_trainer_distill_"))

    texts = docstrings(seq)
    held_out, train_texts = texts[::10], [t for i, t in enumerate(texts) if i % 10]
    if a.quick:
        train_texts, held_out = train_texts[:256], held_out[:32]
    tok = char_tokenizer(texts)
    train = [{"input_ids": ids} for ids in tok(train_texts)["input_ids"]]
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    eval_batches = [collator([{"input_ids": ids} for ids in tok(held_out[i:i + 32])["input_ids"]])
                    for i in range(0, len(held_out), 32)]
    print(f"text: {len(train)} train / {len(held_out)} held-out docstrings of {len(MODULES)} stdlib modules, "
          f"{len(tok)} characters in the vocabulary")

    torch.manual_seed(a.seed)
    teacher = teacher_model(len(tok), 32 if a.quick else 96, 1 if a.quick else 2, seq)
    transformers.Trainer(model=teacher, args=training_args(out / "teacher", a, teacher_steps, 3e-3, batch),
                         train_dataset=train, data_collator=collator).train()
    teacher.eval()
    result: dict = {"teacher": score(teacher, None, eval_batches), "students": {}}
    print(f"teacher: held-out perplexity {result['teacher']['heldout_ppl']:.2f}")

    cache = None
    if a.cache:
        def teacher_view(items):
            return {k: v for k, v in collator(items).items() if k != "labels"}

        loader = torch.utils.data.DataLoader(train, batch_size=32, collate_fn=teacher_view)
        cache = TeacherCache.build(out / "cache", teacher, loader, storage=TopK(k=32),
                                   temperature=a.temperature, progress=False, overwrite=True)

    ga = a.gradient_accumulation
    for name, alpha in (("ce", 1.0), ("distilled", a.alpha)):
        torch.manual_seed(a.seed + 1)
        student = student_model(len(tok), 32 if a.quick else 48, seq)
        use_cache = cache is not None and name == "distilled"
        source = {"teacher_cache": cache} if use_cache else {"teacher": teacher}
        run_args = training_args(out / name, a, steps, 3e-3, batch // ga, ga)
        trainer = DistillationTrainer(model=student, args=run_args,
                                      train_dataset=train, data_collator=collator, temperature=a.temperature,
                                      alpha=alpha, **source)
        trainer.train()
        logs = [row for row in trainer.state.log_history if "loss" in row]
        for row in logs:
            parts = "  ".join(f"{k} {row[k]:.4f}" for k in ("kd_loss", "ce_loss") if k in row)
            print(f"{name:9s} step {row['step']:4d}  loss {row['loss']:.4f}  {parts}")
        result["students"][name] = {"losses": [row["loss"] for row in logs],
                                    "kd_losses": [row.get("kd_loss") for row in logs],
                                    "ce_losses": [row.get("ce_loss") for row in logs],
                                    **score(student, teacher, eval_batches)}
    for name, row in result["students"].items():
        print(f"{name:9s}: held-out perplexity {row['heldout_ppl']:.2f}, KL(teacher || student) "
              f"{row['kl_teacher_student']:.4f} per token")
    result["config"] = {"steps": steps, "teacher_steps": teacher_steps, "temperature": a.temperature,
                        "alpha": a.alpha, "gradient_accumulation": ga, "bf16": a.bf16, "cache": a.cache}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
