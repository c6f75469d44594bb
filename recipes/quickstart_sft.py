"""Quick start with TRL: LoRA experts trained by `SFTTrainer` + `SensitivityCallback`, merged by `merge_adapters`.

    python recipes/quickstart_sft.py [--output-dir runs/quickstart_sft] [--steps 150] [--quick]

The same flow as recipes/quickstart.py with TRL's trainer: `SFTTrainer(..., peft_config=..., callbacks=[cb])`
wraps the model in PEFT itself, and `trainer.save_model(dir)` writes the adapter plus the callback's sidecars.
The toy data are pre-tokenised (`input_ids` + `completion_mask`), so the toy tokenizer (`processing_class`, needed
offline) only pads and the loss covers the answers only. SFTConfig's CPU-unfriendly defaults (bf16, gradient
checkpointing) are switched off.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from sens_peft import SensitivityCallback, SensitivityConfig, merge_adapters
from sens_peft.testing import toy

log = logging.getLogger("quickstart_sft")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/quickstart_sft")
    p.add_argument("--tasks", nargs="+", default=toy.TASK_NAMES, choices=toy.TASK_NAMES)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 60 test examples")
    args = p.parse_args()
    if args.quick:
        args.steps, args.n_test = min(args.steps, 40), min(args.n_test, 60)
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "trl", "sens_peft.merging", "sens_peft.transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out, t0 = Path(args.output_dir), time.perf_counter()
    base, tok = toy.pretrain_base(cache_dir=args.cache_dir, progress=True), toy.build_tokenizer()

    expert_acc = {}
    for task in args.tasks:
        sft_args = SFTConfig(
            output_dir=str(out / task), max_steps=args.steps, per_device_train_batch_size=32,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
            seed=args.seed, max_length=32, completion_only_loss=True, bf16=False, gradient_checkpointing=False,
            use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=args.steps,
            dataloader_pin_memory=False,
        )
        trainer = SFTTrainer(
            model=copy.deepcopy(base),  # SFTTrainer injects LoRA into the model it is given
            args=sft_args,
            train_dataset=Dataset.from_list(toy.sft_rows(task, "train", tok)),
            processing_class=tok,
            peft_config=toy.lora_config(),
            callbacks=[SensitivityCallback(SensitivityConfig(task=task))],
        )
        trainer.train()
        trainer.save_model(str(out / task))  # adapter + sensitivity.safetensors + probe.safetensors
        expert_acc[task] = toy.evaluate(trainer.model, [task], n=args.n_test, tokenizer=tok)[task]
        log.info("expert %-8s acc %.1f%%", task, 100 * expert_acc[task])

    dirs = [out / task for task in args.tasks]
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=args.tasks[0])
    for task, d in zip(args.tasks[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=task)
    rows = {}
    # plain methods, the paper's coefficients (sens="task+cross", the library's bounded reading), and the library
    # default (MergeConfig(): probe-fitted RegMean from the sidecars' Grams and probe sets)
    for method, kw in (("task_arithmetic", dict(scale=0.7)), ("ties", dict(density=0.5, trim_by="magnitude"))):
        for sens in (None, "task+cross"):
            name = f"{'Sens-' if sens else ''}{method}"
            report = merge_adapters(model, args.tasks, method=method, sens=sens, adapter_name=name.replace("-", "_"),
                                    sensitivities=dirs if sens else None, probes=dirs if sens else None, **kw)
            model.set_adapter(report.adapter_name)
            rows[name] = toy.normalized_accuracy(toy.evaluate(model, args.tasks, n=args.n_test, tokenizer=tok),
                                                 expert_acc)
    report = merge_adapters(model, args.tasks, adapter_name="default_merge", sensitivities=dirs, probes=dirs)
    model.set_adapter(report.adapter_name)
    rows["MergeConfig() (default)"] = toy.normalized_accuracy(
        toy.evaluate(model, args.tasks, n=args.n_test, tokenizer=tok), expert_acc)
    print("\nNormalised accuracy (merged acc / own expert's acc)")
    print(toy.format_table(rows, args.tasks))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
