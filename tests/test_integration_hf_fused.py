"""kdfast.integrations.hf_fused and DistillationTrainer(fused_linear=True): causal-LM distillation of
Hugging Face models from the LM heads' inputs, never the [B, L, V] logits.

Real small language models built from configs (GPT-2 with its tied head, Llama, Gemma 2 with
final_logit_softcapping), char-level tokens of real text (docstrings of the Python standard
library, the helpers of test_integration_hf). Checked against an independent computation on the
models' full logits (shifted by hand, kdfast.kd_loss / sparse_kd_loss / cross_entropy): the loss
and every student gradient; ten optimizer steps of two copies of a student, one through the
helper and one through the unfused loss, step for step (losses and weights); padding; the sparse
teacher from kdfast.topk_logits; the Trainer with fused_linear=True against the Trainer without
it (losses, kd / ce logs, weights, gradient accumulation, a top-k cache, evaluation); that the
heads compute one position's logits only; clear errors.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_integration_hf import V, args, gpt2, llama, lm_collator, lm_dataset, losses_of  # noqa: E402

import kdfast  # noqa: E402
from kdfast.cache import Dense, TeacherCache, TopK  # noqa: E402
from kdfast.integrations.hf import DistillationTrainer  # noqa: E402
from kdfast.integrations.hf_fused import (  # noqa: E402
    causal_lm_kd_loss,
    causal_lm_sparse_kd_loss,
    lm_head_inputs,
)

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()


def padded_batch(n: int = 6, offset: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch of real text with padding (labels -100 there)."""
    batch = lm_collator()(lm_dataset(n, offset=offset))
    assert bool((batch["attention_mask"] == 0).any())
    return dict(batch)


def gemma(seed: int = 0, width: int = 16) -> transformers.Gemma2ForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=width, intermediate_size=2 * width,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=8, max_position_embeddings=64, final_logit_softcapping=3.0,
                                    pad_token_id=0, attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(cfg)


