"""Train a tiny LoRA expert with SensitivityCallback(mode="both"); run under torchrun or plainly.

Usage: ddp_worker.py OUT_DIR PER_DEVICE_BATCH. Rank 0 writes OUT_DIR/final/sensitivity.safetensors, and every
rank writes OUT_DIR/rank<k>.pt with its own during-sums (to check they agree across ranks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sens_toys import TokenData, lora, tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from sens_peft.sensitivity.callback import SensitivityCallback  # noqa: E402


def main() -> None:
    out, per_device = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = lora(tiny_llama(seed=0), init_random=False)
    cb = SensitivityCallback(mode="both", calibration_samples=3, probe_samples=4, task="ddp")
    args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=per_device,
                             learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             logging_steps=1000, seed=0, dataloader_pin_memory=False,
                             ddp_find_unused_parameters=False)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(n=24, length=12), callbacks=[cb])
    trainer.train()
    trainer.save_model(str(out / "final"))
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"abs": cb.accumulator.abs_sum.cpu(), "world": int(os.environ.get("WORLD_SIZE", "1")),
                "parallel": str(args.parallel_mode)}, out / f"rank{rank}.pt")
    # Gloo's threads must be shut down before the interpreter exits; otherwise a rank can abort at exit
    # ("terminate called without an active exception"), which was seen once on a loaded 2-core machine.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
