"""``sens-peft demo`` / ``python -m sens_peft.demo``: the quick start. Train LoRA experts with SensitivityCallback, merge them with and without Sens-Merging.

    sens-peft demo                                       # built-in toy suite, CPU, about 2 minutes
    python -m sens_peft.demo --quick                     # fewer steps and test examples (a smoke run)
    python recipes/quickstart.py --model meta-llama/Llama-3.2-1B --tasks ...   # see --model below

It ships inside the package (a wheel install runs it); ``recipes/quickstart.py`` is a thin wrapper around it.

Steps (each a few lines below):
  1. a base model: the built-in tiny Llama, pre-trained on generic text plus every task restricted to part of
     its input symbols, so it already half-knows each task, like a real pre-trained LLM; it ships with the
     package (rebuilt by recipes/pretrain_toy_base.py) and is cached in ~/.cache/sens_peft/toy on first use; it
     is also saved to <output-dir>/base for recipes/merge_3_experts.yaml;
  2. one LoRA expert per task with `transformers.Trainer` + `SensitivityCallback(SensitivityConfig(task=...))`;
     `trainer.save_model(dir)` writes the adapter and the callback's sidecars (sensitivity + probe) next to it;
  3. merge: averaging (TA, scale 1/K), then TA, TIES, DARE-TIES, each plain (sens=None) and with the paper's
     Sens-Merging coefficients (sens="task+cross", in the library's bounded reading, max_ratio=2); the
     data-aware merges RegMean (the experts' input Grams) and Fisher (their E[g²]), both captured by the callback;
     TIES trimmed by the stored per-element sensitivity; TA with per-layer coefficients fitted on the experts'
     probe sets (`probe_fit`); and the library default `MergeConfig()`;
  4. a table of exact-match accuracy per task and normalised accuracy (merged acc / that task's expert acc);
     the best merged adapter is saved (`save_to=`) with its merge card.

`--model NAME` swaps in a hub causal LM (and its tokenizer) for step 1: the toy tasks are then fine-tuned on that
model as plain text. It is one flag away but not exercised by the project's tests (no downloads here).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer
from transformers.utils import logging as hf_logging

from .config import MergeConfig, SensitivityConfig
from .merging import merge_adapters
from .sensitivity.callback import SensitivityCallback
from .testing import toy
from .validation.options import uses_probes, uses_sensitivities

log = logging.getLogger("quickstart")

# the paper's layer-wise coefficients, alpha of mean 1 and tau standardised (see sens_peft.coefficients), in the
# library's recommended reading: bounded so that no expert gets more than twice another's coefficient in a layer
# (max_ratio=2, MergeConfig's default; max_ratio=None is the unbounded softmax that collapsed this table's merges)
PAPER_SENS = dict(sens="task+cross", normalization="mean1", tau_normalization="exp_z", max_ratio=2.0)


def merge_runs(n_experts: int, *, seed: int = 0, temperature: float = 1.0) -> list[tuple[str, MergeConfig]]:
    """The merges of the table, in print order: one ``(label, MergeConfig)`` per row (add a row here).

    Args:
        n_experts: Number of experts (plain averaging is TA with scale ``1 / n_experts``).
        seed: Seed of every config (DARE's random drop).
        temperature: Softmax temperature T of the Sens-Merging rows.
    """
    sens = dict(PAPER_SENS, temperature=temperature)
    ta = dict(method="task_arithmetic", scale=0.7)
    ties = dict(method="ties", density=0.5, scale=1.0, trim_by="magnitude")
    dare_ties = dict(method="dare_ties", density=0.5, scale=1.0)
    rows = [
        ("Avg", dict(method="task_arithmetic", scale=1.0 / n_experts)),  # the reference point
        ("TA", ta),
        ("Sens-TA", {**ta, **sens}),
        ("TIES", ties),
        ("Sens-TIES", {**ties, **sens}),
        ("DARE-TIES", dare_ties),
        ("Sens-DARE-TIES", {**dare_ties, **sens}),
        # data-aware merges from the statistics the callback captured (input Grams, Fisher)
        ("RegMean", dict(method="regmean", params={"shrinkage": 1.0})),  # the paper's; the default is 0.99
        ("Fisher", dict(method="fisher")),
        # TIES that keeps each expert's most *sensitive* entries (element maps of the sidecars)
        ("SensTrim-TIES", dict(method="ties", trim_by="sensitivity", scale=1.5)),
        # layer-wise coefficients fitted on the experts' probe sets (AdaMerging-style, supervised)
        ("ProbeFit-TA", dict(method="probe_fit")),
        ("MergeConfig()", {}),  # the library default
    ]
    return [(label, MergeConfig(seed=seed, **fields)) for label, fields in rows]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sens-peft demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/quickstart", help="experts, merged adapter, results.json")
    p.add_argument("--tasks", nargs="+", default=toy.TASK_NAMES, choices=toy.TASK_NAMES)
    # 80 steps at 2e-3 reach 100% on every toy task like 150 at 1e-3 did, in half the time (the first run's budget)
    p.add_argument("--steps", type=int, default=80, help="LoRA fine-tuning steps per expert")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=200, help="test examples per task")
    p.add_argument("--temperature", type=float, default=1.0, help="Sens-Merging softmax temperature T")
    p.add_argument("--cache-dir", default=None, help="where the pre-trained toy base is cached")
    p.add_argument("--model", default=None,
                   help="a hub causal LM to use instead of the toy base (downloads it; not exercised in tests)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 for the toy model unless OMP_NUM_THREADS is set; torch's "
                        "default with --model). The toy's results do not depend on it, but its ops are tiny: on a "
                        "busy 2-core machine 2 threads trained an expert ~25x slower than 1 (threads waiting on "
                        "each other)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 60 test examples")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_test = min(args.steps, 40), min(args.n_test, 60)
    return args


def load_base(args):
    """The base model and its tokenizer: the cached toy base, or a hub model with --model."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        tok.pad_token = tok.pad_token or tok.eos_token
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32), tok
    return toy.pretrain_base(cache_dir=args.cache_dir, progress=True), toy.build_tokenizer()


