"""Pick an untuned default among a few candidate settings, on validation, over every cell of the quick benchmark.

    OMP_NUM_THREADS=1 python benchmarks/default_candidates.py          # reuses the cells quality.py cached

For each cell (family × kind, regime B, seed 0) it scores every candidate and tuned TA (TA's validation-best λ
of the shared grid) on validation and on test, with the same cached experts, scorers and evaluation cache as
``benchmarks/quality.py``. The rule of the benchmark issue: a default may not be below tuned TA on any suite; among
the candidates that meet it on *validation*, the best validation mean wins; test numbers are reported, not used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
import quality_lib as ql  # noqa: E402

from sens_peft.testing import families, toy  # noqa: E402

CANDIDATES = {f"regmean shrinkage {a}": q._plain("regmean", 1.0, shrinkage=a) for a in (0.8, 0.9, 0.95, 0.98, 0.99, 1.0)}


def main() -> None:
    torch.set_num_threads(1)
    grid = q.GRIDS["quick"]
    tokenizer = toy.build_tokenizer()
    workdir = Path("/tmp/sens_peft_quality_suites")
    ta = next(m for m in q.METHODS if m.name == "TA")
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for family in ("maps", "conflict", "recall"):
        tasks = families.get_family(family).tasks
        scorers = {"validation": ql.Scorer(tokenizer, tasks, "validation", 100),
                   "test": ql.Scorer(tokenizer, tasks, "test", 200)}
        base = families.pretrain_family_base(family, "B").eval()
        for kind in ("lora", "full"):
            root_dir = workdir / Path(str(base.name_or_path)).name
            cell = ql.prepare_cell(base, family, "B", kind, 0, root_dir, tokenizer, scorers=scorers)
            runner = q.Runner(cell, scorers, ql.cell_root(root_dir, family, "B", kind, 0, None) /
                              f"evals_{grid['budget']}.json")
            label = f"{family}/{kind}"
            best, _ = runner.best(ta, ta.grid(grid))
            rows.setdefault("tuned TA", {})[label] = {s: runner.run(ta, best, s)["avg_norm"] for s in scorers}
            for name, setting in CANDIDATES.items():
                method = q.Method(name, lambda g, _s=setting: [_s], ql.merge_fast)
                rows.setdefault(name, {})[label] = {s: runner.run(method, setting, s)["avg_norm"] for s in scorers}
            runner.flush()
    ok = {name: all(r[c]["validation"] >= rows["tuned TA"][c]["validation"] for c in r)
          for name, r in rows.items() if name != "tuned TA"}
    val_mean = {name: sum(v["validation"] for v in r.values()) / len(r) for name, r in rows.items()}
    print(f"{'setting':28s} " + " ".join(f"{c:>14s}" for c in rows["tuned TA"]) + "   val mean  rule on val")
    for name, r in rows.items():
        cells = " ".join(f"{100 * v['validation']:5.1f}/{100 * v['test']:5.1f}  " for v in r.values())
        print(f"{name:28s} {cells} {100 * val_mean[name]:6.1f}   {ok.get(name, '')}")
    eligible = [n for n, good in ok.items() if good]
    pick = max(eligible, key=val_mean.get) if eligible else None
    print(f"(cells: validation/test normalised accuracy %); pick on validation: {pick}")
    out = Path(__file__).resolve().parent / "results" / "default_candidates.json"
    out.write_text(json.dumps({"rows": rows, "rule_on_validation": ok, "pick": pick}, indent=2) + "\n")


if __name__ == "__main__":
    main()
