"""RegMean merge time against task arithmetic on the same inputs (issue 18, item 3), in one process, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/data_aware_cost.py --part full --layers 1      # 542M shape, cut to 1 layer
    OMP_NUM_THREADS=1 python benchmarks/data_aware_cost.py --part quickstart           # the quick start's shape
    OMP_NUM_THREADS=1 python benchmarks/data_aware_cost.py --part solve                # per-Linear solve, 542M shapes

``full``: the 542M-parameter speed shape (hidden 2048, intermediate 5632, vocab 32000, bf16; ``--layers`` of its 8
layers, since RegMean's per-layer cost is what scales) with 3 full experts (``benchmarks/make_synthetic.py``), each
with a sidecar holding a full fp32 input Gram for every Linear (q/k/v and gate/up sharing one, as the callback
stores them), written with the library's ``save_sensitivity``. ``merge_models`` with ``method="regmean"`` and
``"task_arithmetic"`` (``sens=None``, bf16 output) alternate ``--repeats`` times; the per-layer RegMean time
extrapolates the 8-layer model (TA's whole-model time is in the Speed section). ``quickstart``: the quick start's
toy shape (hidden 128, intermediate 256, 8 layers) as 3 LoRA adapters of rank 8 on all projections
(``merge_adapters``, exact factors) and as 3 full fine-tunes (``merge_models``), both with Gram sidecars.
``solve``: the RegMean math of one Linear of each 542M shape (3 experts, ``merge_deltas``), to see where the time
goes. The Grams are synthetic, well-conditioned ``U Uᵀ + diag(d)`` (rank-32 ``U``), so no ridge retry runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_synthetic import ModelShape, make_full_experts, make_lora_experts  # noqa: E402

from sens_peft import merge_adapters, merge_models  # noqa: E402
from sens_peft.store import load_sensitivity, save_sensitivity  # noqa: E402

SHAPE_542M = ModelShape(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=16, vocab=32000)
QUICKSTART = ModelShape(hidden=128, intermediate=256, layers=8, heads=4, kv_heads=4, vocab=1000)
TOKENS = 4096
# the Linear whose stored Gram the others alias (same input tensor), as the callback stores them
OWNER = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def synthetic_gram(n: int, seed: int) -> torch.Tensor:
    """A well-conditioned Gram *sum* over ``TOKENS`` tokens: ``TOKENS * (U Uᵀ / 32 + diag(d))``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 32, generator=gen)
    gram = u @ u.T / 32.0
    gram.diagonal().add_(0.05 + torch.rand(n, generator=gen))
    return gram * TOKENS


def add_grams(sidecar: Path, out: Path, shapes: dict[str, tuple[int, ...]], expert: int, fisher: bool = False,
              lora_only: bool = False) -> Path:
    """Expert ``expert``'s sidecar plus a full Gram for every Linear weight in ``shapes`` (aliases shared), and
    with ``fisher`` a positive Fisher map for every tensor (``lora_only``: for the adapted projections only)."""
    record = load_sensitivity(sidecar)
    grams, aliases, fishers = {}, {}, {}
    for name, shape in shapes.items():
        linear = len(shape) == 2 and "embed" not in name and "lm_head" not in name
        if fisher and (linear or not lora_only):
            gen = torch.Generator().manual_seed(hash(("fisher", expert, name)) & 0xFFFFFFFF)
            fishers[name] = torch.rand(shape, generator=gen) + 0.01
        if not linear:
            continue
        proj = name.rsplit(".", 2)[-2]
        if proj in OWNER:
            aliases[name] = name.replace(proj, OWNER[proj])
        else:
            grams[name] = synthetic_gram(shape[1], hash((expert, name)) & 0xFFFFFFFF)
    record = dataclasses.replace(record, grams=grams, gram_aliases=aliases,
                                 gram_tokens={n: TOKENS for n in grams}, element_maps={}, fisher=fishers)
    if fisher:
        record.metadata = {**record.metadata, "fisher_samples": "32"}
    out.mkdir(parents=True, exist_ok=True)
    return save_sensitivity(record, out)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(jobs: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(repeats):
        for key in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
            times[key].append(timed(jobs[key]))
            print(f"  {key}: {times[key][-1]:.2f} s", flush=True)
    return times


def part_full(args, shape: ModelShape, label: str) -> dict:
    root = Path(args.workdir) / f"full_h{shape.hidden}_i{shape.intermediate}_L{shape.layers}"
    base, experts = make_full_experts(root, shape, num_experts=3)
    shapes = dict(shape.tensors())
    sidecars = [add_grams(e / "sensitivity.safetensors", root / ("grams_fisher" if args.fisher else "grams") / e.name,
                          shapes, k + 1, fisher=args.fisher) for k, e in enumerate(experts)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        def run(method: str):
            return lambda: merge_models(base, experts, Path(tmp) / method, method=method, sens=None,
                                        sensitivities=sidecars, device=args.device, dtype="bfloat16",
                                        overwrite=True, progress=False, max_shard_size="500MB")
        times = interleaved({m: run(m) for m in methods(args)}, args.repeats)
    return summarize(label, shape, times)


def methods(args) -> list[str]:
    return ["task_arithmetic", "regmean"] + (["fisher"] if args.fisher else [])


def part_quickstart_lora(args) -> dict:
    shape = QUICKSTART
    root = Path(args.workdir) / "quickstart_lora"
    base, experts = make_lora_experts(root, shape, num_experts=3, rank=8, alpha=16)
    shapes = dict(shape.tensors())
    sidecars = [add_grams(e / "sensitivity.safetensors", root / ("grams_fisher" if args.fisher else "grams") / e.name,
                          shapes, k + 1, fisher=args.fisher, lora_only=True) for k, e in enumerate(experts)]
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)).to(args.device), str(experts[0]),
                                      adapter_name="e0")
    for k, e in enumerate(experts[1:], start=1):
        model.load_adapter(str(e), adapter_name=f"e{k}")

    def run(method: str):
        def go():
            kw = {"output": "lora", "rank": 8} if method == "fisher" else {}  # Fisher: dense ΔW, randomized rank 8
            merge_adapters(model, ["e0", "e1", "e2"], method=method, sens=None, sensitivities=sidecars,
                           adapter_name="m", device=args.device, progress=False, **kw)
            model.delete_adapter("m")
        return go
    times = interleaved({m: run(m) for m in methods(args)}, args.repeats * 3)
    return summarize("quick-start shape, 3 LoRA r8 adapters (merge_adapters)", shape, times)


