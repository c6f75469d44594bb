"""Give adapters trained elsewhere (e.g. public LoRAs from the Hub) their sensitivity sidecars, then merge them.

Each adapter is copied into --out/<name>/ and scored on a few examples of *its own task's* data with
`compute_sensitivity` (the same calibration pass as SensitivityCallback's "after" mode); the sidecars
(sensitivity.safetensors, probe.safetensors) land next to the adapter, and the folders merge like experts
trained with the callback.

Default (no flags): the built-in toy base and two toy adapters trained *without* the callback.
Real models, one flag away (data: JSON lines with "prompt" and "completion", or "text"):

    python recipes/sensitivity_from_existing_adapters.py --base meta-llama/Llama-3.2-1B \
        --adapter math=some-user/llama-math-lora:data/math.jsonl \
        --adapter code=other-user/llama-code-lora:data/code.jsonl --out runs/scored
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sens_peft import compute_sensitivity, merge_adapters


def load_jsonl(path: str, tokenizer, n: int, max_length: int) -> list[dict]:
    """Tokenise up to n rows; the prompt is masked out of the labels when the rows have prompt/completion."""
    rows = []
    for line in Path(path).read_text().splitlines()[:n]:
        item = json.loads(line)
        prompt = item.get("prompt", "")
        text = prompt + item.get("completion", item.get("text", ""))
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        n_prompt = len(tokenizer(prompt)["input_ids"]) if prompt else 0
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return rows


def real_experts(args) -> tuple[object, dict[str, tuple[Path, list[dict]]]]:
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(args.base)  # never trust_remote_code implicitly
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    experts = {}
    for spec in args.adapter:
        name, rest = spec.split("=", 1)
        source, data = rest.rsplit(":", 1)
        folder = Path(source) if Path(source).is_dir() else Path(snapshot_download(source))
        experts[name] = (folder, load_jsonl(data, tokenizer, args.samples, args.max_length))
    return base, experts


def toy_experts(args) -> tuple[object, dict[str, tuple[Path, list[dict]]]]:
    from sens_peft.testing import toy

    base = toy.pretrain_base(progress=True)
    tokenizer = toy.build_tokenizer()
    experts = {}
    for task in toy.TASK_NAMES[:2]:
        folder = Path(args.out) / "unscored" / task
        toy.train_expert(base, task, steps=args.steps, output_dir=folder, save=True)  # no SensitivityCallback
        experts[task] = (folder, list(toy.task_dataset(task, "validation", tokenizer, n=args.samples)))
    return base, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model (hub id or folder); default: the toy base")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=ADAPTER_REPO_OR_DIR:DATA.jsonl")
    parser.add_argument("--out", default="runs/scored")
    parser.add_argument("--samples", type=int, default=32, help="calibration examples per expert")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=150, help="toy adapters only: training steps")
    args = parser.parse_args()

    base, experts = real_experts(args) if args.base else toy_experts(args)
    scored = []
    for name, (source, data) in experts.items():
        target = Path(args.out) / name
        if target.resolve() != source.resolve():
            shutil.copytree(source, target, dirs_exist_ok=True)
        record = compute_sensitivity(target, data, base_model=base, task=name, calibration_samples=args.samples,
                                     max_length=args.max_length, save_to=target)
        print(f"{name}: scored {len(record.tensor_names)} tensors in {len(record.groups)} groups -> {target}")
        scored.append(target)

    report = merge_adapters(base, scored, method="ties", density=0.5, sens="task+cross",
                            save_to=Path(args.out) / "merged", overwrite=True)
    print(report.coefficients)
    print(f"merged adapter: {report.output_dir}")


if __name__ == "__main__":
    main()
