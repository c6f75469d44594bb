"""Each torchrun rank runs the calibration pass on its share of the batches, then all-reduces the Gram/Fisher sums.

Usage: stats_ddp_worker.py OUT_DIR. Rank 0 writes OUT_DIR/reduced.pt (the reduced sums); run without torchrun it
writes the whole pass's sums to OUT_DIR/whole.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sens_toys import TokenData, lora, tiny_llama  # noqa: E402

from sens_peft.config import SensitivityConfig  # noqa: E402
from sens_peft.sensitivity.calibrate import CalibrationPass, iter_calibration_batches  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = lora(tiny_llama(seed=0), targets=("q_proj", "k_proj", "v_proj", "down_proj"))
    cfg = SensitivityConfig(calibration_samples=6, calibration_batch_size=2, gram="full", fisher=True)
    batches = list(iter_calibration_batches(TokenData(n=8, length=10, seed=9), cfg))
    cal = CalibrationPass(model, cfg)
    cal.run(batches[rank::world])
    if world > 1:
        cal.stats.all_reduce_()
    if rank == 0:
        stats = cal.stats
        torch.save({"grams": stats.grams, "tokens": stats.gram_tokens, "fisher": stats.fisher,
                    "batches": stats.fisher_batches, "aliases": stats.aliases},
                   out / ("reduced.pt" if world > 1 else "whole.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
