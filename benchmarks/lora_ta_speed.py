"""Task arithmetic into a LoRA adapter (exact concatenation) against PEFT ``add_weighted_adapter(cat)``, and
against a previous checkout of sens-peft, on the same inputs, in one run with interleaved repeats.

    git archive <old commit> | tar -x -C /tmp/sens_peft_old      # the previous code path, once
    OMP_NUM_THREADS=1 python benchmarks/lora_ta_speed.py --baseline-src /tmp/sens_peft_old --rounds 6

Inputs: the LoRA part of ``benchmarks/speed.py`` (hidden 1024, intermediate 2816, vocab 32000, ``--layers``
layers, 3 rank-16 adapters on q,k,v,o,gate,up,down, loaded into one PeftModel). Each round starts one child
process per code path (current tree, then ``--baseline-src``; the order alternates between rounds); a child loads
the model, warms up, then times ``--inner`` pairs of (sens-peft TA, PEFT cat) back to back and reports the
minimum of each and the median of the per-pair ratios. Since the machine is shared, the ratio to PEFT measured
inside the same child is the number to compare. The first child of each code path also writes the merged
adapter's factors, which the parent compares bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from lora_factorization import load

    from sens_peft import merge_adapters

    torch.set_num_threads(args.threads)
    model, names = load(Path(args.base), [Path(e) for e in args.experts])

    def ours() -> None:
        merge_adapters(model, names, method="task_arithmetic", sens=None, output="lora", adapter_name="m",
                       device="cpu", progress=False)

    def peft() -> None:
        model.add_weighted_adapter(names, [1.0] * len(names), "p", combination_type="cat")
        model.delete_adapter("p")

    ours()
    if args.dump:  # the merged factors, for the bit-for-bit comparison in the parent
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items() if ".m." in k}, args.dump)
    model.delete_adapter("m")
    peft()
    t_ours, t_peft, ratios = [], [], []
    for _ in range(args.inner):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        model.delete_adapter("m")
        t2 = time.perf_counter()
        peft()
        t3 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_peft.append(t3 - t2)
        ratios.append((t1 - t0) / (t3 - t2))
    print("RESULT " + json.dumps({"ours": min(t_ours), "peft": min(t_peft), "ratio": statistics.median(ratios),
                                  "sens_peft": __import__("sens_peft").__file__}))


def run_child(src: Path, args: argparse.Namespace, base: Path, experts: list[Path], dump: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", "--base", str(base), "--experts", *map(str, experts),
           "--inner", str(args.inner), "--threads", str(args.threads), "--dump", dump]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def same_factors(a: str, b: str) -> bool:
    import torch

    x, y = torch.load(a), torch.load(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/sens_peft_lora_fact")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline-src", help="a checkout of the previous code (its folder holding sens_peft/)")
    p.add_argument("--out", default=str(HERE / "results" / "lora_ta_speed.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--experts", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--dump", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(HERE))
    from make_synthetic import ModelShape, make_lora_experts

    shape = ModelShape(hidden=1024, intermediate=2816, layers=args.layers, heads=16, kv_heads=16, vocab=32000)
    base, experts = make_lora_experts(Path(args.workdir), shape, num_experts=3, rank=16)
    paths = {"current": ROOT}
    if args.baseline_src:
        paths["baseline"] = Path(args.baseline_src).resolve()
    rows: dict[str, list[dict]] = {k: [] for k in paths}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        dumps = {k: f"{tmp}/{k}.pt" for k in paths}
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            for key in order:
                rows[key].append(run_child(paths[key], args, base, experts, dumps[key] if r < 2 else ""))
                print(key, rows[key][-1], flush=True)
            loads.append(os.getloadavg()[0])
        identical = same_factors(dumps["current"], dumps["baseline"]) if "baseline" in paths else None
    summary = {key: {"ours_min_s": min(x["ours"] for x in v), "peft_cat_min_s": min(x["peft"] for x in v),
                     "ratio_to_peft_median": statistics.median(x["ratio"] for x in v),
                     "ratio_to_peft_range": [min(x["ratio"] for x in v), max(x["ratio"] for x in v)]}
               for key, v in rows.items()}
    result = {"shape": shape.__dict__, "threads": args.threads, "rounds": args.rounds, "inner": args.inner,
              "load_1min": loads, "cpus": os.cpu_count(), "bit_identical_to_baseline": identical,
              "summary": summary, "rounds_raw": rows}
    for key, s in summary.items():
        print(f"{key:9s} TA {s['ours_min_s']:.3f} s, PEFT cat {s['peft_cat_min_s']:.3f} s, "
              f"median ratio {s['ratio_to_peft_median']:.2f} ({s['ratio_to_peft_range'][0]:.2f}-"
              f"{s['ratio_to_peft_range'][1]:.2f})")
    print("merged factors bit-identical to the baseline:", identical, "| 1-min load:", loads)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
