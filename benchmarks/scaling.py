"""Scaling curves: merge time against the number of experts K and against the model size, full and LoRA.

    python benchmarks/scaling.py                       # writes benchmarks/results/scale_curves.json and .png
    python benchmarks/scaling.py --parts lora_k --repeat 1 --append    # one curve again, merged into the JSON
    python benchmarks/scaling.py --plot-only           # redraw the plot from the JSON

Curves (every point a fresh subprocess, warm page cache, timed inside the child around the merge call; the
speed benchmark's jobs ``speed.job_sens`` / ``job_floor`` / ``job_adapters``):

- ``full_k``: ``merge_models`` TA and TIES (density 0.5) at K = 2, 4, 8, 16 on a 168M-parameter Llama shape
  (hidden 1024, intermediate 2816, 8 layers, vocab 32000: 336 MB per model in bf16), with the I/O floor of the
  same inputs (every tensor read once, the output written, writes on a thread).
- ``full_size``: the same at K = 4 on three shapes: 168M, 542M (the speed benchmark's) and 954M (its 16-layer
  variant). Inputs: ``make_synthetic.make_full_experts(generator="tiled")``; at 168M, K = 4 the merges also run
  on fully drawn inputs (``generator="randn"``), to show that the cheap generator does not change the merge time.
- ``lora_k``: ``merge_adapters`` into a ``PeftModel`` holding K rank-16 adapters on all projections, TA (exact
  concatenation, rank 16·K) and TIES → rank 16 (truncated SVD of each merged ΔW), at K = 2, 4, 8, 16
  (hidden 1024, intermediate 2816, 2 layers).
- ``lora_size``: the same at K = 4 for hidden 512, 1024, 1536 (intermediate 2.75× hidden, 2 layers).

"Linear" means time ∝ bytes read for the full merges ((K + 1) models, or parameters) and ∝ K or the adapted
weights' size for LoRA; the JSON gives each point's time per unit relative to the smallest point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_synthetic as syn  # noqa: E402
import speed  # noqa: E402

KS = (2, 4, 8, 16)
SIZE_K = 4
FULL_K_SHAPE = syn.ModelShape(hidden=1024, intermediate=2816, layers=8, heads=8, kv_heads=8, vocab=32000)
FULL_SIZES = {"168M": FULL_K_SHAPE, "542M": syn.FULL_SHAPE,
              "954M": syn.ModelShape(hidden=2048, intermediate=5632, layers=16, heads=16, kv_heads=16, vocab=32000)}
LORA_K_SHAPE = syn.ModelShape(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=8, vocab=8000)
LORA_SIZES = {f"h{h}": syn.ModelShape(hidden=h, intermediate=h * 11 // 4, layers=2, heads=h // 128,
                                      kv_heads=h // 128, vocab=8000) for h in (512, 1024, 1536)}
FULL_METHODS = ("task_arithmetic", "ties")


def lora_numel(shape: syn.ModelShape) -> int:
    """Elements of the dense ΔW of every adapted module (what TIES → rank merges and factorises)."""
    return sum(math.prod(s) for n, s in shape.tensors() if n.rsplit(".", 2)[-2] in syn.LORA_TARGETS)


class Runner:
    """Runs jobs in children (``speed.run_child``) with the speed benchmark's warm-cache policy; records points."""

    def __init__(self, work: Path, result: dict, out: Path, repeat: int, timeout: float):
        self.work, self.result, self.out, self.repeat, self.timeout = work, result, out, repeat, timeout
        self.me = [sys.executable, str(HERE / "speed.py")]
        self.out_root = work / "out"
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def job(self, key: str, job: str, args: dict, warm: list[Path]) -> dict:
        best: dict = {}
        runs: list = []
        for rep in range(self.repeat):
            if self.out_root.exists():
                shutil.rmtree(self.out_root)
            os.sync()
            speed.warm_cache(warm)
            cmd = [*self.me, "--job", job, "--job-args", json.dumps({**args, "out": str(self.out_root)})]
            payload = speed.run_child(cmd, self.work / "logs" / f"{key.replace(' ', '_')}.{rep}.log", self.timeout)
            runs.append(payload.get("seconds"))
            if not best or (payload.get("seconds") or 1e18) < (best.get("seconds") or 1e18):
                best = payload
        best["runs_s"] = runs
        if self.out_root.exists():
            shutil.rmtree(self.out_root)
        err = best.get("error", "").splitlines()[-1:] if "error" in best else ""
        print(f"  {key:40s} {speed.fmt(best.get('seconds'), '8.2f')} s  rss {speed.fmt(best.get('peak_rss_mb'), '.0f')}"
              f" MB  load {best['load_before']:.1f} {err}", flush=True)
        return best

    def save(self) -> None:
        self.result["load_end"] = os.getloadavg()
        self.out.write_text(json.dumps(self.result, indent=2))


