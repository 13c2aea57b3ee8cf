"""Runs of the Hugging Face and Lightning integrations for the multi-process tests, launched
by ``torchrun`` (or run alone as one process).

``hf``: :class:`kdfast.integrations.hf.DistillationTrainer` distils a tiny GPT-2 from a tiny
Llama on padded char-level batches of standard-library docstrings (unequal token counts per
process); ``--batch`` is per process. Runs: ``exact`` (the default
``average_tokens_across_devices=True``), ``ga`` (half the batch, two accumulation steps) and
``local`` (``average_tokens_across_devices=False``, each process's own mean).

``lightning``: :class:`kdfast.integrations.lightning.DistillationModule` on scikit-learn's
8x8 digits (Lightning's ``DistributedSampler`` order with two processes, that order given
as the sampler with one), then ``trainer.validate`` on 356 held-out digits.

Every rank gathers what it saw; rank 0 writes ``result.json`` and the final weights
``<run>.pt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from kdfast.train import distributed  # noqa: E402


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gather(obj):
    return distributed.all_gather_objects(obj) if distributed.is_distributed() else [obj]


# --------------------------------------------------------------------------- Hugging Face


def hf_runs(out: Path, batch: int, steps: int) -> dict:
    import transformers
    from test_integration_hf import args, gpt2, llama, lm_collator, lm_dataset

    from kdfast.integrations.hf import DistillationTrainer, count_rows

    transformers.logging.set_verbosity_error()

    class Recording(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                ids = inputs["input_ids"].tolist()
                mask = inputs["attention_mask"].tolist()
                rows = int(count_rows("causal_lm", inputs)[0])
                self.seen.append(([[t for t, m in zip(r, k) if m] for r, k in zip(ids, mask)], rows))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    teacher = llama(width=32, seed=1).eval()
    with torch.no_grad():             # a confident teacher (an untrained one is near uniform)
        teacher.lm_head.weight.mul_(30.0)
    data = lm_dataset(48)
    results = {}
    runs = {"exact": (batch, 1, True), "ga": (batch // 2, 2, True), "local": (batch, 1, False)}
    for name, (bs, ga, across) in runs.items():
        if world() == 1 and name != "exact":
            continue
        student = gpt2(seed=0)
        trainer = Recording(model=student, teacher=teacher, train_dataset=data, data_collator=lm_collator(),
                            args=args(out / name, max_steps=steps, per_device_train_batch_size=bs,
                                      gradient_accumulation_steps=ga, average_tokens_across_devices=across,
                                      ddp_backend="gloo" if world() > 1 else None),
                            temperature=2.0, alpha=0.5)
        trainer.seen = []
        trainer.train()
        history = [row for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]
        results[name] = {
            "loss": [row["loss"] for row in history], "kd": [row["kd_loss"] for row in history],
            "ce": [row["ce_loss"] for row in history], "seen": gather(trainer.seen)}
        if distributed.is_main_process():
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            torch.save(state, out / f"hf_{name}.pt")
    return results


# --------------------------------------------------------------------------- Lightning


def lightning_run(out: Path, batch: int, steps: int) -> dict:
    import lightning.pytorch as pl
    from ddp_worker import digits, teacher_for
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    from kdfast.integrations.lightning import DistillationModule

    class Memory(Logger):
        name, version = "memory", 0

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict] = []

        def log_metrics(self, metrics, step=None):
            self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    class Losses(pl.Callback):
        def __init__(self) -> None:
            self.local: list[float] = []
            self.batches: list[list[int]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.local.append(float(outputs["loss"]))
            self.batches.append(batch[1].tolist())

    train, test = digits()
    teacher = teacher_for(train)
    x, y = test.tensors
    val = TensorDataset(x[:356], y[:356])
    torch.manual_seed(3)
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    module = DistillationModule(student, "soft", teacher=teacher, temperature=4.0, alpha=0.3, lr=2e-2)
    logger, losses = Memory(), Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=world(), strategy="ddp" if world() > 1 else "auto",
                         max_steps=steps, logger=logger, log_every_n_steps=1, callbacks=[losses],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    if world() > 1:         # Lightning gives the training loader a shuffling DistributedSampler
        loader = DataLoader(train, batch_size=batch, shuffle=False)
    else:                   # its order (seed 0, epoch 0): the 2-process run's global batches
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        loader = DataLoader(train, batch_size=batch, sampler=order)
    trainer.fit(module, loader)
    metrics = trainer.validate(module, DataLoader(val, batch_size=50), verbose=False)[0]
    if distributed.is_main_process():
        torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, out / "lightning.pt")
    return {"local": gather(losses.local), "batches": gather(losses.batches),
            "logged": [r for r in logger.rows if "train/loss_step" in r],
            "val": metrics, "steps": trainer.global_step}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, required=True,
                        help="per-process batch size (Lightning: twice this)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=("hf", "lightning"), default=None)
    a = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"world": world()}
    if a.only in (None, "hf"):
        result["hf"] = hf_runs(out, a.batch, a.steps)
    if a.only in (None, "lightning"):
        result["lightning"] = lightning_run(out, 2 * a.batch, a.steps)
    if distributed.is_main_process():
        (out / "result.json").write_text(json.dumps(result))
    return 0


def _shutdown() -> None:
    """End the process group the Trainer started (left to interpreter exit, gloo's threads
    can abort a rank with "terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    code = main()
    _shutdown()
    sys.exit(code)
