"""kdfast.integrations.hf: a transformers.Trainer that distils, driven as a Trainer user would.

Tiny models built from configs (GPT-2 and Llama causal LMs, BERT classifiers), a char-level
tokenizer built in code, real text (docstrings of the Python standard library). Checked:
the loss goes down and the student gets closer to the teacher; the Trainer's per-step
losses match kdfast.train.Distiller's on the same batches; padding is ignored (equal to
the unpadded computation, and with alpha = 1 equal to the model's own loss);
gradient accumulation of half batches trains like full batches; the teacher is
untouched and not checkpointed; a teacher cache gives the live teacher's losses; bf16
and torch.compile run; bad arguments give clear errors; a missing transformers gives
the install message.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kdfast.cache import Dense, TeacherCache, TopK  # noqa: E402
from kdfast.integrations import hf  # noqa: E402
from kdfast.integrations.hf import (  # noqa: E402
    DistillationTrainer,
    count_rows,
    distillation_loss,
    select_rows,
)
from kdfast.train import Distiller, Soft, make_mode  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()


# --------------------------------------------------------------------------- data and models


def docstrings(*modules, limit: int | None = None) -> list[str]:
    """The first paragraph of each public function / class docstring of ``modules``."""
    out = []
    for mod in modules:
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                text = " ".join(doc.split("\n\n")[0].split())
                if len(text) >= 12 and text not in out:
                    out.append(text)
    return out[:limit]


def char_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """One token per character (a fixed vocabulary from ``texts``) with <pad>, <unk>, <cls>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<unk>": 1, "<cls>": 2}
    for c in sorted(set("".join(texts))):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<cls> $A", special_tokens=[("<cls>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                cls_token="<cls>")


import collections as _collections  # noqa: E402
import functools as _functools  # noqa: E402
import json as _json  # noqa: E402
import pathlib as _pathlib  # noqa: E402
import shutil as _shutil  # noqa: E402
import statistics as _statistics  # noqa: E402
import textwrap as _textwrap  # noqa: E402

LM_TEXTS = docstrings(_textwrap, _json, _shutil, _functools, _collections, _pathlib)
TOK = char_tokenizer(LM_TEXTS + docstrings(_statistics, __import__("math"), __import__("posixpath")))
V = len(TOK)


def lm_dataset(n: int = 32, max_len: int = 40, offset: int = 0) -> list[dict]:
    texts = LM_TEXTS[offset:offset + n]
    assert len(texts) == n
    texts = [t[:12 + (i * 11) % (max_len - 12)] for i, t in enumerate(texts)]     # lengths 12 .. max_len
    enc = TOK(texts, truncation=True, max_length=max_len)
    return [{"input_ids": ids} for ids in enc["input_ids"]]


def cls_dataset(n_per_class: int = 16, max_len: int = 48) -> list[dict]:
    files = docstrings(_shutil, __import__("posixpath"))[:n_per_class]
    numbers = docstrings(_statistics, __import__("math"))[:n_per_class]
    assert len(files) == len(numbers) == n_per_class
    items = []
    for a, b in zip(files, numbers):                  # interleaved: both classes in every batch
        for text, label in ((a, 0), (b, 1)):
            ids = TOK(text, truncation=True, max_length=max_len)["input_ids"]
            items.append({"input_ids": ids, "labels": label})
    return items


def gpt2(width: int = 16, layers: int = 1, seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=width, n_layer=layers, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama(width: int = 32, seed: int = 1) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def bert(width: int = 32, seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=2 * width, max_position_embeddings=64, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForSequenceClassification(cfg)


def args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=5e-3,
                max_steps=8, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                lr_scheduler_type="constant", optim="adamw_torch", seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def lm_collator():
    return transformers.DataCollatorForLanguageModeling(TOK, mlm=False)


def cls_collator():
    return transformers.DataCollatorWithPadding(TOK)


def losses_of(trainer, key: str = "loss") -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row and "train_runtime" not in row]


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory) -> transformers.LlamaForCausalLM:
    """A Llama briefly trained on the text with the plain Trainer (a teacher that knows something)."""
    teacher = llama(width=48)
    transformers.Trainer(model=teacher, args=args(tmp_path_factory.mktemp("lm_teacher"), max_steps=40,
                                                  learning_rate=1e-2, logging_steps=100),
                         train_dataset=lm_dataset(64), data_collator=lm_collator()).train()
    return teacher.eval()


