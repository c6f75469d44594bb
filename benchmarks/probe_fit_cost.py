"""Wall time of a probe-fitted merge (``method="probe_fit"``) on the quick start's model shape.

K LoRA experts (rank 8 on every Linear, as the toy experts) on the toy base shape (``ToySettings()``: 8 layers,
hidden 128; random weights: the cost does not depend on them) with probe sets of the callback's default size
(16 rows of 24 tokens, the last 8 scored), merged into a LoRA adapter by ``merge_adapters``: task arithmetic alone,
then ``probe_fit`` (30 Adam steps, no early stop, so every step is timed). The fit's share is the difference.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probe_fit_cost.py            # K = 3 and 8, 1 thread
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python benchmarks/probe_fit_cost.py --threads 2 --experts 3 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from sens_peft import merge_adapters
from sens_peft.store import ProbeSet
from sens_peft.testing import toy

ROWS, TOKENS, SCORED = 16, 24, 8


def experts_model(num: int, seed: int = 0):
    """The toy base shape with ``num`` random LoRA adapters (``e0``, ``e1``...) loaded."""
    from peft import get_peft_model

    tokenizer = toy.build_tokenizer()
    model = toy.build_model(toy.ToySettings(), tokenizer, seed=seed).eval()
    peft = None
    gen = torch.Generator().manual_seed(seed)
    for k in range(num):
        cfg = toy.lora_config(r=8, alpha=16)
        cfg.init_lora_weights = False
        if peft is None:
            peft = get_peft_model(model, cfg, adapter_name=f"e{k}")
        else:
            peft.add_adapter(f"e{k}", cfg)
        for name, param in peft.named_parameters():
            if f".e{k}." in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.05
    return peft, len(tokenizer)


def probes(num: int, vocab: int, seed: int = 0) -> list[ProbeSet]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, vocab, (ROWS, TOKENS), generator=gen)
        labels = ids.clone()
        labels[:, : TOKENS - SCORED] = -100
        out.append(ProbeSet(ids, torch.ones_like(ids), labels))
    return out


def timed(num: int, steps: int) -> dict[str, float]:
    peft, vocab = experts_model(num)
    names = [f"e{k}" for k in range(num)]
    start, cpu = time.perf_counter(), time.process_time()
    merge_adapters(peft, names, method="task_arithmetic", scale=0.5, adapter_name="ta", device="cpu",
                   progress=False)
    ta, ta_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    report = merge_adapters(peft, names, method="probe_fit", scale=0.5, adapter_name="fit", device="cpu",
                            progress=False, probes=probes(num, vocab),
                            params={"steps": steps, "patience": 0})
    fit, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    # CPU time as well: on a shared machine the wall time depends on the load
    return {"experts": num, "task_arithmetic_s": round(ta, 2), "probe_fit_s": round(fit, 2),
            "task_arithmetic_cpu_s": round(ta_cpu, 2), "probe_fit_cpu_s": round(fit_cpu, 2),
            "groups": len(report.coefficients.groups), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = [timed(num, args.steps) for num in args.experts]
    print(json.dumps({"threads": args.threads, "load_average": os.getloadavg(), "probe": f"{ROWS} rows x {TOKENS} tokens ({SCORED} scored) per expert",
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
