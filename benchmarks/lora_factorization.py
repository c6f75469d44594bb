"""LoRA output path: rank-r factorisation of merged deltas (randomized range finder vs the exact truncation) and
the merge time against PEFT's ``add_weighted_adapter``, measured in one process, one thread, back to back.

    OMP_NUM_THREADS=1 python benchmarks/lora_factorization.py            # hidden 1024 / intermediate 2816, 4 layers

For every module of a TIES merge of 3 rank-16 adapters (all projections) it prints the Frobenius error of the
rank-16 output relative to the exact truncated SVD's error, then times ``merge_adapters`` (TA exact concatenation;
TIES with ``factorization="randomized"`` and ``"exact"``) and PEFT (``cat``, ``ties_svd``), min of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic import ModelShape, make_lora_experts  # noqa: E402

from sens_peft import merge_adapters  # noqa: E402
from sens_peft.lora import svd_factors  # noqa: E402
from sens_peft.lowrank import randomized_factors, truncation_error  # noqa: E402


def load(base: Path, experts: list[Path]):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    names = [f"e{k}" for k in range(len(experts))]
    model = PeftModel.from_pretrained(model, str(experts[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], experts[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    return model, names


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/sens_peft_lora_fact")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lora_factorization.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    shape = ModelShape(hidden=1024, intermediate=2816, layers=args.layers, heads=16, kv_heads=16, vocab=32000)
    base, experts = make_lora_experts(Path(args.workdir), shape, num_experts=3, rank=16)
    model, names = load(base, experts)

    # 1. error of the rank-16 factors of each TIES-merged delta, against the exact truncation
    report = merge_adapters(model, names, method="ties", density=0.5, sens=None, output="full", device="cpu",
                            adapter_name="dense", progress=False)
    ratios = []
    from transformers import LlamaForCausalLM

    base_state = dict(LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32).named_parameters())
    for name, param in report.model.named_parameters():
        if name.endswith("proj.weight") and name in base_state:
            delta = param.detach() - base_state[name].detach()
            exact = truncation_error(delta, *svd_factors(delta, 16))
            ours = truncation_error(delta, *randomized_factors(delta, 16, name=name))
            ratios.append(ours / exact)
    model, names = load(base, experts)

    # 2. merge times, same process, back to back
    def ours(method: str, factorization: str = "randomized"):
        kw = dict(density=0.5) if method != "task_arithmetic" else {}
        return lambda: (merge_adapters(model, names, method=method, sens=None, output="lora", rank=16,
                                       factorization=factorization, adapter_name="m", device="cpu", progress=False,
                                       **kw), model.delete_adapter("m"))

    def peft(combination: str):
        kw = dict(density=0.5, majority_sign_method="total") if combination != "cat" else {}
        return lambda: (model.add_weighted_adapter(names, [1.0] * len(names), "p", combination_type=combination,
                                                   **kw), model.delete_adapter("p"))

    times = {
        "sens-peft TA (exact cat)": timed(ours("task_arithmetic"), args.repeat + 2),
        "PEFT cat": timed(peft("cat"), args.repeat + 2),
        "sens-peft TIES -> r16, randomized": timed(ours("ties"), args.repeat),
        "sens-peft TIES -> r16, exact": timed(ours("ties", "exact"), args.repeat),
        "PEFT ties_svd -> r16": timed(peft("ties_svd"), args.repeat),
    }
    result = {"shape": vars(shape) if hasattr(shape, "__dict__") else str(shape), "threads": 1,
              "error_ratio": {"median": statistics.median(ratios), "max": max(ratios), "modules": len(ratios)},
              "seconds": times}
    for key, value in times.items():
        print(f"{key:36s} {value:7.3f} s")
    print(f"rank-16 error / exact truncation's: median {statistics.median(ratios):.5f}, max {max(ratios):.5f} "
          f"over {len(ratios)} modules")
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