@pytest.fixture(scope="module")
def cls_teacher(tmp_path_factory) -> transformers.BertForSequenceClassification:
    """A BERT classifier briefly trained on the labels with the plain Trainer."""
    teacher = bert(width=48, seed=1)
    transformers.Trainer(model=teacher, args=args(tmp_path_factory.mktemp("cls_teacher"), max_steps=60,
                                                  learning_rate=3e-3, logging_steps=100),
                         train_dataset=cls_dataset(16), data_collator=cls_collator()).train()
    return teacher.eval()


@torch.no_grad()
def lm_kl(student, teacher, data: list[dict]) -> float:
    """Mean KL(teacher || student) per real token at T = 1 (an independent formula)."""
    batch = lm_collator()(data)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student.eval()(**inputs).logits.float()
    t = teacher.eval()(**inputs).logits.float()
    keep = batch["attention_mask"].bool()
    kl = F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), log_target=True,
                  reduction="batchmean")
    return kl.item()


# --------------------------------------------------------------------------- training


def test_causal_lm_loss_goes_down_and_student_nears_teacher(tmp_path, lm_teacher):
    teacher, student = lm_teacher, gpt2()
    held_out = lm_dataset(16, offset=32)
    kl_before = lm_kl(student, teacher, held_out)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path, max_steps=12),
                                  train_dataset=lm_dataset(32), eval_dataset=held_out,
                                  data_collator=lm_collator(), temperature=2.0, alpha=0.5)
    assert trainer.task == "causal_lm"
    eval_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < 0.8 * eval_before          # the same loss on held-out text
    losses, kd, ce = losses_of(trainer), losses_of(trainer, "kd_loss"), losses_of(trainer, "ce_loss")
    assert len(losses) == len(kd) == len(ce) == 12
    for total, k, c in zip(losses, kd, ce):                      # loss = (1 - a) kd + a ce, logged apart
        assert total == pytest.approx(0.5 * k + 0.5 * c, rel=1e-4)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert lm_kl(student, teacher, held_out) < 0.7 * kl_before


def test_sequence_classification_loss_goes_down_and_student_nears_teacher(tmp_path, cls_teacher):
    teacher, student = cls_teacher, bert(seed=0)
    data = cls_dataset(16)
    batch = cls_collator()(data)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def kl() -> float:
        with torch.no_grad():
            s, t = student.eval()(**inputs).logits, teacher(**inputs).logits
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                        reduction="batchmean").item()

    kl_before = kl()
    trainer = DistillationTrainer(model=student, teacher=teacher,
                                  args=args(tmp_path, max_steps=48, learning_rate=3e-3), train_dataset=data,
                                  data_collator=cls_collator(), temperature=2.0, alpha=0.5)
    assert trainer.task == "sequence_classification"
    trainer.train()
    losses = losses_of(trainer)
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    assert kl() < 0.5 * kl_before
    assert len(losses_of(trainer, "kd_loss")) == len(losses_of(trainer, "ce_loss")) == 48