def unfused(student, teacher, batch, *, temperature, alpha, softcap=None, sparse_k=None, tail="renormalize"):
    """The loss on the full logits, rows and shift by hand: (1 - a) kd + a ce (ce with labels)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    labels = batch.get("labels")
    if labels is not None:
        y = labels[:, 1:]
        rows = y != -100
    else:
        m = batch["attention_mask"].bool()
        rows, y = m[:, :-1] & m[:, 1:], None
    s, t = s[:, :-1][rows], t[:, :-1][rows]
    if sparse_k is None:
        kd = kdfast.kd_loss(s, t, temperature=temperature, softcap=softcap)
    else:
        idx, logp = kdfast.topk_logits(t, sparse_k, temperature=temperature)
        kd = kdfast.sparse_kd_loss(s, idx, logp, temperature=temperature, tail=tail)
    if y is None or alpha == 0:
        return (1 - alpha) * kd
    return (1 - alpha) * kd + alpha * F.cross_entropy(s.float(), y[rows])


def student_grads(model, loss) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


# --------------------------------------------------------------------------- the helper


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.4, 0.9, 1.0])
def test_value_and_every_gradient_match_the_unfused_loss(alpha):
    student, teacher = gpt2(seed=3), llama(seed=4)          # GPT-2: tied head; Llama: wider teacher
    batch = padded_batch()
    loss, parts = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=alpha, chunk_size=7,
                                    return_parts=True)
    ref = unfused(student, teacher, batch, temperature=2.0, alpha=alpha)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(student_grads(student, loss), student_grads(student, ref)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    kd = unfused(student, teacher, batch, temperature=2.0, alpha=0.0)
    torch.testing.assert_close(parts["kd"], kd.detach(), rtol=1e-4, atol=1e-6)
    if alpha > 0:
        ce = unfused(student, teacher, batch, temperature=2.0, alpha=1.0)
        torch.testing.assert_close(parts["ce"], ce.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((1 - alpha) * parts["kd"] + alpha * parts["ce"], loss.detach(), rtol=1e-5,
                                   atol=1e-6)
    else:
        assert set(parts) == {"kd"}


def phi(seed: int, width: int) -> transformers.PhiForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.PhiConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0)
    model = transformers.PhiForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.bias.normal_()                     # a head bias that matters
    return model


def test_heads_with_bias_and_accumulated_totals():
    """Phi's LM head has a bias (student and teacher); totals of an accumulated batch where other
    micro-batches have fewer labelled rows than rows: the same as distillation_loss on full logits."""
    from kdfast.integrations.hf import distillation_loss
    from kdfast.train import Soft

    student, teacher = phi(0, 16), phi(1, 24)
    batch = padded_batch()
    totals = (torch.tensor(400), torch.tensor(250))
    loss, parts = causal_lm_kd_loss(student, teacher, batch, temperature=3.0, alpha=0.6,
                                    divergence="reverse_kl", chunk_size=16, totals=totals, return_parts=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mode = Soft(teacher, temperature=3.0, alpha=0.6, divergence="reverse_kl")
    ref, ref_parts = distillation_loss(mode, student(**inputs).logits, teacher(**inputs).logits.detach(),
                                       batch["labels"], task="causal_lm",
                                       attention_mask=batch["attention_mask"], totals=totals)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for k in ("kd", "ce"):
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=1e-4, atol=1e-6)
    for g, r in zip(student_grads(student, loss), student_grads(student, ref)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert student.lm_head.bias.requires_grad


def test_ten_steps_step_for_step_with_the_unfused_loss():
    """Two copies of a GPT-2 student, AdamW, the same batches: one trained through the helper,
    one through the loss on its full logits."""
    teacher = llama(width=48, seed=1)
    a, b = gpt2(seed=0), gpt2(seed=0)
    opt_a = torch.optim.AdamW(a.parameters(), lr=5e-3)
    opt_b = torch.optim.AdamW(b.parameters(), lr=5e-3)
    losses_a, losses_b = [], []
    for step in range(10):
        batch = padded_batch(8, offset=(step * 8) % 24)
        loss_a = causal_lm_kd_loss(a, teacher, batch, temperature=2.0, alpha=0.5, chunk_size=13)
        loss_b = unfused(b, teacher, batch, temperature=2.0, alpha=0.5)
        for opt, loss in ((opt_a, loss_a), (opt_b, loss_b)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses_a.append(loss_a.item())
        losses_b.append(loss_b.item())
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    assert sum(losses_a[-3:]) < 0.9 * sum(losses_a[:3])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_heads_compute_one_position_only_and_the_teacher_is_frozen():
    student, teacher = gpt2(), llama()
    teacher.train()
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
             for m in (student, teacher)]
    batch = padded_batch(4)
    loss = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.5)
    loss.backward()
    for h in hooks:
        h.remove()
    assert shapes == [torch.Size([4, 1, V])] * 2           # never [B, L, V]
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert student.transformer.wte.weight.grad is not None   # the tied head's gradient


def test_a_batch_with_nothing_to_distil_gives_a_zero_with_a_graph():
    student, teacher = gpt2(), llama()
    batch = padded_batch(4)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, parts = causal_lm_kd_loss(student, teacher, batch, alpha=0.5, return_parts=True)
    loss.backward()
    assert loss.item() == 0.0 and set(parts) == {"kd", "ce"}
    assert all(p.grad is not None and not p.grad.any() for p in student.parameters())


def test_without_labels_uses_the_attention_mask():
    student, teacher = llama(seed=5, width=16), llama(seed=6)
    batch = padded_batch()
    batch.pop("labels")
    loss = causal_lm_kd_loss(student, teacher, batch, temperature=1.5, alpha=0.3, divergence="jsd")
    inputs = dict(batch)
    s, t = student(**inputs).logits, teacher(**inputs).logits.detach()
    m = batch["attention_mask"].bool()
    rows = m[:, :-1] & m[:, 1:]
    ref = 0.7 * kdfast.kd_loss(s[:, :-1][rows], t[:, :-1][rows], temperature=1.5, divergence="jsd")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_sparse_teacher_from_topk_logits():
    student, teacher = gpt2(seed=2), llama(seed=3)
    batch = padded_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        idx, logp = kdfast.topk_logits(teacher(**inputs).logits, 8, temperature=2.0)
    loss, parts = causal_lm_sparse_kd_loss(student, idx, logp, batch, temperature=2.0, tail="residual",
                                           alpha=0.25, chunk_size=9, return_parts=True)
    ref = unfused(student, teacher, batch, temperature=2.0, alpha=0.25, sparse_k=8, tail="residual")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(student_grads(student, loss), student_grads(student, ref)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(0.75 * parts["kd"] + 0.25 * parts["ce"], loss.detach(), rtol=1e-5, atol=1e-6)


def test_gemma_final_logit_softcapping_is_applied():
    student, teacher = gemma(seed=0), gemma(seed=1, width=24)
    batch = padded_batch(4)
    loss = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.5, chunk_size=10)
    ref = unfused(student, teacher, batch, temperature=2.0, alpha=0.5)     # the models' capped logits
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(student_grads(student, loss), student_grads(student, ref)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"softcap=2\.0 but the models soft-cap their logits at 3\.0"):
        causal_lm_kd_loss(student, teacher, batch, softcap=2.0)
    with pytest.raises(ValueError, match=r"soft-caps its logits at 3\.0 .* and the teacher at None"):
        causal_lm_kd_loss(student, llama(), batch)


class _ScaledGPT2(transformers.GPT2LMHeadModel):
    """A model that changes its logits after the head without saying so in its config."""

    def forward(self, *a, **kw):
        out = super().forward(*a, **kw)
        out.logits = out.logits * 2.0
        return out


def test_bad_arguments_give_clear_errors():
    student, teacher, batch = gpt2(), llama(), padded_batch(4)
    with pytest.raises(ValueError, match="transforms its logits after the LM head"):
        cfg = student.config
        torch.manual_seed(0)
        causal_lm_kd_loss(_ScaledGPT2(cfg), teacher, batch)
    torch.manual_seed(0)
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, logit_scale=0.5, pad_token_id=0))
    with pytest.raises(ValueError, match=r"scales its logits after the LM head \(logit_scale=0.5\)"):
        causal_lm_kd_loss(cohere, teacher, batch)
    with pytest.raises(TypeError, match="has no linear LM head"):
        causal_lm_kd_loss(torch.nn.Linear(4, 4), teacher, batch)
    with pytest.raises(ValueError, match="the teacher is the student model itself"):
        causal_lm_kd_loss(student, student, batch)
    torch.manual_seed(0)
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V - 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(ValueError, match=f"the teacher has {V - 1} vocabulary entries but the student {V}"):
        causal_lm_kd_loss(student, small, batch)
    with pytest.raises(ValueError, match="alpha must be a float in"):
        causal_lm_kd_loss(student, teacher, batch, alpha=1.5)
    with pytest.raises(ValueError, match="labels must be"):
        causal_lm_kd_loss(student, teacher, {**batch, "labels": batch["labels"][:, :-1]})
    with pytest.raises(ValueError, match="batch needs"):
        causal_lm_kd_loss(student, teacher, {"attention_mask": batch["attention_mask"]})
    with pytest.raises(ValueError, match="teacher_indices must be"):
        causal_lm_sparse_kd_loss(student, torch.zeros(4, 3, 2, dtype=torch.long), torch.zeros(4, 3, 2), batch)
    with pytest.raises(ValueError, match="without 'labels'"):
        lm_head_inputs(student, batch)
    with pytest.raises(TypeError, match=r"the student is compiled \(torch.compile\)"):
        causal_lm_kd_loss(torch.compile(student, backend="eager"), teacher, batch)


# --------------------------------------------------------------------------- the trainer


class _Recording(DistillationTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append(int(inputs["attention_mask"].sum()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _train(tmp_path, fused: bool, **kw):
    student = gpt2(seed=0)
    source = kw.pop("source")
    trainer = _Recording(model=student, args=args(tmp_path, **kw.pop("targs", {})),
                         train_dataset=lm_dataset(32), eval_dataset=lm_dataset(8, offset=32),
                         data_collator=lm_collator(), fused_linear=fused, **source, **kw)
    trainer.seen = []
    trainer.train()
    return student, trainer


def test_trainer_option_matches_the_trainer_without_it(tmp_path):
    """Gradient accumulation of two unequal micro-batches, alpha = 0.3: the same losses, parts and
    weights as the Trainer on full logits."""
    teacher = llama(width=48, seed=1)
    runs, shapes = {}, []
    teacher.get_output_embeddings().register_forward_hook(lambda _m, _i, out: shapes.append(out.shape[1]))
    for fused in (False, True):
        shapes.clear()
        student, trainer = _train(tmp_path, fused, source=dict(teacher=teacher), temperature=2.0, alpha=0.3,
                                  targs=dict(max_steps=4, per_device_train_batch_size=4,
                                             gradient_accumulation_steps=2),
                                  **({"chunk_size": 11} if fused else {}))
        assert (set(shapes) == {1}) == fused                 # the teacher's head: one position per sample
        runs[fused] = (student, trainer, trainer.evaluate()["eval_loss"])
    (s0, t0, e0), (s1, t1, e1) = runs[False], runs[True]
    assert t1.fused_linear and t1.seen == t0.seen and len(set(t1.seen)) > 1
    for key in ("loss", "kd_loss", "ce_loss"):
        assert losses_of(t1, key) == pytest.approx(losses_of(t0, key), rel=1e-4), key
        assert len(losses_of(t1, key)) == 4
    assert e1 == pytest.approx(e0, rel=1e-5)
    for p, q in zip(s0.parameters(), s1.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def _cache_loader(data):
    return torch.utils.data.DataLoader(data, batch_size=8, collate_fn=lambda b: {
        k: v for k, v in lm_collator()(b).items() if k != "labels"})


def test_trainer_option_with_a_topk_cache(tmp_path):
    teacher = llama(width=48, seed=1)
    cache = TeacherCache.build(tmp_path / "cache", teacher, _cache_loader(lm_dataset(32)), storage=TopK(k=6),
                               temperature=2.0, progress=False, fsync=False)
    runs = {}
    for fused in (False, True):
        student, trainer = _train(tmp_path, fused, source=dict(teacher_cache=cache), alpha=0.5,
                                  tail="residual", targs=dict(max_steps=3))
        runs[fused] = (student, losses_of(trainer), losses_of(trainer, "kd_loss"))
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)
    assert runs[True][2] == pytest.approx(runs[False][2], rel=1e-4)
    for p, q in zip(runs[False][0].parameters(), runs[True][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_trainer_option_refuses_what_it_cannot_do(tmp_path):
    teacher, data = llama(), lm_dataset(8)
    common = dict(args=args(tmp_path), train_dataset=data, data_collator=lm_collator())
    with pytest.raises(ValueError, match="fused_linear=True supports the soft and offline modes, not 'hard'"):
        DistillationTrainer(model=gpt2(), teacher=teacher, mode="hard", fused_linear=True, **common)
    with pytest.raises(ValueError, match="fused_linear=True is for causal LM"):
        DistillationTrainer(model=gpt2(), teacher=teacher, task="sequence_classification", fused_linear=True,
                            **common)
    with pytest.raises(ValueError, match="backend='reference' is for the loss on full logits"):
        DistillationTrainer(model=gpt2(), teacher=teacher, backend="reference", fused_linear=True, **common)
    with pytest.raises(ValueError, match="chunk_size= is an option of fused_linear=True"):
        DistillationTrainer(model=gpt2(), teacher=teacher, chunk_size=8, **common)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        DistillationTrainer(model=gpt2(), teacher=teacher, chunk_size=0, fused_linear=True, **common)
    with pytest.raises(ValueError, match="fused_linear=True does not work with torch_compile=True"):
        DistillationTrainer(model=gpt2(), teacher=teacher, fused_linear=True,
                            **{**common, "args": args(tmp_path, torch_compile=True,
                                                      torch_compile_backend="eager")})
    with pytest.raises(TypeError, match="fused_linear must be a bool"):
        DistillationTrainer(model=gpt2(), teacher=teacher, fused_linear="yes", **common)
    cache = TeacherCache.build(tmp_path / "dense", teacher, _cache_loader(data), storage=Dense(),
                               progress=False, fsync=False)
    with pytest.raises(ValueError, match="needs a top-k or sampled teacher cache"):
        DistillationTrainer(model=gpt2(), teacher_cache=cache, fused_linear=True, **common)


def test_bf16_autocast_runs_close_to_the_unfused_loss():
    student, teacher = gpt2(seed=1), copy.deepcopy(llama(seed=2)).to(torch.bfloat16)
    batch = padded_batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.5)
        ref = unfused(student, teacher, batch, temperature=2.0, alpha=0.5)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float(), rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_trainer_option_under_two_processes(tmp_path):
    """torchrun, 2 processes (gloo on the CPU), unequal token counts per process: fused_linear=True
    takes the steps of the Trainer on full logits (losses, parts, final weights)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    root = Path(__file__).resolve().parents[1]
    worker = Path(__file__).with_name("hf_fused_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    full, fused = result["full"], result["fused"]
    assert result["world"] == 2 and fused["seen"] == full["seen"]
    assert any(a != b for a, b in zip(*fused["seen"]))          # the processes had different token counts
    for key in ("loss", "kd", "ce"):
        assert len(fused[key]) == 3 and fused[key] == pytest.approx(full[key], rel=1e-4), key
    w_full, w_fused = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "fused.pt")
    for k, v in w_full.items():
        torch.testing.assert_close(w_fused[k], v, rtol=1e-4, atol=1e-5)