def full_point(run: Runner, curve: str, label: str, root: Path, shape: syn.ModelShape, k: int,
               generator: str = "tiled", methods=FULL_METHODS, floor: bool = True, make_k: int = 0) -> None:
    """One point: ``k`` experts out of a cached set of ``max(k, make_k)`` (the K curve shares one set)."""
    base, experts = speed.in_child(syn.make_full_experts, root, shape, max(k, make_k), "500MB", 0.002, generator)
    experts = experts[:k]
    folders = [base, *experts]
    common = {"base": str(base), "experts": [str(e) for e in experts], "shard_size": "500MB", "device": "cpu"}
    point = {"label": label, "k": k, "params_m": shape.num_params() / 1e6, "generator": generator,
             "input_gb": sum(syn.folder_bytes(f) for f in folders) / 1e9, "jobs": {}}
    if floor:
        point["jobs"]["floor"] = run.job(f"{curve} {label} floor", "floor", {**common, "mode": "overlap"}, folders)
    for method in methods:
        short = speed.SHORT[method]
        point["jobs"][short] = run.job(f"{curve} {label} {short}", "sens", {**common, "method": method,
                                                                             "sens": False}, folders)
    run.result.setdefault("curves", {}).setdefault(curve, []).append(point)
    run.save()


def lora_point(run: Runner, curve: str, label: str, root: Path, shape: syn.ModelShape, k: int) -> None:
    base, experts = speed.in_child(syn.make_lora_experts, root, shape, k)
    common = {"base": str(base), "experts": [str(e) for e in experts], "impl": "sens"}
    point = {"label": label, "k": k, "hidden": shape.hidden, "lora_numel_m": lora_numel(shape) / 1e6, "jobs": {}}
    for method, short in (("task_arithmetic", "TA"), ("ties", "TIES")):
        point["jobs"][short] = run.job(f"{curve} {label} {short}", "adapters", {**common, "method": method}, [])
    run.result.setdefault("curves", {}).setdefault(curve, []).append(point)
    run.save()