class RecordingTrainer(DistillationTrainer):
    """Keeps a copy of every batch compute_loss sees while training."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _distiller_losses(student, teacher, batches, lr, **mode_kw) -> list[float]:
    mode = Soft(teacher, forward=lambda m, inputs: m(**inputs).logits, **mode_kw)
    data = [{"inputs": {k: v for k, v in b.items() if k != "labels"}, "labels": b["labels"]} for b in batches]
    result = Distiller(student, mode, lr=lr, weight_decay=0.0, scheduler="constant", grad_clip=1.0,
                       log_every=1, progress=False, amp=None).fit(data)
    return [row["loss"] for row in result.history if "loss" in row]


def test_trainer_matches_distiller_on_the_same_batches_classification(tmp_path, cls_teacher):
    teacher, student = cls_teacher, bert(seed=0)
    twin = bert(seed=0)
    trainer = RecordingTrainer(model=student, teacher=teacher, args=args(tmp_path, max_steps=6),
                               train_dataset=cls_dataset(16), data_collator=cls_collator(),
                               temperature=2.0, alpha=0.3)
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) == 6
    expected = _distiller_losses(twin, teacher, trainer.seen, 5e-3, temperature=2.0, alpha=0.3)
    assert losses_of(trainer) == pytest.approx(expected, rel=2e-4, abs=1e-5)
    for p, q in zip(student.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    assert any((p - q).abs().max() > 0 for p, q in zip(student.parameters(), bert(seed=0).parameters()))


def test_trainer_matches_distiller_on_the_same_batches_causal_lm(tmp_path, lm_teacher):
    # Equal-length chunks of text (no padding): the Distiller's Soft mode with a forward that
    # shifts (logits[:, :-1] against labels[:, 1:]) sees exactly the Trainer's rows.
    teacher, student, twin = lm_teacher, gpt2(seed=0), gpt2(seed=0)
    ids = TOK("\n".join(LM_TEXTS))["input_ids"][:16 * 24]
    data = [{"input_ids": ids[i:i + 24]} for i in range(0, len(ids), 24)]
    trainer = RecordingTrainer(model=student, teacher=teacher, args=args(tmp_path, max_steps=4),
                               train_dataset=data, data_collator=lm_collator(), temperature=2.0, alpha=0.5)
    trainer.seen = []
    trainer.train()
    shifted = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                "labels": b["labels"][:, 1:]} for b in trainer.seen]
    mode = Soft(teacher, forward=lambda m, inputs: m(**inputs).logits[:, :-1], temperature=2.0, alpha=0.5)
    batches = [{"inputs": {k: b[k] for k in ("input_ids", "attention_mask")}, "labels": b["labels"]}
               for b in shifted]
    result = Distiller(twin, mode, lr=5e-3, scheduler="constant", grad_clip=1.0, log_every=1,
                       progress=False, amp=None).fit(batches)
    expected = [row["loss"] for row in result.history if "loss" in row]
    assert losses_of(trainer) == pytest.approx(expected, rel=2e-4, abs=1e-5)


# --------------------------------------------------------------------------- rows, padding, accumulation


def test_padding_rows_are_ignored():
    teacher, student = llama(), gpt2()
    data = lm_dataset(4)
    lengths = [len(d["input_ids"]) for d in data]
    assert len(set(lengths)) > 1                        # the batch really is padded
    batch = lm_collator()(data)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    mode = make_mode("soft", teacher=teacher, temperature=2.0, alpha=0.25)
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
        loss, parts = distillation_loss(mode, s, t, batch["labels"], task="causal_lm",
                                        attention_mask=batch["attention_mask"])
        # independent: each sample alone, unpadded, rows 0..n-2 against tokens 1..n-1
        rows_s, rows_t, targets = [], [], []
        for d in data:
            x = torch.tensor([d["input_ids"]])
            rows_s.append(student(input_ids=x).logits[0, :-1])
            rows_t.append(teacher(input_ids=x).logits[0, :-1])
            targets.append(x[0, 1:])
    s1, t1, y1 = torch.cat(rows_s), torch.cat(rows_t), torch.cat(targets)
    assert s1.shape[0] == sum(lengths) - len(lengths)
    kl = 4.0 * F.kl_div(F.log_softmax(s1 / 2, -1), F.log_softmax(t1 / 2, -1), log_target=True,
                        reduction="batchmean")
    ce = F.cross_entropy(s1, y1)
    torch.testing.assert_close(parts["kd"], kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts["ce"], ce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, 0.75 * kl + 0.25 * ce, rtol=1e-4, atol=1e-5)
    rows, labelled = count_rows("causal_lm", batch)
    assert int(rows) == int(labelled) == s1.shape[0]


def test_alpha_one_is_the_models_own_loss(tmp_path):
    # With alpha = 1 only the hard-label part is left: the Hugging Face model's own shifted,
    # padding-ignoring cross-entropy.
    teacher, student = llama(), gpt2()
    batch = lm_collator()(lm_dataset(6))
    mode = make_mode("soft", teacher=teacher, alpha=1.0)
    with torch.no_grad():
        out = student(**batch)
        loss, _ = distillation_loss(mode, out.logits, teacher(input_ids=batch["input_ids"]).logits,
                                    batch["labels"], task="causal_lm")
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ga", [1, 2])
def test_alpha_one_trains_like_the_plain_trainer(tmp_path, ga):
    # alpha = 1: the plain Trainer's causal-LM objective, so the two trajectories agree step for step,
    # gradient accumulation over padded micro-batches included (the Trainer's own token-count scaling).
    # (A Llama student: for GPT-2, whose loss_type is None, this Trainer counts the unshifted labels
    # in num_items_in_batch, one token per row too many; DistillationTrainer counts the shifted ones.)
    runs = []
    for distil in (False, True):
        student = llama(width=16, seed=0)
        kw = dict(model=student, train_dataset=lm_dataset(32), data_collator=lm_collator(),
                  args=args(tmp_path, max_steps=4, per_device_train_batch_size=8 // ga,
                            gradient_accumulation_steps=ga))
        trainer = (DistillationTrainer(teacher=gpt2(seed=3), alpha=1.0, **kw) if distil
                   else transformers.Trainer(**kw))
        trainer.train()
        runs.append((student, losses_of(trainer)))
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-5)
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_select_rows_without_labels_uses_the_attention_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    keep, labels = select_rows("causal_lm", torch.zeros(2, 4, 3), None, mask)
    assert labels is None
    assert keep.tolist() == [[True, True, False, False], [True, True, True, False]]
    rows, labelled = count_rows("causal_lm", {"attention_mask": mask})
    assert (int(rows), int(labelled)) == (5, 0)
    batch = {"input_ids": mask, "labels": torch.tensor([1, -100])}
    rows, labelled = count_rows("sequence_classification", batch)
    assert (int(rows), int(labelled)) == (2, 1)


def test_gradient_accumulation_matches_full_batches_with_padding(tmp_path, lm_teacher):
    runs = {}
    for ga, bs in ((1, 8), (2, 4)):
        student = gpt2(seed=0)
        trainer = RecordingTrainer(model=student, teacher=lm_teacher, train_dataset=lm_dataset(32),
                                   args=args(tmp_path, max_steps=4, per_device_train_batch_size=bs,
                                             gradient_accumulation_steps=ga),
                                   data_collator=lm_collator(), temperature=2.0, alpha=0.5)
        trainer.seen = []
        trainer.train()
        runs[ga] = (student, losses_of(trainer), losses_of(trainer, "kd_loss"), trainer.seen)
    full, half = runs[1], runs[2]
    # the same samples per step, and halves with different token counts (so a per-micro-batch
    # mean divided by 2 would not be the full batch's mean)
    assert torch.equal(full[3][0]["labels"][:4, :half[3][0]["labels"].shape[1]], half[3][0]["labels"])
    counts = [int(count_rows("causal_lm", b)[0]) for b in half[3]]
    assert any(counts[i] != counts[i + 1] for i in range(0, len(counts), 2))
    assert half[1] == pytest.approx(full[1], rel=1e-4)
    assert half[2] == pytest.approx(full[2], rel=1e-4)
    for p, q in zip(full[0].parameters(), half[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- teacher handling


def test_teacher_untouched_not_optimised_not_saved(tmp_path):
    from safetensors.torch import load_file

    teacher, student = llama(), gpt2()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=lm_dataset(16),
                                  args=args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3),
                                  data_collator=lm_collator())
    trainer.train()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in student.parameters() if p.requires_grad}
    saved = load_file(str(tmp_path / "out" / "checkpoint-3" / "model.safetensors"))
    assert set(saved) <= set(student.state_dict())
    n_student = sum(p.numel() for p in student.state_dict().values())
    assert sum(v.numel() for v in saved.values()) <= n_student
    assert not any(k.startswith("model.layers") for k in saved)   # Llama teacher keys


def test_bf16_teacher_with_bf16_trainer(tmp_path, lm_teacher):
    teacher, student = copy.deepcopy(lm_teacher).to(torch.bfloat16), gpt2()
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=lm_dataset(32),
                                  args=args(tmp_path, max_steps=8, bf16=True), data_collator=lm_collator(),
                                  temperature=2.0, alpha=0.5)
    trainer.train()
    losses = losses_of(trainer)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2])
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32


def test_hard_mode_trains(tmp_path, cls_teacher):
    teacher, student = cls_teacher, bert(seed=0)
    trainer = DistillationTrainer(model=student, teacher=teacher, mode="hard", train_dataset=cls_dataset(16),
                                  args=args(tmp_path, max_steps=8), data_collator=cls_collator())
    trainer.train()
    losses = losses_of(trainer)
    assert losses == pytest.approx(losses_of(trainer, "kd_loss"), rel=1e-5)
    assert sum(losses[-2:]) < sum(losses[:2])


# --------------------------------------------------------------------------- teacher cache


def cache_loader(data: list[dict]) -> torch.utils.data.DataLoader:
    """The teacher's view of ``data`` for TeacherCache.build: padded, in order, without labels."""
    return torch.utils.data.DataLoader(data, batch_size=8, collate_fn=lambda b: {
        k: v for k, v in lm_collator()(b).items() if k != "labels"})


