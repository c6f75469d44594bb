"""Cost of the data-aware merge statistics (Gram matrices, Fisher maps) in the calibration pass.

1. Time of the "after" calibration pass on the toy model (sens_peft/testing/toy.py, random init, LoRA r=8 on all
   seven projections, and a full fine-tune) without and with Gram (full) + Fisher capture, interleaved ABAB in one
   process at one thread count; the median per-pair ratio is printed, plus the sidecar sizes written.
2. Sidecar bytes per model shape from the formula (toy, 0.5B/1B-class, 7B: hidden 4096, intermediate 11008, 32
   layers),
   for LoRA on all seven projections and on q/v only: full vs diagonal Grams, with and without sharing of the
   q/k/v and gate/up inputs, fp32 vs bf16 storage, and the Fisher maps.
3. A float64 check of what bf16 storage of the Grams does to the RegMean solve (synthetic anisotropic activations),
   and on the pre-trained toy base's own activations what bf16, low-rank sketches and diagonals lose against full
   fp32 Grams on RegMean's objective (needs the cached toy base).

    OMP_NUM_THREADS=1 python benchmarks/stats_cost.py [--samples 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

from sens_peft.config import SensitivityConfig
from sens_peft.regmean import regmean_merge
from sens_peft.sensitivity.calibrate import run_calibration
from sens_peft.store import save_sensitivity
from sens_peft.testing import toy

SHAPES = {  # name: (hidden, intermediate, layers)
    "toy (h128 i256 L8)": (128, 256, 8),
    "0.5B-class (h896 i4864 L24)": (896, 4864, 24),
    "1B-class (h2048 i8192 L16)": (2048, 8192, 16),
    "7B (h4096 i11008 L32)": (4096, 11008, 32),
}
LOWRANK_K = 256  # SensitivityConfig.gram_rank default


def _fan_in(proj: str, hidden: int, inter: int) -> int:
    return inter if proj == "down_proj" else hidden


def _shared_inputs(targets: tuple[str, ...]) -> list[str]:
    """One representative per distinct input: q/k/v read one tensor, gate/up another."""
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    return [next(p for p in g if p in targets) for g in groups if any(p in targets for p in g)]


def formula_bytes(hidden: int, inter: int, layers: int, targets: tuple[str, ...], *, mode: str, shared: bool,
                  bytes_per: int) -> int:
    owners = _shared_inputs(targets) if shared else list(targets)
    widths = [_fan_in(p, hidden, inter) for p in owners]
    if mode == "lowrank":  # exact diagonal + [in, k] factor; inputs no wider than k stay full
        per_layer = sum(w * w if w <= LOWRANK_K else w * (LOWRANK_K + 1) for w in widths)
    else:
        per_layer = sum(w ** (2 if mode == "full" else 1) for w in widths)
    return per_layer * layers * bytes_per


def auto_bytes(hidden: int, inter: int, layers: int, targets: tuple[str, ...], budget: int = 2**30) -> int:
    """fp32 bytes that gram="auto" stores with the default budget and rank (CalibrationStats._auto_lowrank):
    whole width classes full, narrowest first; the rest sketched at rank LOWRANK_K if that fits, else diagonal."""
    from sens_peft.sensitivity.stats import full_gram_widths, gram_bytes

    widths = [_fan_in(p, hidden, inter) for p in _shared_inputs(targets)] * layers
    full = full_gram_widths("auto", widths, budget)
    used = gram_bytes([w for w in widths if w in full], "full")
    rest = [w for w in widths if w not in full]
    sketched = sum(w * (LOWRANK_K + 1) * 4 if w > LOWRANK_K else w * 4 for w in rest)
    return used + (sketched if used + sketched <= budget else gram_bytes(rest, "diag"))


def fisher_bytes(hidden: int, inter: int, layers: int, targets: tuple[str, ...], kv_ratio: float = 1.0) -> int:
    """fp32 Fisher maps of the adapted weights (MHA shapes: k/v as wide as q unless kv_ratio < 1)."""
    size = {"q_proj": hidden * hidden, "k_proj": int(hidden * hidden * kv_ratio),
            "v_proj": int(hidden * hidden * kv_ratio), "o_proj": hidden * hidden, "gate_proj": hidden * inter,
            "up_proj": hidden * inter, "down_proj": inter * hidden}
    return sum(size[p] for p in targets) * layers * 4


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**28 else f"{n / 2**20:8.2f} MiB"


def print_formula() -> None:
    print("\n== sidecar bytes from the formula (Grams are sums over tokens: size does not depend on data) ==")
    for tname, targets in (("LoRA all 7 projections", toy.LORA_TARGETS), ("LoRA q,v", ("q_proj", "v_proj"))):
        targets = tuple(targets)
        print(f"-- {tname}")
        print(f"{'shape':28s} {'full fp32':>12s} {'full bf16':>12s} {'full fp32 unshared':>19s} "
              f"{'diag fp32':>12s} {'auto fp32':>12s} {'lowrank256':>12s} {'Fisher fp32':>12s}")
        for name, (h, i, n) in SHAPES.items():
            cells = [formula_bytes(h, i, n, targets, mode="full", shared=True, bytes_per=4),
                     formula_bytes(h, i, n, targets, mode="full", shared=True, bytes_per=2),
                     formula_bytes(h, i, n, targets, mode="full", shared=False, bytes_per=4),
                     formula_bytes(h, i, n, targets, mode="diag", shared=True, bytes_per=4),
                     auto_bytes(h, i, n, targets),
                     formula_bytes(h, i, n, targets, mode="lowrank", shared=True, bytes_per=4),
                     fisher_bytes(h, i, n, targets)]
            print(f"{name:28s} " + " ".join(f"{_gib(c):>12s}" for c in cells[:2]) + f" {_gib(cells[2]):>19s} "
                  + " ".join(f"{_gib(c):>12s}" for c in cells[3:]))


def _time(model, data, cfg) -> tuple[float, float, object]:
    """Wall and process CPU seconds of one pass (CPU time is what to compare on a shared machine: with one
    thread it excludes the time other processes hold the core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    record = run_calibration(model, data, cfg)
    return time.perf_counter() - wall, time.process_time() - cpu, record


def _file_size(record) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return os.path.getsize(save_sensitivity(record, tmp))


def measure_pass(samples: int, repeats: int) -> None:
    from peft import get_peft_model

    tok = toy.build_tokenizer()
    data = toy.task_dataset("inc", tokenizer=tok, n=max(samples, 8))
    experts = {
        "LoRA r=8 all projections": get_peft_model(toy.build_model(tokenizer=tok, seed=0), toy.lora_config()),
        "full fine-tune": toy.build_model(tokenizer=tok, seed=0),
    }
    configs = {
        "plain": SensitivityConfig(calibration_samples=samples, gram="none", fisher=False),
        "Gram+Fisher": SensitivityConfig(calibration_samples=samples, gram="full", fisher=True),
        "Gram only": SensitivityConfig(calibration_samples=samples, gram="full", fisher=False),
        "Fisher only": SensitivityConfig(calibration_samples=samples, gram="none", fisher=True),
    }
    print(f"\n== calibration pass, {samples} samples, batch 1, {torch.get_num_threads()} thread(s), "
          f"{repeats} rounds of the 4 settings back to back ==")
    for name, model in experts.items():
        _time(model, data, configs["Gram+Fisher"])  # warm-up
        cpu: dict[str, list[float]] = {k: [] for k in configs}
        ratios: dict[str, list[float]] = {k: [] for k in configs}
        wall_ratios = []
        for _ in range(repeats):
            runs = {k: _time(model, data, cfg) for k, cfg in configs.items()}
            for k, (_wall, t, _) in runs.items():
                cpu[k].append(t)
                ratios[k].append(t / runs["plain"][1])
            wall_ratios.append(runs["Gram+Fisher"][0] / runs["plain"][0])
        rec0, rec1 = runs["plain"][2], runs["Gram+Fisher"][2]
        plain, with_stats = cpu["plain"], cpu["Gram+Fisher"]
        bf16 = dataclasses.replace(configs["Gram+Fisher"], gram_dtype="bfloat16")
        rec_bf16 = run_calibration(model, data, bf16)
        gram_bytes = sum(g.numel() * 4 for g in rec1.grams.values())
        fisher_b = sum(f.numel() * 4 for f in rec1.fisher.values())
        print(f"{name}: CPU time without {statistics.median(plain):.3f}s, with Gram+Fisher "
              f"{statistics.median(with_stats):.3f}s, median ratio {statistics.median(ratios['Gram+Fisher']):.3f} "
              f"(rounds: {', '.join(f'{r:.3f}' for r in ratios['Gram+Fisher'])}; wall-clock median ratio "
              f"{statistics.median(wall_ratios):.3f}); Gram only {statistics.median(ratios['Gram only']):.3f}, "
              f"Fisher only {statistics.median(ratios['Fisher only']):.3f}")
        print(f"  sidecar: {_file_size(rec0) / 2**20:.2f} MiB without, {_file_size(rec1) / 2**20:.2f} MiB with "
              f"(fp32 Grams), {_file_size(rec_bf16) / 2**20:.2f} MiB with bf16 Grams; Grams {gram_bytes / 2**20:.2f} "
              f"MiB in {len(rec1.grams)} tensors for {len(rec1.grams) + len(rec1.gram_aliases)} modules, "
              f"Fisher {fisher_b / 2**20:.2f} MiB")


def bf16_check(seed: int = 0) -> None:
    """Fraction of RegMean's objective gain over the plain average lost when the Grams are rounded for storage."""
    print("\n== bf16 Gram storage vs the float64 solve (synthetic activations, 4 experts, 16 outputs) ==")
    print(f"{'in':>4s} {'tokens':>6s} {'spread':>6s} {'alpha':>5s} {'fp32 lost':>10s} {'bf16 lost':>10s} "
          f"{'bf16 |dW| rel':>13s}")
    torch.manual_seed(seed)
    for fan_in, tokens, spread in ((64, 2000, 1), (64, 2000, 2), (256, 4000, 2), (256, 200, 1)):
        scales = torch.logspace(-spread, spread, fan_in, dtype=torch.float64)
        mix = torch.linalg.qr(torch.randn(fan_in, fan_in, dtype=torch.float64))[0]
        xs = [(torch.randn(tokens, fan_in, dtype=torch.float64) + torch.randn(fan_in, dtype=torch.float64))
              * scales @ mix for _ in range(4)]
        ds = [0.01 * torch.randn(16, fan_in, dtype=torch.float64) for _ in range(4)]
        grams = [x.T @ x for x in xs]

        def loss(w: torch.Tensor, xs=xs, ds=ds) -> float:
            return float(sum(((x @ (w - d).T) ** 2).sum() for x, d in zip(xs, ds)))

        for alpha in (1.0, 0.9):
            ref = regmean_merge(ds, grams, alpha)
            gap = loss(torch.stack(ds).mean(0)) - loss(ref)
            lost = {}
            for dt in (torch.float32, torch.bfloat16):
                w = regmean_merge(ds, [g.to(dt).double() for g in grams], alpha)
                lost[dt] = ((loss(w) - loss(ref)) / gap, float((w - ref).norm() / ref.norm()))
            print(f"{fan_in:4d} {tokens:6d} {spread:6d} {alpha:5.1f} {lost[torch.float32][0]:10.1e} "
                  f"{lost[torch.bfloat16][0]:10.1e} {lost[torch.bfloat16][1]:13.1e}")
    print("(lost: (L(W) - L(W*)) / (L(average) - L(W*)) on the RegMean objective; negative values at alpha<1 are "
          "possible because W* minimises the shrunk objective)")


def _objective(w: torch.Tensor, deltas: list[torch.Tensor], grams: list[torch.Tensor]) -> float:
    """sum_k ||X_k (W - D_k)^T||^2 = sum_k tr((W - D_k) G_k (W - D_k)^T), from the exact (fp32) Grams."""
    return float(sum((((w - d) @ g) * (w - d)).sum() for d, g in zip(deltas, grams)))


def storage_check_toy(samples: int = 32, ranks: tuple[int, ...] = (16, 32, 64)) -> None:
    """What the storage choices lose on the pre-trained toy base's own activations (one task's data per expert,
    random LoRA deltas on all projections): per adapted module, the fraction of full-Gram RegMean's gain over the
    plain average (on RegMean's objective, from the exact fp32 Grams) that a merge from bf16 Grams, low-rank
    sketches or diagonals loses; median (max) over modules. Needs the toy base: cached, or shipped with the
    package (toy.pretrain_base() loads either without pre-training)."""
    from peft import get_peft_model

    if not toy.base_path().exists() and toy.shipped_base_manifest() is None:
        print("\n(toy base neither cached nor shipped: skipping the check on real activations; run "
              "toy.pretrain_base() first)")
        return
    print(f"\n== Gram storage on the pre-trained toy base's activations ({samples} samples per task, hidden 128, "
          "intermediate 256) ==")
    tok = toy.build_tokenizer()
    variants = {"bf16 full": None, **{f"lowrank k={k}": k for k in ranks}, "diag": None}
    grams, approx, deltas = [], {v: [] for v in variants}, []
    for k, task in enumerate(toy.TASK_NAMES):
        torch.manual_seed(k)
        expert = get_peft_model(toy.pretrain_base(), toy.lora_config())  # pretrain_base loads the cached copy
        with torch.no_grad():
            for name, p in expert.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        data = toy.task_dataset(task, tokenizer=tok, n=samples)
        rec = run_calibration(expert, data, SensitivityConfig(calibration_samples=samples, gram="full", fisher=False))
        grams.append({n: rec.statistic("gram", n).double() for n in rec.tensor_names})
        approx["bf16 full"].append({n: g.to(torch.bfloat16).double() for n, g in grams[-1].items()})
        approx["diag"].append({n: torch.diagonal(g).clone() for n, g in grams[-1].items()})
        for rank in ranks:
            low = run_calibration(expert, data, SensitivityConfig(calibration_samples=samples, gram="lowrank",
                                                                  gram_rank=rank, fisher=False))
            approx[f"lowrank k={rank}"].append({n: low.statistic("gram", n).double() for n in rec.tensor_names})
        deltas.append({})
        for name, module in expert.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                d = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                deltas[-1][name.replace("base_model.model.", "") + ".weight"] = d.detach().double()
    print(f"base {toy.base_path().name}, {len(grams)} experts, {len(grams[0])} modules; calibration tokens per "
          f"expert ~{rec.statistic_count('gram', rec.tensor_names[0])}")
    for alpha in (1.0, 0.9, 0.5):
        lost: dict[str, list[float]] = {v: [] for v in variants}
        for name in grams[0]:
            gs = [g[name] for g in grams]
            ds = [d[name] for d in deltas]
            ref = regmean_merge(ds, gs, alpha)
            best = _objective(ref, ds, gs)
            gap = _objective(torch.stack(ds).mean(0), ds, gs) - best
            for v in variants:
                w = regmean_merge(ds, [a[name] for a in approx[v]], alpha)
                lost[v].append((_objective(w, ds, gs) - best) / gap)
        cells = ", ".join(f"{v} {statistics.median(x):.1e} ({max(x):.1e})" for v, x in lost.items())
        print(f"alpha {alpha:.1f}: gain lost, median (max): {cells}")
    print("(negative values at alpha<1 are possible: the reference minimises the shrunk objective)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measure_pass(args.samples, args.repeats)
    print_formula()
    bf16_check()
    storage_check_toy()


if __name__ == "__main__":
    main()
