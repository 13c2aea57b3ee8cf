"""DistillationTrainer with and without ``fused_linear=True`` under ``torchrun`` (gloo, CPU),
for tests/test_integration_hf_fused.py: a tiny GPT-2 distilled from a tiny Llama on padded
char-level batches (unequal token counts per process). Rank 0 writes ``result.json`` (per-step
``loss`` / ``kd_loss`` / ``ce_loss`` of both runs, the token counts each process saw) and the
final weights ``<run>.pt`` into ``--out``.
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

from kdfast.train import distributed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    a = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import transformers
    from test_integration_hf import args, gpt2, llama, lm_collator, lm_dataset

    from kdfast.integrations.hf import DistillationTrainer

    transformers.logging.set_verbosity_error()

    class Recording(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.seen.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    teacher = llama(width=32, seed=1).eval()
    with torch.no_grad():             # a confident teacher (an untrained one is near uniform)
        teacher.lm_head.weight.mul_(30.0)
    result: dict = {"world": int(os.environ.get("WORLD_SIZE", "1"))}
    for fused in (False, True):
        name = "fused" if fused else "full"
        student = gpt2(seed=0)
        trainer = Recording(model=student, teacher=teacher, train_dataset=lm_dataset(32),
                            data_collator=lm_collator(), fused_linear=fused, temperature=2.0, alpha=0.5,
                            args=args(out / name, max_steps=a.steps, per_device_train_batch_size=4,
                                      ddp_backend="gloo"))
        trainer.seen = []
        trainer.train()
        rows = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
        seen = [trainer.seen]
        if distributed.is_distributed():
            seen = distributed.all_gather_objects(trainer.seen)
        result[name] = {"loss": [r["loss"] for r in rows], "kd": [r["kd_loss"] for r in rows],
                        "ce": [r["ce_loss"] for r in rows], "seen": seen}
        if distributed.is_main_process():
            torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, out / f"{name}.pt")
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