@pytest.mark.parametrize("storage", ["dense", "top8"])
def test_teacher_cache_path(tmp_path, storage, lm_teacher):
    teacher = lm_teacher
    data = lm_dataset(16)
    cache = TeacherCache.build(tmp_path / "cache", teacher, cache_loader(data), temperature=2.0,
                               progress=False, fsync=False,
                               storage=Dense(dtype=torch.float32) if storage == "dense" else TopK(k=8))
    runs = {}
    for name, source in (("live", dict(teacher=teacher)), ("cache", dict(teacher_cache=cache))):
        student = gpt2(seed=0)
        trainer = RecordingTrainer(model=student, args=args(tmp_path, max_steps=4), train_dataset=data,
                                   data_collator=lm_collator(), temperature=2.0, alpha=0.5, **source)
        trainer.seen = []
        trainer.train()
        runs[name] = (losses_of(trainer), trainer.seen)
    # the index column went through the collator and remove_unused_columns to compute_loss
    assert all("cache_index" in b for b in runs["cache"][1])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(runs["live"][1], runs["cache"][1]))
    if storage == "dense":
        assert runs["cache"][0] == pytest.approx(runs["live"][0], rel=1e-4)
    else:
        # the top 8 of the teacher's distribution (renormalised): another loss, which goes down too
        assert runs["cache"][0] != pytest.approx(runs["live"][0], rel=1e-2)
        assert all(math.isfinite(x) for x in runs["cache"][0])
        assert runs["cache"][0][-1] < runs["cache"][0][0]