def part_solve(args) -> dict:
    """The RegMean math of one Linear per 542M shape, 3 experts, as merge_models' dense path calls it."""
    from sens_peft.methods import merge_deltas

    h, i = SHAPE_542M.hidden, SHAPE_542M.intermediate
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    out = {}
    for label, (rows, cols) in {"q/k/v/o [2048, 2048]": (h, h), "gate/up [5632, 2048]": (i, h),
                                "down [2048, 5632]": (h, i)}.items():
        gen = torch.Generator().manual_seed(0)
        deltas = [0.002 * torch.randn(rows, cols, generator=gen).to(args.device) for _ in range(3)]
        grams = [(synthetic_gram(cols, k) / TOKENS).to(args.device) for k in range(3)]
        coeffs = torch.ones(3)
        times = interleaved({
            "task_arithmetic": lambda d=deltas, c=coeffs: (merge_deltas("task_arithmetic", d, c), sync()),
            "regmean": lambda d=deltas, c=coeffs, g=grams: (merge_deltas("regmean", d, c, statistics={"gram": g}),
                                                            sync()),
        }, args.repeats)
        out[label] = {k: min(v) for k, v in times.items()}
        print(label, out[label], flush=True)
    return {"label": f"RegMean math per Linear (merge_deltas, 3 experts, fp64 solve, {args.device})",
            "seconds_min": out}


def summarize(label: str, shape: ModelShape, times: dict[str, list[float]]) -> dict:
    ta, rm = min(times["task_arithmetic"]), min(times["regmean"])
    ratios = [r / t for r, t in zip(times["regmean"], times["task_arithmetic"])]
    print(f"{label}: TA {ta:.2f} s, RegMean {rm:.2f} s, RegMean/TA {rm / ta:.1f}x (pairs: "
          f"{', '.join(f'{x:.1f}' for x in ratios)})", flush=True)
    return {"label": label, "shape": dataclasses.asdict(shape), "params": shape.num_params(), "seconds": times,
            "ta_min_s": ta, "regmean_min_s": rm, "ratio_of_mins": rm / ta, "ratio_median": statistics.median(ratios)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="solve,quickstart,full")
    p.add_argument("--layers", type=int, default=1, help="layers of the 542M shape for --part full")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/sens_peft_data_aware")
    p.add_argument("--device", default="cpu", help="merge device (cuda on a GPU machine)")
    p.add_argument("--fisher", action="store_true", help="also store Fisher maps and time method='fisher'")
    p.add_argument("--out", default=str(HERE / "results" / "data_aware_cost.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "cpus": os.cpu_count(), "device": args.device, "load_1min_start": os.getloadavg()[0], "parts": {}}
    parts = args.part.split(",")
    if "solve" in parts:
        result["parts"]["solve"] = part_solve(args)
    if "quickstart" in parts:
        result["parts"]["quickstart_lora"] = part_quickstart_lora(args)
        result["parts"]["quickstart_full"] = part_full(args, QUICKSTART, "quick-start shape, 3 full experts "
                                                       "(merge_models)")
    if "full" in parts:
        shape = dataclasses.replace(SHAPE_542M, layers=args.layers)
        result["parts"]["full"] = part_full(args, shape, f"542M shape cut to {args.layers} layer(s), 3 full experts "
                                            "(merge_models)")
    result["load_1min_end"] = os.getloadavg()[0]
    print("1-min load:", result["load_1min_start"], "->", result["load_1min_end"], "threads", args.threads)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