def generator_check(run: Runner, work: Path, rounds: int, single_scales: tuple[float, ...] = (1.0,)) -> None:
    """TA and TIES at 168M, K = 4 on tiled and on fully drawn inputs, alternated over ``rounds`` (the machine's
    speed drifts: only ratios within a round count): does the cheap generator change the merge time?"""
    # "tiled": the scale test's generator (delta scales 0.5 / 1 / 2 hashed per expert and tensor); "tiled s=1":
    # the same with every scale 1, as in "randn" (full draws): separates the tiling from the scale mix.
    variants = {"tiled": ("tiled", syn.TILE_DELTA_SCALES),
                **{f"tiled s={x:g}": ("tiled", (x,)) for x in single_scales}, "randn": ("randn", ())}
    roots = {v: work / f"gen_{v.replace(' ', '_').replace('=', '')}" for v in variants}
    sets = {v: speed.in_child(syn.make_full_experts, roots[v], FULL_K_SHAPE, SIZE_K, "500MB", 0.002, g,
                              scales or syn.TILE_DELTA_SCALES) for v, (g, scales) in variants.items()}
    rows = []
    for rep in range(rounds):
        row: dict = {}
        for g, (base, experts) in sets.items():
            common = {"base": str(base), "experts": [str(e) for e in experts], "shard_size": "500MB",
                      "device": "cpu"}
            for method in FULL_METHODS:
                job = run.job(f"generator {g} {speed.SHORT[method]} r{rep}", "sens",
                              {**common, "method": method, "sens": False}, [base, *experts])
                row[f"{g} {speed.SHORT[method]}"] = {k: job.get(k) for k in ("seconds", "cpu_user_s", "load_before")}
        rows.append(row)
    summary = {}
    for method in FULL_METHODS:
        m = speed.SHORT[method]
        summary[m] = {}
        for v in [v for v in variants if v != "randn"]:
            ratios = [r[f"{v} {m}"]["seconds"] / r[f"randn {m}"]["seconds"] for r in rows
                      if r[f"randn {m}"]["seconds"] and r[f"{v} {m}"]["seconds"]]
            summary[m][f"{v} / randn"] = {"per_round": ratios,
                                          "median": sorted(ratios)[len(ratios) // 2] if ratios else None}
    run.result["generator_check"] = {"rounds": rows, "summary": summary}
    run.save()
    print("  generator check, time on tiled / on randn inputs:", json.dumps(summary), flush=True)
    for r in roots.values():
        shutil.rmtree(r, ignore_errors=True)


def relative_cost(points: list[dict], unit) -> dict:
    """Per job: seconds / unit(point), relative to the first point (1.0 everywhere = linear)."""
    out: dict = {}
    for job in points[0]["jobs"]:
        vals = [(p["label"], p["jobs"].get(job, {}).get("seconds"), unit(p)) for p in points]
        first = next((s / u for _, s, u in vals if s), None)
        out[job] = {label: (s / u / first if s and first else None) for label, s, u in vals}
    return out


UNITS = {
    "full_k": lambda p: p["input_gb"], "full_size": lambda p: p["input_gb"],
    "lora_k": lambda p: p["k"], "lora_size": lambda p: p["lora_numel_m"],
}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result.get("curves", {})
    titles = {"full_k": "full (merge_models), 168M shape: time vs K", "full_size": f"full, K={SIZE_K}: time vs size",
              "lora_k": "LoRA (merge_adapters), hidden 1024: time vs K",
              "lora_size": f"LoRA, K={SIZE_K}: time vs hidden size"}
    xs = {"full_k": lambda p: p["k"], "full_size": lambda p: p["params_m"], "lora_k": lambda p: p["k"],
          "lora_size": lambda p: p["lora_numel_m"]}
    xlabels = {"full_k": "experts K", "full_size": "parameters (M)", "lora_k": "adapters K",
               "lora_size": "adapted ΔW elements (M)"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for ax, curve in zip(axes.flat, ("full_k", "full_size", "lora_k", "lora_size")):
        points = [p for p in curves.get(curve, []) if p.get("generator", "tiled") == "tiled"]
        ax.set_title(titles[curve], fontsize=10)
        if not points:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            continue
        x = [xs[curve](p) for p in points]
        for job in points[0]["jobs"]:
            y = [p["jobs"].get(job, {}).get("seconds") for p in points]
            line = ax.plot(x, y, "o-", label=job)[0]
            if y[0]:  # what linear scaling in the curve's unit would give, from the first point
                u0 = UNITS[curve](points[0])
                ax.plot(x, [y[0] * UNITS[curve](p) / u0 for p in points], ":", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{v:g}" if curve.endswith("_k") else f"{v:.0f}" if v >= 10 else f"{v:.2g}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel(xlabels[curve])
        ax.set_ylabel("seconds (min of repeats)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("sens-peft merge time scaling (dotted: linear in bytes read / K / ΔW size from the first point)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def use_small_shapes() -> None:
    """Tiny shapes and K ≤ 4 (a functional smoke run of every curve in seconds)."""
    global KS, FULL_K_SHAPE, FULL_SIZES, LORA_K_SHAPE, LORA_SIZES
    KS = (2, 4)
    FULL_K_SHAPE = syn.SMALL_SHAPE
    FULL_SIZES = {"small": syn.SMALL_SHAPE,
                  "small2x": syn.ModelShape(hidden=256, intermediate=704, layers=8, heads=4, kv_heads=4, vocab=16000)}
    LORA_K_SHAPE = syn.LORA_SMALL_SHAPE
    LORA_SIZES = {"h128": syn.LORA_SMALL_SHAPE,
                  "h256": syn.ModelShape(hidden=256, intermediate=704, layers=2, heads=2, kv_heads=2, vocab=1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sens_peft_scaling")
    parser.add_argument("--parts", default="full_k,full_size,lora_k,lora_size",
                        help="curves to run, plus 'generator' (tiled vs randn inputs, alternated)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per point (min is reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--append", action="store_true", help="keep the curves in --out that this run skips")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic inputs")
    parser.add_argument("--gen-scales", default="1", help="generator check: the single delta scales whose tiled "
                        "inputs are compared too (besides the default mix and full draws)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--small", action="store_true", help="smoke run: tiny shapes, K up to 4")
    parser.add_argument("--out", default=str(HERE / "results" / "scale_curves.json"))
    args = parser.parse_args()
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return
    speed.THREADS = args.threads
    if args.small:
        use_small_shapes()
    parts = [p for p in args.parts.split(",") if p]
    work = Path(args.workdir)
    result: dict = {"machine": speed.machine_info(), "sens_peft_commit": speed._git_head(), "threads": args.threads,
                    "repeat": args.repeat, "load_start": os.getloadavg(), "curves": {}}
    if args.append and out.exists():
        old = json.loads(out.read_text())
        result["curves"] = {k: v for k, v in old.get("curves", {}).items() if k not in parts}
        if "generator_check" in old and "generator" not in parts:
            result["generator_check"] = old["generator_check"]
        result["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("load_start", "load_end", "sens_peft_commit")}]
    run = Runner(work, result, out, args.repeat, args.timeout)
    t0 = time.perf_counter()
    try:
        speed.prime_writes(work / "prime", 2 * 10**9)
        k_root = work / "full_168M_k16"
        if "full_k" in parts:
            for k in KS:
                full_point(run, "full_k", f"K={k}", k_root, FULL_K_SHAPE, k, make_k=max(KS))
        if "full_size" in parts:
            for label, shape in FULL_SIZES.items():
                root = k_root if shape == FULL_K_SHAPE else work / f"full_{label}"
                full_point(run, "full_size", label, root, shape, SIZE_K,
                           make_k=max(KS) if root == k_root else 0)
                if root != k_root and not args.keep:
                    shutil.rmtree(root)
            # the same point on fully drawn inputs: does the tiled generator change the merge time?
            full_point(run, "full_size", next(iter(FULL_SIZES)) + " randn", work / "full_168M_randn",
                       FULL_K_SHAPE, SIZE_K, generator="randn", floor=False)
        for path in (k_root, work / "full_168M_randn"):
            if path.exists() and not args.keep:
                shutil.rmtree(path)
        if "generator" in parts:
            generator_check(run, work, rounds=3, single_scales=tuple(float(x) for x in args.gen_scales.split(",")))
        if "lora_k" in parts:
            for k in KS:
                lora_point(run, "lora_k", f"K={k}", work / f"lora_k{k}", LORA_K_SHAPE, k)
        if "lora_size" in parts:
            for label, shape in LORA_SIZES.items():
                lora_point(run, "lora_size", label, work / f"lora_{label}", shape, SIZE_K)
    finally:
        if not args.keep and work.exists():
            shutil.rmtree(work)
    result["relative_cost"] = {c: relative_cost([p for p in pts if p.get("generator", "tiled") == "tiled"],
                                                UNITS[c]) for c, pts in result["curves"].items()}
    result["total_s"] = time.perf_counter() - t0
    run.save()
    if result["curves"]:
        plot(result, out.with_suffix(".png"))
    print(json.dumps(result["relative_cost"], indent=1))


if __name__ == "__main__":
    main()