def train_expert(base, tok, task: str, out: Path, args) -> None:
    """Fine-tune one LoRA expert with the sensitivity callback; save it (adapter + sidecars) to `out`."""
    model = get_peft_model(base, toy.lora_config())  # adapter "default": saved at the top of `out`
    trainer = Trainer(
        model=model,
        args=toy.training_args(out, steps=args.steps, lr=args.lr, seed=args.seed),
        train_dataset=toy.task_dataset(task, "train", tok),
        data_collator=toy.ToyCollator(tok.pad_token_id),
        callbacks=[SensitivityCallback(SensitivityConfig(task=task))],
    )
    trainer.train()
    trainer.save_model(str(out))  # adapter_model.safetensors + sensitivity.safetensors + probe.safetensors
    model.unload()  # take the LoRA layers out again so the next expert starts from the plain base


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the quick start with command-line arguments ``argv`` (default: ``sys.argv[1:]``)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "sens_peft.merging", "sens_peft.transfer", "sens_peft.coefficients"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars at every load and save
    out = Path(args.output_dir)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    threads = args.threads or (None if args.model or "OMP_NUM_THREADS" in os.environ else 1)
    if threads:
        torch.set_num_threads(threads)

    # 1. base
    base, tok = load_base(args)
    base.save_pretrained(out / "base")  # recipes/merge_3_experts.yaml points at <output-dir>/base
    tok.save_pretrained(out / "base")
    rows = {"base": evaluate(base, args.tasks, args, tok)}
    log.info("base ready (%.0f s): %s", time.perf_counter() - t0, _fmt(rows["base"]))

    # 2. experts
    for task in args.tasks:
        t = time.perf_counter()
        train_expert(base, tok, task, out / "experts" / task, args)
        log.info("expert %-8s trained (%.0f s)", task, time.perf_counter() - t)

    # 3. merges: all experts as named adapters of one PeftModel, the sidecars read from their folders
    dirs = [out / "experts" / task for task in args.tasks]
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=args.tasks[0])
    for task, d in zip(args.tasks[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=task)
    for task in args.tasks:  # each expert on every task (the off-diagonal shows interference)
        model.set_adapter(task)
        rows[f"expert:{task}"] = evaluate(model, args.tasks, args, tok)
    expert_acc = {task: rows[f"expert:{task}"][task] for task in args.tasks}  # the normaliser: own task
    log.info("experts on their own task: %s", _fmt(expert_acc))

    reports = {}
    runs = merge_runs(len(args.tasks), seed=args.seed, temperature=args.temperature)
    for name, config in runs:
        report = merge_adapters(model, args.tasks, config=config, adapter_name=name.replace("-", "_").strip("()"),
                                **sidecars(config, dirs))
        model.set_adapter(report.adapter_name)
        rows[name] = evaluate(model, args.tasks, args, tok)
        reports[name] = report
        log.info("%-14s merged in %.2f s: %s", name, report.seconds, _fmt(rows[name]))

    # 4. results
    norm = {name: toy.normalized_accuracy(acc, expert_acc) for name, acc in rows.items()}
    print(f"\nExact-match accuracy (test split, {args.n_test} examples per task)")
    print(toy.format_table({k: {**v, "avg": sum(v[t] for t in args.tasks) / len(args.tasks)}
                            for k, v in rows.items()}, args.tasks))
    print("\nNormalised accuracy (merged acc / own expert's acc)")
    print(toy.format_table({k: v for k, v in norm.items() if not k.startswith("expert:")}, args.tasks))
    best = max(reports, key=lambda k: norm[k]["avg"])
    if reports[best].config.sens is not None:
        print(f"\nSens-Merging coefficients of {best}:")
        print(reports[best].coefficients)
    config = dict(runs)[best]  # as asked, not as resolved (a resolved trim_by='magnitude' would be "ignored")
    merge_adapters(model, args.tasks, config=config, adapter_name="best", **sidecars(config, dirs),
                   save_to=out / "merged", overwrite=True)
    (out / "results.json").write_text(_json({"accuracy": rows, "normalized": norm, "best": best}))
    print(f"\nbest merge: {best} (avg normalised {100 * norm[best]['avg']:.1f}%), saved to {out / 'merged'}")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


def sidecars(config: MergeConfig, dirs: list[Path]) -> dict[str, Optional[list[Path]]]:
    """``sensitivities=`` / ``probes=`` for a merge: the experts' folders where ``config`` reads them, else None
    (passing files a merge does not read logs a warning that they are ignored)."""
    return {"sensitivities": dirs if uses_sensitivities(config) else None,
            "probes": dirs if uses_probes(config) else None}


def evaluate(model, tasks: Sequence[str], args, tok) -> dict[str, float]:
    """Exact-match accuracy on the first ``args.n_test`` test examples of each task, one batch per task."""
    return toy.evaluate(model, tasks, n=args.n_test, batch_size=max(1, args.n_test), tokenizer=tok)


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.0f}%" for k, v in acc.items())


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1)


def run_demo(output_dir: str = "runs/quickstart", quick: bool = False) -> None:
    """The quick start as ``sens-peft demo`` runs it."""
    main(["--output-dir", output_dir] + (["--quick"] if quick else []))


if __name__ == "__main__":
    main()
