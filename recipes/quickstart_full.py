"""Quick start for full fine-tunes: experts trained with `Trainer` + `SensitivityCallback`, merged by `merge_models`.

    python recipes/quickstart_full.py [--output-dir runs/quickstart_full] [--steps 100] [--quick]

Each expert is a complete model folder (model.safetensors + sensitivity/probe sidecars). `merge_models` streams
the base and the experts from disk one tensor at a time and writes the merged model folder, which loads with
`from_pretrained` like any other model.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from sens_peft import SensitivityCallback, SensitivityConfig, merge_models
from sens_peft.testing import toy

log = logging.getLogger("quickstart_full")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/quickstart_full")
    p.add_argument("--tasks", nargs="+", default=toy.TASK_NAMES, choices=toy.TASK_NAMES)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 60 test examples")
    args = p.parse_args()
    if args.quick:
        args.steps, args.n_test = min(args.steps, 30), min(args.n_test, 60)
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "sens_peft.merging", "sens_peft.transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out, t0 = Path(args.output_dir), time.perf_counter()
    base = toy.pretrain_base(cache_dir=args.cache_dir, progress=True)
    base_dir = toy.base_path(cache_dir=args.cache_dir)  # pretrain_base saved the base (and tokenizer) there
    tok = toy.build_tokenizer()

    expert_acc, dirs = {}, []
    for task in args.tasks:
        d = out / "experts" / task
        expert = toy.train_expert(base, task, lora=False, steps=args.steps, lr=args.lr, seed=args.seed,
                                  output_dir=d, save=True, tokenizer=tok,  # trainer.save_model(d) + sidecars
                                  callbacks=[SensitivityCallback(SensitivityConfig(task=task))])
        expert_acc[task] = toy.evaluate(expert, [task], n=args.n_test, tokenizer=tok)[task]
        dirs.append(d)
        log.info("expert %-8s acc %.1f%%", task, 100 * expert_acc[task])
        del expert

    rows = {}
    # plain methods, the paper's coefficients (sens="task+cross", the library's bounded reading), then the library
    # default (MergeConfig(): probe-fitted RegMean from the sidecars' Grams and probe sets)
    runs = [(f"{'Sens-' if sens else ''}{method}", dict(method=method, sens=sens, **kw))
            for method, kw in (("task_arithmetic", dict(scale=0.7)), ("ties", dict(density=0.5, trim_by="magnitude")),
                               ("dare_ties", dict(density=0.5)))
            for sens in (None, "task+cross")]
    runs.append(("MergeConfig() (default)", {}))
    for name, kw in runs:
        report = merge_models(base_dir, dirs, out / "merged" / name.split()[0], overwrite=True, **kw)
        merged = AutoModelForCausalLM.from_pretrained(report.output_dir)
        rows[name] = toy.normalized_accuracy(toy.evaluate(merged, args.tasks, n=args.n_test, tokenizer=tok),
                                             expert_acc)
        log.info("%-20s merged in %.2f s, avg normalised %.1f%%", name, report.seconds, 100 * rows[name]["avg"])
    print("\nNormalised accuracy (merged acc / own expert's acc)")
    print(toy.format_table(rows, args.tasks))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
