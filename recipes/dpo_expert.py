"""DPO experts with `SensitivityCallback`, then merged: TRL's `DPOTrainer` + LoRA, offline, on a tiny model.

    python recipes/dpo_expert.py [--output-dir runs/dpo_expert] [--steps 40] [--quick]

Two preference tasks on generated pairs over a character-level Llama built from a config (no download, no
pre-training; the reference is this random base):

* ``low``: prompt ``"low <w>:"`` prefers an answer spelt with ``abcd`` over one spelt with ``efgh``;
* ``high``: prompt ``"high <w>:"`` prefers an answer spelt with ``mnop`` over one spelt with ``ijkl``
  (``<w>``: a random word; the answers are random too, so only the preferred letters can be learnt).

Each expert is ``DPOTrainer(..., peft_config=LoraConfig(...), callbacks=[SensitivityCallback(task=...)])``: the
default ``mode="after"`` runs the calibration pass on the DPO loss (per pair, against the trainer's reference: the
base with the adapter disabled), stores the input Grams of the chosen sequences and keeps chosen completions as the
probe set; ``trainer.save_model`` writes the adapter and the sidecars (metadata ``calibration_loss=dpo``).
Then both experts are merged twice: RegMean from the stored Grams (what the library default falls back to without
probes; the default itself fits RegMean's coefficients on the probes' language-model loss, which for preference
experts is not their objective, so it is not used here) and task arithmetic with the paper's coefficients
(``sens="task+cross"``, cross-task factor from the probes).

Metric: preference accuracy on held-out pairs, the fraction whose implicit reward margin
``(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))`` is positive (0.5 = chance).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from sens_peft import SensitivityCallback, merge_adapters
from sens_peft.sensitivity.calibration_loss import collate_pairs, completion_logps

log = logging.getLogger("dpo_expert")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASKS = {"low": ("abcd", "efgh"), "high": ("mnop", "ijkl")}  # prompt word: (preferred letters, dispreferred)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (lower-case letters, space, colon) plus pad / eos / bos."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyz :"
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def tiny_llama(tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2))


def pairs(task: str, n: int, seed: int) -> Dataset:
    """``n`` preference pairs of ``task`` over random 5-letter words (seeded)."""
    rng = random.Random(f"{task}-{seed}")
    good, bad = TASKS[task]
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(4))
        rows.append({"prompt": f"{task} {word}:", "chosen": "".join(rng.choice(good) for _ in range(4)),
                     "rejected": "".join(rng.choice(bad) for _ in range(4))})
    return Dataset.from_list(rows)


@torch.no_grad()
def preference_accuracy(model: PeftModel, tok: PreTrainedTokenizerFast, data: Dataset) -> float:
    """Fraction of pairs whose implicit reward margin under the active adapter (vs the base) is positive."""
    rows = [{"prompt_ids": tok(r["prompt"])["input_ids"], "chosen_ids": tok(r["chosen"] + "<eos>")["input_ids"],
             "rejected_ids": tok(r["rejected"] + "<eos>")["input_ids"]} for r in data]
    batch = collate_pairs(rows, pad_id=tok.pad_token_id, max_length=64)
    model.eval()

    def logps() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return completion_logps(logits, batch["input_ids"], batch["completion_mask"])

    policy = logps()
    with model.disable_adapter():
        ref = logps()
    chosen, rejected = (policy - ref).chunk(2)
    return float((chosen > rejected).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/dpo_expert")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 10 steps")
    args = p.parse_args()
    steps = min(args.steps, 10) if args.quick else args.steps
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "trl", "datasets", "sens_peft.merging", "sens_peft.transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out, t0 = Path(args.output_dir), time.perf_counter()
    tok = char_tokenizer()
    test = {task: pairs(task, 64, args.seed + 1000) for task in TASKS}

    for task in TASKS:
        trainer = DPOTrainer(
            model=tiny_llama(tok, args.seed),  # DPOTrainer wraps it in PEFT; the reference = adapter disabled
            args=DPOConfig(output_dir=str(out / task), max_steps=steps, per_device_train_batch_size=8,
                           learning_rate=1e-2, beta=0.1, seed=args.seed, bf16=False, use_cpu=True,
                           report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=steps,
                           dataloader_pin_memory=False),
            train_dataset=pairs(task, 128, args.seed),
            processing_class=tok,
            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                   target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
            callbacks=[SensitivityCallback(task=task)],  # mode="after": the DPO loss on 32 held pairs
        )
        trainer.train()
        trainer.save_model(str(out / task))  # adapter + sensitivity.safetensors (+ Grams) + probe.safetensors
        log.info("expert %-4s: preference accuracy %s", task,
                 {t: round(preference_accuracy(trainer.model, tok, d), 3) for t, d in test.items()})

    dirs = [out / task for task in TASKS]
    names = list(TASKS)
    model = PeftModel.from_pretrained(tiny_llama(tok, args.seed), str(dirs[0]), adapter_name=names[0])
    model.load_adapter(str(dirs[1]), adapter_name=names[1])
    table = {}
    for name in TASKS:
        model.set_adapter(name)
        table[f"expert {name}"] = {t: preference_accuracy(model, tok, d) for t, d in test.items()}
    merges = {"regmean": dict(method="regmean"), "sens-task_arithmetic": dict(method="task_arithmetic", sens="task+cross",
                                                                    probes=dirs, tau_normalization="exp_z")}
    for label, kw in merges.items():
        report = merge_adapters(model, list(TASKS), sensitivities=dirs, adapter_name=label.split(" ")[0]
                                .replace("-", "_"), **kw)
        model.set_adapter(report.adapter_name)
        table[label] = {t: preference_accuracy(model, tok, d) for t, d in test.items()}
    print("\nPreference accuracy on held-out pairs (0.5 = chance)")
    print(f"{'':24s}" + "".join(f"{t:>8s}" for t in TASKS))
    for label, row in table.items():
        print(f"{label:24s}" + "".join(f"{row[t]:8.3f}" for t in TASKS))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
