"""Overhead of SensitivityCallback: step time with/without it ("during" mode), and the "after" pass cost.

Tiny Llama from a config (4 layers, hidden 128), LoRA r=8 on all seven projections, and a full fine-tune
variant. Runs with and without the callback are interleaved (ABAB...) in one process; each run's median step time
(on_step_begin -> on_step_end) is taken, and the median of the per-pair ratios is reported (target <= 1.02). The
callback's own time per step (its on_pre_optimizer_step) is timed directly as well, which is less noisy on a
shared machine. Finally the "after" calibration pass (32 samples, batch 1) is timed against the training time.

    python benchmarks/callback_overhead.py [--steps 30] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from sens_peft.config import SensitivityConfig
from sens_peft.sensitivity.calibrate import run_calibration
from sens_peft.sensitivity.callback import SensitivityCallback

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        self.ids = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


class StepTimer(TrainerCallback):
    def __init__(self, sync):
        self.times: list[float] = []
        self.sync = sync

    def on_step_begin(self, args, state, control, **kw):
        self.sync()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.sync()
        self.times.append(time.perf_counter() - self._t)


class TimedSensitivity(SensitivityCallback):
    """Times the callback's own step work."""

    def on_pre_optimizer_step(self, *a, **kw):
        self._sync()
        t = time.perf_counter()
        super().on_pre_optimizer_step(*a, **kw)
        self._sync()
        self.own.append(time.perf_counter() - t)


def make_model(kind: str, device: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJ, lora_dropout=0.0))
    return model.to(device)


def run(kind: str, with_cb: bool, steps: int, device: str, batch: int, length: int):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    timer = StepTimer(sync)
    callbacks: list = [timer]
    cb = None
    if with_cb:
        cb = TimedSensitivity(mode="during", store_probe=False)
        cb.own, cb._sync = [], sync
        callbacks.append(cb)
    model = make_model(kind, device)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                                 learning_rate=1e-4, save_strategy="no", report_to="none",
                                 use_cpu=device == "cpu", disable_tqdm=True, logging_steps=10**6,
                                 dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, train_dataset=Data(batch * steps, length, 512), callbacks=callbacks)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    warm = timer.times[3:] or timer.times
    own = statistics.median(cb.own[3:] or cb.own) if cb is not None else 0.0
    return statistics.median(warm), own, total, model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calibration-samples", type=int, default=32)
    opts = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"device={opts.device} steps={opts.steps} repeats={opts.repeats} batch={opts.batch}x{opts.length}")
    for kind in ("lora", "full"):
        ratios, owns, base_steps = [], [], []
        model, total = None, 0.0
        for _ in range(opts.repeats):
            without, _, _, _ = run(kind, False, opts.steps, opts.device, opts.batch, opts.length)
            with_, own, total, model = run(kind, True, opts.steps, opts.device, opts.batch, opts.length)
            ratios.append(with_ / without)
            owns.append(own / without)
            base_steps.append(without)
        data = Data(opts.calibration_samples, opts.length, 512)
        t0 = time.perf_counter()
        run_calibration(model, data, SensitivityConfig(calibration_samples=opts.calibration_samples))
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
        after = time.perf_counter() - t0
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[{kind}] trainable={n_train:,} step={statistics.median(base_steps) * 1e3:.1f} ms | "
              f"step-time ratio with/without (median of {opts.repeats}) = {statistics.median(ratios):.4f} "
              f"(all: {', '.join(f'{r:.3f}' for r in ratios)}) | callback's own work = "
              f"{100 * statistics.median(owns):.2f}% of a step")
        print(f"[{kind}] after pass ({opts.calibration_samples} samples, batch 1) = {after:.2f} s = "
              f"{100 * after / total:.1f}% of one {opts.steps}-step training run ({total:.2f} s)")


if __name__ == "__main__":
    main()
