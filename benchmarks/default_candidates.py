"""Pick an untuned default among a few candidate settings, on validation, over the cells of the benchmark.

    OMP_NUM_THREADS=1 python benchmarks/default_candidates.py                       # regime B, seed 0 (as first run)
    OMP_NUM_THREADS=1 python benchmarks/default_candidates.py --regimes A,A2,B --seeds 3 --out default_candidates_all
    # with the held-out family perm (added after the choice): 24 suites
    OMP_NUM_THREADS=1 python benchmarks/default_candidates.py --families maps,conflict,recall,perm --regimes A,A2,B \
        --seeds 3 --out default_candidates_24
    # the fifth family scan (added after probe-fitted RegMean was built), per regime
    OMP_NUM_THREADS=1 python benchmarks/default_candidates.py --families scan --regimes B --seeds 3 --out default_candidates_scan_B
    OMP_NUM_THREADS=1 python benchmarks/default_candidates.py --families scan --regimes A,A2 --seeds 3 --out default_candidates_scan_A

For each cell (family × regime × kind × seed) it scores every candidate and tuned TA (TA's validation-best λ of
the shared quick grid) on validation and on test, with the same cached experts, scorers and evaluation cache as
``benchmarks/quality.py --quick`` (run that first: cells whose experts are not trained are skipped). A suite is
family/regime/kind; its number is the mean over seeds. Candidates: RegMean at six shrinkages, ``probe_fit`` at its
start λ and on RegMean, and the rule's fallback as a default would be (untuned TA: λ 1 and the average). The rule
of the benchmark issue: a default may not be below tuned TA on any suite; among the candidates that meet it on
*validation*, the best validation mean wins; test numbers are reported, not used to choose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
import quality_lib as ql  # noqa: E402

from sens_peft.testing import families, toy  # noqa: E402

# λ = 1 with the shrinkages of the RegMean grid share their cache entries with the tuned "RegMean" row
FLOOR = 0.05  # tuned TA's validation normalised accuracy below which a suite is "at the floor" (second reading)
# name -> (the benchmark's row whose cache entries it shares, its merge function, setting)
CANDIDATES: dict[str, tuple[str, object, Any]] = {
    f"regmean shrinkage {a}": ("RegMean", ql.merge_fast, q._plain("regmean", 1.0, shrinkage=a))
    for a in (0.8, 0.9, 0.95, 0.98, 0.99, 1.0)}
# probe_fit at its library start λ (0.5, a point of the quick grid): needs the probes and a model in the loop
CANDIDATES["probe_fit λ 0.5"] = ("Probe-fitted TA", ql.merge_probe_fit, {"method": "probe_fit", "lam": 0.5})
# probe_fit on RegMean (session 23): RegMean's parts, fitted from c ≡ 1 (RegMean itself) with the default shrinkage
CANDIDATES["probe_fit on RegMean (0.99)"] = ("Probe-fitted RegMean", ql.merge_probe_fit,
                                             {"method": "probe_fit", "lam": 1.0, "base_method": "regmean",
                                              "shrinkage": 0.99})
# the fallback, untuned as a default is: TA at its library λ (1, the sum of the task vectors) and the plain
# average (λ = 1/K, K experts merged in the cell)
CANDIDATES["TA λ 1 (library default)"] = ("TA", ql.merge_fast, q._plain("task_arithmetic", 1.0))
CANDIDATES["average (TA λ 1/K)"] = ("TA", ql.merge_fast,
                                    lambda part: q._plain("task_arithmetic", 1.0 / len(part.tasks)))


def score_cell(family: str, regime: str, kind: str, seed: int, workdir: Path, tokenizer, scorers, grid,
               rows: dict[str, dict[str, list[dict[str, float]]]]) -> None:
    """Append tuned TA's and every candidate's validation/test normalised accuracy of one cell to ``rows``
    (regime A2: one entry per pair of regime A's experts, as ``quality.py`` merges them)."""
    trained = "A" if regime == "A2" else regime
    base = families.pretrain_family_base(family, trained).eval()
    root_dir = workdir / Path(str(base.name_or_path)).name
    root = ql.cell_root(root_dir, family, trained, kind, seed, None)
    if not all((root / t / "done.json").exists() for t in families.get_family(family).tasks):
        print(f"{family}/{regime}/{kind}/seed{seed}: experts not trained by quality.py yet, skipped")
        return
    cell = ql.prepare_cell(base, family, trained, kind, seed, root_dir, tokenizer, scorers=scorers)
    suite = f"{family}/{regime}/{kind}"
    ta = next(m for m in q.METHODS if m.name == "TA")
    for part, part_scorers, part_root in q.cell_parts(cell, regime, scorers, root):
        runner = q.Runner(part, part_scorers, part_root / q.evals_file(grid, part_scorers))
        best, _ = runner.best(ta, ta.grid(grid))
        rows.setdefault("tuned TA", {}).setdefault(suite, []).append(
            {s: runner.run(ta, best, s)["avg_norm"] for s in part_scorers})
        for name, (row, merge, setting) in CANDIDATES.items():
            setting = setting(part) if callable(setting) else setting
            method = q.Method(row, lambda g, _s=setting: [_s], merge)
            rows.setdefault(name, {}).setdefault(suite, []).append(
                {s: runner.run(method, setting, s)["avg_norm"] for s in part_scorers})
        runner.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="maps,conflict,recall", help="comma list (the families the default was "
                   "chosen on; perm is the held-out one)")
    p.add_argument("--regimes", default="B")
    p.add_argument("--kinds", default="lora,full")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sens_peft_quality_suites"))
    p.add_argument("--out", default="default_candidates")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    grid = q.GRIDS["quick"]
    tokenizer = toy.build_tokenizer()
    rows: dict[str, dict[str, list[dict[str, float]]]] = {}
    for family in args.families.split(","):
        tasks = families.get_family(family).tasks
        scorers = {"validation": ql.Scorer(tokenizer, tasks, "validation", 100),
                   "test": ql.Scorer(tokenizer, tasks, "test", 200)}
        for regime in args.regimes.split(","):
            for kind in args.kinds.split(","):
                for seed in range(args.seeds):
                    score_cell(family, regime, kind, seed, args.workdir, tokenizer, scorers, grid, rows)
    suite_mean = {name: {s: {split: float(np.mean([c[split] for c in cs])) for split in ("validation", "test")}
                         for s, cs in r.items()} for name, r in rows.items()}
    ta = suite_mean["tuned TA"]
    ok = {name: all(r[s]["validation"] >= ta[s]["validation"] for s in r)
          for name, r in suite_mean.items() if name != "tuned TA"}
    below = {name: [s for s in r if r[s]["validation"] < ta[s]["validation"]] for name, r in suite_mean.items()}
    val_mean = {name: float(np.mean([v["validation"] for v in r.values()])) for name, r in suite_mean.items()}
    test_mean = {name: float(np.mean([v["test"] for v in r.values()])) for name, r in suite_mean.items()}
    print(f"{'setting':26s} " + " ".join(f"{s:>18s}" for s in ta) + "  val/test mean  rule on val")
    for name, r in suite_mean.items():
        cells = " ".join(f"{100 * v['validation']:7.1f}/{100 * v['test']:5.1f}  " for v in r.values())
        print(f"{name:26s} {cells} {100 * val_mean[name]:5.1f}/{100 * test_mean[name]:5.1f}  "
              f"{ok.get(name, '')} {below[name] if name in ok and below[name] else ''}")
    eligible = [n for n, good in ok.items() if good]
    pick = max(eligible, key=val_mean.get) if eligible else None
    print(f"(suites: validation/test normalised accuracy %, mean over {args.seeds} seed(s)); pick on validation: "
          f"{pick}")
    # A second reading, reported beside the first: suites where tuned TA itself keeps < FLOOR of the experts'
    # accuracy on validation are ones where every merge loses every task (1-2 answers in 400 decide "below")
    floor = sorted(s for s in ta if ta[s]["validation"] < FLOOR)
    ok_above_floor = {name: not [s for s in below[name] if s not in floor] for name in ok}
    eligible = [n for n, good in ok_above_floor.items() if good]
    pick_above_floor = max(eligible, key=val_mean.get) if eligible else None
    print(f"floor suites (tuned TA < {100 * FLOOR:.0f}% on validation): {floor}; pick on the other suites: "
          f"{pick_above_floor}")
    out = Path(__file__).resolve().parent / "results" / f"{args.out}.json"
    out.write_text(json.dumps({"command": "python benchmarks/default_candidates.py " + " ".join(sys.argv[1:]),
                               "per_seed": rows, "suites": suite_mean, "rule_on_validation": ok,
                               "below_tuned_ta_on_validation": below, "val_mean": val_mean,
                               "test_mean": test_mean, "pick": pick, "floor": FLOOR, "floor_suites": floor,
                               "rule_above_floor": ok_above_floor, "pick_above_floor": pick_above_floor},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