def test_teacher_cache_rejects_another_dataset(tmp_path):
    teacher = llama()
    cache = TeacherCache.build(tmp_path / "cache", teacher, cache_loader(lm_dataset(8)), storage=TopK(k=4),
                               progress=False, fsync=False)
    with pytest.raises(ValueError, match="train_dataset has 16 samples but the teacher cache"):
        DistillationTrainer(model=gpt2(), teacher_cache=cache, train_dataset=lm_dataset(16),
                            args=args(tmp_path))
    with pytest.raises(ValueError, match="tail= is an option of the offline mode, not of 'soft'"):
        DistillationTrainer(model=gpt2(), teacher=teacher, tail="residual", args=args(tmp_path))


# --------------------------------------------------------------------------- compile


def test_torch_compile(tmp_path):
    # aot_eager: the student traced by dynamo and its backward by AOTAutograd, without the minutes
    # of CPU code generation of the default inductor backend; equal-length batches (one graph).
    teacher, student = llama(), gpt2()
    ids = TOK("\n".join(LM_TEXTS))["input_ids"][:16 * 24]
    data = [{"input_ids": ids[i:i + 24]} for i in range(0, len(ids), 24)]
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=data,
                                  args=args(tmp_path, max_steps=2, torch_compile=True,
                                            torch_compile_backend="aot_eager"),
                                  data_collator=lm_collator(), temperature=2.0, alpha=0.5)
    trainer.train()
    losses = losses_of(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses_of(trainer, "kd_loss")


# --------------------------------------------------------------------------- errors


def test_bad_arguments(tmp_path):
    a = args(tmp_path)
    with pytest.raises(ValueError, match=r"teacher= .* or teacher_cache= .*not both"):
        DistillationTrainer(model=gpt2(), teacher=llama(), teacher_cache=str(tmp_path), args=a)
    with pytest.raises(ValueError, match=r"pass teacher= .* or teacher_cache="):
        DistillationTrainer(model=gpt2(), args=a)
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V + 3, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=f"teacher has {V + 3} vocabulary entries but the student {V}"):
        DistillationTrainer(model=gpt2(), teacher=small, args=a)
    with pytest.raises(ValueError, match="task must be 'auto' or one of"):
        DistillationTrainer(model=gpt2(), teacher=llama(), task="translation", args=a)
    with pytest.raises(ValueError, match="cannot tell the task of a Linear"):
        DistillationTrainer(model=torch.nn.Linear(3, 3), teacher=torch.nn.Linear(3, 3), args=a)
    with pytest.raises(ValueError, match="threshold= is an option of the hard mode"):
        DistillationTrainer(model=gpt2(), teacher=llama(), threshold=0.5, args=a)
    with pytest.raises(ValueError, match="mode must be 'soft', 'hard' or 'offline'"):
        DistillationTrainer(model=gpt2(), teacher=llama(), mode="feature", args=a)
    with pytest.raises(ValueError, match="temperature must be finite"):
        DistillationTrainer(model=gpt2(), teacher=llama(), temperature=-1.0, args=a)
    with pytest.raises(ValueError, match=r"2 output classes .* but the student 3"):
        distillation_loss(make_mode("soft", teacher=llama()), torch.zeros(4, 3), torch.zeros(4, 2),
                          task="sequence_classification")
    with pytest.raises(ValueError, match="task must be one of"):
        select_rows("seq2seq", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"labels must be \[B, L\]"):
        select_rows("causal_lm", torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


def test_missing_transformers_gives_the_install_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "kdfast.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'kdfast\[hf\]'"):
        importlib.import_module("kdfast.integrations.hf")
    monkeypatch.undo()
    assert importlib.import_module("kdfast.integrations.hf") is hf


def test_import_kdfast_does_not_import_transformers():
    import subprocess

    code = "import sys, kdfast, kdfast.train, kdfast.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"
