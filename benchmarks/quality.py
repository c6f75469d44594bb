"""Quality benchmark over task families × regimes × LoRA/full experts × seeds: a benchmark one suite cannot win.

Suites (``sens_peft.testing.families``): ``maps`` (per-position symbol maps), ``recall`` (key -> value facts only one
expert learns), ``conflict`` (several tasks on the same inputs with different answers), ``perm`` (reorderings of the
same letters: a positional skill; added after the default was chosen on the other three, as a held-out check),
``scan`` (running aggregates of the same digits; added after probe-fitted RegMean was built, as a held-out check of
it), each in regime ``B`` (the
base half-knows every task, small task vectors) and ``A`` (the base knows none of them, large task vectors, heavy
interference), with LoRA and full fine-tuned experts. ``A2`` merges regime A's experts two at a time (pairs
:data:`PAIRS`, each pair one cell): every merge of all four regime-A experts sits near the floor (≤ 3.3 % on the regime mean),
so A can show a method's damage but not rank methods; A2 keeps A's large task vectors and heavy interference with
half the experts. A *cell* is (family, regime, kind, seed); everything of a
cell (experts, sidecars, transferability, every evaluated setting) is cached under ``--workdir``, so a long run
can be interrupted and resumed, and a later run only computes what is new.

Protocol per cell: every method in :data:`METHODS` is one entry (name, grid, merge function, the statistics it
reads). Every tuned method gets the same number of grid points (``budget``: 8 full, 4 quick); the setting with the
best validation normalised accuracy (answer log-likelihood breaks ties) is reported on test. A method that reads a
statistic (element maps, the Sens coefficient table; later RegMean's Gram matrices or Fisher) automatically gets
a control entry that reads the same statistic shuffled (:func:`quality_lib.register_statistic`) with the same grid.
Normalised accuracy = accuracy ÷ the task's own expert's accuracy, mean over the family's 4 tasks. Intervals are
paired bootstraps over test items (resampled within task and cell) of each method − tuned TA and each method −
its control, per suite (mean over seeds) and over all suites (mean of suite means).

Adding a method is one entry; a data-aware one also declares its statistic once, e.g. RegMean::

    ql.register_statistic("gram", load=lambda cell, name: input_grams(cell, name),   # per expert, cached per cell
                          shuffle=lambda grams, seed: permuted_grams(grams, seed))  # its information-free version
    METHODS.append(Method("RegMean", lambda g: [{"alpha": a, "lam": 1.0} for a in ALPHAS_OF_BUDGET], regmean,
                          uses=("gram",)))   # -> rows "RegMean" and "RegMean [control: shuffled gram]"

Usage::

    python benchmarks/quality.py --quick          # maps + conflict, regime B, LoRA, 1 seed (<= 15 min, 2 cores)
    python benchmarks/quality.py                  # 4 families × 3 regimes × LoRA/full × 3 seeds (hours; resumable)
    python benchmarks/quality.py --families maps --regimes B --kinds lora --seeds 1
    # a run split over several processes (one per family/kind), then one report from the caches:
    python benchmarks/quality.py --quick --families maps,recall,conflict --regimes A,B --kinds lora,full --seeds 3 \
        --cached-only --exclude conflict/A/lora --tag quality_full

Cells run seeds outermost; Ctrl-C / SIGTERM writes the report of the cells done. mergekit rows (full experts, seed 0)
appear when ``/work/mk-venv`` imports mergekit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_lib as ql  # noqa: E402

from sens_peft.testing import families, toy  # noqa: E402

logger = logging.getLogger("quality")

# Every tuned method gets exactly ``budget`` grid points.
GRIDS: dict[str, dict[str, Any]] = {
    "full": {"budget": 8,
             "ta_lams": [0.1, 0.15, 0.25, 0.35, 0.45, 0.6, 0.75, 0.9],
             "ties": {"density": [0.2, 0.5], "lams": [0.4, 0.8, 1.3, 2.0]},
             "dare": {"density": [0.3, 0.6], "lams": [0.4, 0.8, 1.3, 2.0]},
             "sens": {"T": [1.0, 4.0], "lams": [0.15, 0.3, 0.5, 0.8]},
             # RegMean and Fisher are averages (λ = 1 is the method itself): shrinkage × λ around 1
             "regmean": {"shrinkage": [0.8, 0.95, 0.99, 1.0], "lams": [1.0, 1.3]},
             "fisher_lams": [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]},
    "quick": {"budget": 4,
              "ta_lams": [0.15, 0.3, 0.5, 0.8],
              "ties": {"density": [0.4], "lams": [0.4, 0.8, 1.3, 2.0]},
              "dare": {"density": [0.5], "lams": [0.4, 0.8, 1.3, 2.0]},
              "sens": {"T": [1.0], "lams": [0.15, 0.3, 0.5, 0.8]},
              "regmean": {"shrinkage": [0.8, 1.0], "lams": [1.0, 1.3]},
              "fisher_lams": [0.75, 1.25, 2.0, 3.0]},
}

# mergekit's sparsifying and geometric methods: DELLA and its sensitivity-ranked drop share DARE's densities and λ
# grid (so each row compares with DARE-TIES at the same density), epsilon fixed at mergekit's 0.15; Breadcrumbs
# keeps dense task vectors (TA's λ range); Model Stock's λ multiplies its own t (1 = the method itself; t is near 0
# for near-orthogonal task vectors of different tasks, hence the wide range).
GRIDS["full"].update({"della": {"density": [0.3, 0.6], "epsilon": 0.15, "lams": [0.4, 0.8, 1.3, 2.0]},
                      "breadcrumbs": {"density": [0.5, 0.9], "gamma": 0.01, "lams": [0.15, 0.3, 0.5, 0.8]},
                      "model_stock": {"filter_wise": [False, True], "lams": [1.0, 4.0, 16.0, 64.0]}})
GRIDS["quick"].update({"della": {"density": [0.5], "epsilon": 0.15, "lams": [0.4, 0.8, 1.3, 2.0]},
                       "breadcrumbs": {"density": [0.9], "gamma": 0.01, "lams": [0.15, 0.3, 0.5, 0.8]},
                       "model_stock": {"filter_wise": [False], "lams": [1.0, 4.0, 16.0, 64.0]}})

# ----------------------------------------------------------------------------------------------------------
# The method list: one entry per method
# ----------------------------------------------------------------------------------------------------------

MergeFn = Callable[[dict[str, Any], ql.Cell], tuple[Any, dict[str, float]]]


@dataclass(frozen=True)
class Method:
    """One benchmarked method.

    Args:
        name: Row name in the tables.
        grid: ``grid -> settings`` (exactly ``grid["budget"]`` of them when ``tuned``).
        merge: ``(setting, cell) -> (merged ΔW per tensor, or a ready model; {"c_min", "c_max"})``.
        uses: Statistics (``quality_lib.STATISTICS``) the method reads; each such method gets a control entry
            that reads them shuffled.
        kinds: Expert kinds it applies to.
        tuned: Tuned on validation (False: one fixed setting, e.g. the library default).
        control_of: For a control entry, the method it controls.
    """

    name: str
    grid: Callable[[dict[str, Any]], list[dict[str, Any]]]
    merge: MergeFn
    uses: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("lora", "full")
    tuned: bool = True
    control_of: Optional[str] = None
    seeds: Optional[tuple[int, ...]] = None  # expert seeds it runs on (None: all)


def _plain(method: str, lam: float, **extra: Any) -> dict[str, Any]:
    return {"coef": "plain", "method": method, "lam": lam, **extra}


def _ties_grid(key: str, method: str, **extra: Any) -> Callable[[dict], list[dict]]:
    return lambda g: [_plain(method, lam, density=d, **extra) for d in g[key]["density"] for lam in g[key]["lams"]]


def _sens_grid(g: dict[str, Any]) -> list[dict[str, Any]]:
    reading = ql.lib_sens_reading()
    return [{"coef": "sens", "method": "task_arithmetic", "lam": lam, "T": T, **reading}
            for T in g["sens"]["T"] for lam in g["sens"]["lams"]]


def _peft(combination: str) -> MergeFn:
    def merge(setting: dict[str, Any], cell: ql.Cell):
        return ql.peft_weighted(cell, combination, setting["lam"], setting.get("density")), {}

    return merge


def _probe_fit_regmean_grid(g: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"method": "probe_fit", "lam": lam, "base_method": "regmean", "shrinkage": a}
            for a in g["regmean"]["shrinkage"] for lam in g["regmean"]["lams"]]


def _peft_grid(combination: str, key: Optional[str]) -> Callable[[dict], list[dict]]:
    """PEFT ``add_weighted_adapter`` settings: TA's λ grid (``key=None``) or a TIES/DARE density × λ grid."""
    if key is None:
        return lambda g: [{"peft": combination, "lam": lam} for lam in g["ta_lams"]]
    return lambda g: [{"peft": combination, "lam": lam, "density": d}
                      for d in g[key]["density"] for lam in g[key]["lams"]]


METHODS: list[Method] = [
    Method("TA", lambda g: [_plain("task_arithmetic", lam) for lam in g["ta_lams"]], ql.merge_fast),
    Method("TIES", _ties_grid("ties", "ties"), ql.merge_fast),
    Method("DARE-TIES", _ties_grid("dare", "dare_ties"), ql.merge_fast),
    Method("TIES trim by sensitivity", _ties_grid("ties", "ties", trim_by="sensitivity"), ql.merge_fast,
           uses=("element_maps",)),
    Method("Importance", lambda g: [_plain("importance", lam) for lam in g["ta_lams"]], ql.merge_fast,
           uses=("element_maps",)),
    Method("Sens-TA (recommended reading)", _sens_grid, ql.merge_fast, uses=("sens_table",)),
    Method("RegMean", lambda g: [_plain("regmean", lam, shrinkage=a) for a in g["regmean"]["shrinkage"]
                                 for lam in g["regmean"]["lams"]], ql.merge_fast, uses=("gram",)),
    Method("Fisher", lambda g: [_plain("fisher", lam) for lam in g["fisher_lams"]], ql.merge_fast,
           uses=("fisher",)),
    Method("PEFT cat", _peft_grid("cat", None), _peft("cat"), kinds=("lora",)),
    Method("PEFT ties_svd", _peft_grid("ties_svd", "ties"), _peft("ties_svd"), kinds=("lora",)),
    Method("PEFT dare_ties_svd", _peft_grid("dare_ties_svd", "dare"), _peft("dare_ties_svd"), kinds=("lora",)),
    # its control: the same fit with the fitted values permuted over (expert, layer); shuffling the probes'
    # answers instead (``uses=("probes",)``) fits the merge to noise and lands below the base, which says nothing
    Method("Probe-fitted TA", lambda g: [{"method": "probe_fit", "lam": lam} for lam in g["ta_lams"]],
           ql.merge_probe_fit),
    Method("Probe-fitted TA [control: fitted coefficients permuted]",
           lambda g: [{"method": "probe_fit", "lam": lam} for lam in g["ta_lams"]], ql.merge_probe_fit_permuted,
           control_of="Probe-fitted TA"),
    # RegMean's per-expert shares fitted on the probes from c ≡ λ (λ 1: RegMean itself), RegMean's grid
    Method("Probe-fitted RegMean", _probe_fit_regmean_grid, ql.merge_probe_fit),
    Method("Probe-fitted RegMean [control: fitted coefficients permuted]", _probe_fit_regmean_grid,
           ql.merge_probe_fit_permuted, control_of="Probe-fitted RegMean"),
    Method("Default (MergeConfig(), public API)", lambda g: [ql.lib_default_setting()], ql.merge_default,
           tuned=False),
    Method("Base (no merge)", lambda g: [_plain("task_arithmetic", 0.0)], ql.merge_fast, tuned=False),
]


def _own_params(keys: tuple[str, ...], maps: bool = False) -> MergeFn:
    """:func:`quality_lib.merge_fast` for methods with parameters of their own (``keys`` of the setting) and,
    with ``maps``, the experts' element maps as ranking scores (shuffled in the control)."""
    def merge(setting: dict[str, Any], cell: ql.Cell):
        coef, spread = ql.coefficient_lookup(setting, cell)
        params = {key: setting[key] for key in keys if key in setting}
        return {name: ql.lib_merge_tensor(setting["method"], deltas, coef(name), density=setting.get("density", 1.0),
                                          scale=setting["lam"], seed=cell.seed, name=name,
                                          importance=cell.stat("element_maps", name) if maps else None, **params)
                for name, deltas in cell.deltas.items()}, spread

    return merge


def _grid(key: str, method: str, axis: str, **fixed: str) -> Callable[[dict], list[dict]]:
    """``axis`` values × λ of ``GRIDS[...][key]``, with the ``fixed`` settings read from the same entry."""
    return lambda g: [_plain(method, lam, **{axis: v}, **{k: g[key][f] for k, f in fixed.items()})
                      for v in g[key][axis] for lam in g[key]["lams"]]


# SLERP merges exactly two experts: no row in this 4-expert benchmark.
METHODS[-2:-2] = [
    Method("DELLA", _grid("della", "della", "density", epsilon="epsilon"), _own_params(("epsilon",))),
    Method("DELLA-linear", _grid("della", "della_linear", "density", epsilon="epsilon"), _own_params(("epsilon",))),
    Method("Sensitivity-ranked drop (DELLA by element maps)",
           _grid("della", "della_sensitivity", "density", epsilon="epsilon"), _own_params(("epsilon",), maps=True),
           uses=("element_maps",)),
    Method("Breadcrumbs", _grid("breadcrumbs", "breadcrumbs", "density", gamma="gamma"), _own_params(("gamma",))),
    Method("Breadcrumbs-TIES", _grid("breadcrumbs", "breadcrumbs_ties", "density", gamma="gamma"),
           _own_params(("gamma",))),
    Method("Model Stock", _grid("model_stock", "model_stock", "filter_wise"), _own_params(("filter_wise",))),
]
# Rows added by the acceptance run: RegMean fed low-rank sketches of the Grams (what gram="lowrank" stores), and
# mergekit's own TA / TIES on full experts where /work/mk-venv has it (its venv, not a dependency of the package;
# seed 0 only: ~5 s per merge on the loaded 2-core machine, and it equals ours to 6e-8 where checked).
METHODS += [
    Method(f"RegMean, rank-{ql.GRAM_SKETCH_RANK} Gram sketch + diagonal",
           lambda g: [_plain("regmean", lam, shrinkage=a, gram_stat="gram_lowrank",
                                             gram_rank=ql.GRAM_SKETCH_RANK)
                      for a in g["regmean"]["shrinkage"] for lam in g["regmean"]["lams"]],
           ql.merge_fast, uses=("gram_lowrank",)),
]
if ql.mergekit_available():
    METHODS += [
        Method("mergekit TA", lambda g: [{"mk": "task_arithmetic", "lam": lam} for lam in g["ta_lams"]],
               ql.merge_mergekit, kinds=("full",), seeds=(0,)),
        Method("mergekit TIES", lambda g: [{"mk": "ties", "lam": lam, "density": d} for d in g["ties"]["density"]
                                           for lam in g["ties"]["lams"]], ql.merge_mergekit, kinds=("full",),
               seeds=(0,)),
    ]
else:
    logger.warning("mergekit not importable from %s: no mergekit rows", ql.MERGEKIT_PYTHON)
REFERENCE = "TA"
DEFAULT = "Default (MergeConfig(), public API)"
BASE = "Base (no merge)"
# Regime A2: regime A's four experts merged two at a time (every merge of all four sits at the floor there)
PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3))
CONTROL_LABEL = {"element_maps": "shuffled maps", "sens_table": "random coefficients",
                 "gram": "permuted Grams", "fisher": "shuffled Fisher", "gram_lowrank": "permuted sketched Grams"}


def with_controls(methods: list[Method]) -> list[Method]:
    """The method list plus, after each data-aware method, its information-free control (same grid)."""
    out = []
    for m in methods:
        out.append(m)
        if m.uses:
            label = " + ".join(CONTROL_LABEL.get(u, f"shuffled {u}") for u in m.uses)

            def merge(setting, cell, _m=m):
                return _m.merge(setting, cell.with_shuffled(_m.uses))

            out.append(Method(f"{m.name} [control: {label}]", m.grid, merge, (), m.kinds, m.tuned, m.name))
    return out


def check_budget(methods: list[Method], grid: dict[str, Any]) -> None:
    """Every tuned method has exactly ``grid["budget"]`` settings (one shared grid budget)."""
    for m in methods:
        n = len(m.grid(grid))
        if m.tuned and n != grid["budget"]:
            raise ValueError(f"method {m.name!r} has {n} grid points; the shared budget is {grid['budget']}")


# ----------------------------------------------------------------------------------------------------------
# Runner: cached validation / test evaluations of one cell
# ----------------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, cell: ql.Cell, scorers: dict[str, ql.Scorer], cache: Path):
        self.cell, self.scorers, self.cache_path = cell, scorers, cache
        self.mm = ql.MergedModel(cell.base, list(cell.deltas))
        self.cache: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
        self.norm = {s: ql.expert_acc(cell, s) for s in scorers}
        self.evals, self.seconds, self._dirty = 0, 0.0, 0

    def flush(self) -> None:
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.cache_path)
        self._dirty = 0

    def model(self, method: Method, setting: dict[str, Any]):
        merged, spread = method.merge(setting, self.cell)
        return (self.mm.load(merged) if isinstance(merged, dict) else merged), spread

    def run(self, method: Method, setting: dict[str, Any], split: str = "validation") -> Optional[dict[str, Any]]:
        key = f"{split}|{method.name}|{ql.setting_key(setting)}"
        if key in self.cache:
            return self.cache[key]
        start = time.perf_counter()
        try:
            model, spread = self.model(method, setting)
        except ValueError as err:  # e.g. a reading whose coefficients are undefined on this cell
            logger.warning("%s: skip %s %s: %s", self.cell.label(), method.name, setting, err)
            self.cache[key] = None
            return None
        scores = self.scorers[split].score(model)
        out = ql.summarize(scores, self.norm[split])
        out.update(spread)
        if split == "test":
            out["items"] = {t: ql.bits(v["correct"]) for t, v in scores.items()}
        self.cache[key] = out
        self.evals += 1
        self.seconds += time.perf_counter() - start
        self._dirty += 1
        if self._dirty >= 10:
            self.flush()
        return out

    def best(self, method: Method, settings: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validation-best setting (normalised accuracy, then log-likelihood) and its validation summary."""
        scored = [(s, self.run(method, s)) for s in settings]
        scored = [(s, r) for s, r in scored if r is not None]
        if not scored:
            raise RuntimeError(f"{self.cell.label()}: no setting of {method.name} could be evaluated")
        return max(scored, key=lambda sr: (round(sr[1]["avg_norm"], 9), sr[1]["loglik"]))


def cell_parts(cell: ql.Cell, regime: str, scorers: dict[str, ql.Scorer], root: Path
               ) -> list[tuple[ql.Cell, dict[str, ql.Scorer], Path]]:
    """What is merged and scored of a trained cell: ``(cell, scorers, folder of its evaluation cache)`` — the cell
    itself, or in regime A2 one sub-cell per pair of :data:`PAIRS` with scorers of its tasks and its own cache."""
    if regime != "A2":
        return [(cell, scorers, root)]
    parts = []
    for idx in PAIRS:
        sub = ql.sub_cell(cell, idx, "A2")
        (root / sub.part).mkdir(exist_ok=True)
        parts.append((sub, {s: sc.subset(sub.tasks) for s, sc in scorers.items()}, root / sub.part))
    return parts


def evals_file(grid: dict[str, Any], scorers: dict[str, ql.Scorer]) -> str:
    """The cell's eval cache: per grid budget and item counts (the default counts keep the historic names)."""
    n = (scorers["validation"].n_items, scorers["test"].n_items)
    default = {4: (100, 200), 8: (200, 300)}.get(grid["budget"])
    return f"evals_{grid['budget']}.json" if n == default else f"evals_{grid['budget']}_v{n[0]}_t{n[1]}.json"


def run_cell(cell: ql.Cell, methods: list[Method], grid: dict[str, Any], scorers, root: Path,
             tokenizer) -> dict[str, Any]:
    """Tune every method on validation and score its pick on test; the cell's result (with per-item bits)."""
    t0 = time.perf_counter()
    runner = Runner(cell, scorers, root / evals_file(grid, scorers))
    result: dict[str, Any] = {"cell": cell.label(), "methods": {}}
    for m in methods:
        if cell.kind not in m.kinds or (m.seeds is not None and cell.seed not in m.seeds):
            continue
        settings = m.grid(grid)
        try:
            best, val = runner.best(m, settings)
        except RuntimeError as err:  # every setting failed (e.g. an optional tool broke): the row is left out
            logger.warning("%s", err)
            continue
        test = runner.run(m, best, "test")
        edge = m.tuned and "lam" in best and best["lam"] in (min(s["lam"] for s in settings),
                                                             max(s["lam"] for s in settings))
        result["methods"][m.name] = {
            "setting": best, "budget": len(settings), "tuned": m.tuned, "control_of": m.control_of,
            "lam_at_grid_edge": bool(edge),
            "val": {k: val[k] for k in ("avg_norm", "avg_acc", "loglik", "norm")},
            "test": {k: test[k] for k in ("avg_norm", "avg_acc", "loglik", "norm", "acc", "c_min", "c_max",
                                          "api_fallback") if k in test},
            "items": test["items"],
        }
    runner.flush()
    if cell.peft is not None and "qmerged" in cell.peft.peft_config:
        cell.peft.delete_adapter("qmerged")
    result["tf_vs_generation_agreement"] = _agreement(runner, methods, result, tokenizer, scorers["test"])
    result["expert_acc"] = {s: ql.expert_acc(cell, s) for s in scorers}
    result["base_acc"] = {s: {t: float(v["correct"].mean()) for t, v in cell.base_scores[s].items()}
                          for s in scorers}
    result["transfer"] = {k: v.tolist() for k, v in cell.transfer.items()}
    result["evals"], result["eval_seconds"] = runner.evals, runner.seconds
    result["train_seconds"], result["seconds"] = cell.train_seconds, time.perf_counter() - t0
    return result


def _agreement(runner: Runner, methods: list[Method], result: dict[str, Any], tokenizer, scorer) -> float:
    """Teacher-forced exact match vs greedy generation (``toy.predict``) on TA's test pick."""
    method = next(m for m in methods if m.name == REFERENCE)
    model, _ = runner.model(method, result["methods"][REFERENCE]["setting"])
    gen = ql.generation_correct(model, tokenizer, scorer)
    agree = sum(int((arr == ql.unbits(result["methods"][REFERENCE]["items"][t])).sum()) for t, arr in gen.items())
    return agree / max(sum(arr.size for arr in gen.values()), 1)


# ----------------------------------------------------------------------------------------------------------
# Aggregation over cells
# ----------------------------------------------------------------------------------------------------------


def suite_of(cell_result: dict[str, Any]) -> str:
    return cell_result["cell"].rsplit("/", 1)[0]


def aggregate(cells: list[dict[str, Any]], methods: list[Method], resamples: int) -> dict[str, Any]:
    """Per suite and over all suites: test normalised accuracy, Δ vs tuned TA and Δ vs the control, with CIs."""
    suites = sorted({suite_of(c) for c in cells})
    out: dict[str, Any] = {"suites": suites, "per_suite": {}, "mean": {}}
    controls = {m.control_of: m.name for m in methods if m.control_of}

    def items(cs, name):
        return [{t: ql.unbits(b) for t, b in c["methods"][name]["items"].items()} for c in cs]

    def compare(cs, a, b):
        cs = [c for c in cs if a in c["methods"] and b in c["methods"]]
        if not cs:
            return None
        return ql.paired_bootstrap(items(cs, a), items(cs, b), [c["expert_acc"]["test"] for c in cs],
                                   groups=[suite_of(c) for c in cs], resamples=resamples)

    for scope, cs_all in [(s, [c for c in cells if suite_of(c) == s]) for s in suites] + [("mean", cells)]:
        rows = {}
        for m in methods:
            cs = [c for c in cs_all if m.name in c["methods"]]
            if not cs:
                continue
            by_suite: dict[str, list[float]] = {}
            ll_suite: dict[str, list[float]] = {}
            for c in cs:
                by_suite.setdefault(suite_of(c), []).append(c["methods"][m.name]["test"]["avg_norm"])
                ll_suite.setdefault(suite_of(c), []).append(c["methods"][m.name]["test"]["loglik"])
            row = {"test": float(np.mean([np.mean(v) for v in by_suite.values()])),
                   "loglik": float(np.mean([np.mean(v) for v in ll_suite.values()])),
                   "seeds": [c["methods"][m.name]["test"]["avg_norm"] for c in cs],
                   "suites": len(by_suite),
                   "vs_TA": compare(cs, m.name, REFERENCE) if m.name != REFERENCE else None,
                   "vs_control": compare(cs, m.name, controls[m.name]) if m.name in controls else None,
                   "settings": [c["methods"][m.name]["setting"] for c in cs],
                   "lam_at_grid_edge": sum(bool(c["methods"][m.name]["lam_at_grid_edge"]) for c in cs)}
            rows[m.name] = row
        if scope == "mean":
            out["mean"] = rows
        else:
            out["per_suite"][scope] = {
                "methods": rows,
                "expert_acc": [c["expert_acc"]["test"] for c in cs_all],
                "base_acc": [c["base_acc"]["test"] for c in cs_all],
            }
    return out


def regime_of(cell_result: dict[str, Any]) -> str:
    return cell_result["cell"].split("/")[1]


def per_regime(cells: list[dict[str, Any]], methods: list[Method], resamples: int) -> dict[str, Any]:
    """Per regime (when there are several): each method's mean over that regime's suites, its gain over tuned TA
    and over its control with intervals, and its worst suite (the lowest gain over tuned TA)."""
    regimes = sorted({regime_of(c) for c in cells})
    if len(regimes) < 2:
        return {}
    out = {}
    for regime in regimes:
        agg = aggregate([c for c in cells if regime_of(c) == regime], methods, resamples)
        rows = {}
        for name, row in agg["mean"].items():
            gains = [(s, agg["per_suite"][s]["methods"][name]["vs_TA"]) for s in agg["suites"]
                     if agg["per_suite"][s]["methods"].get(name, {}).get("vs_TA")]
            worst = min(gains, key=lambda sg: sg[1]["diff"], default=(None, None))
            rows[name] = {"test": row["test"], "vs_TA": row["vs_TA"], "vs_control": row["vs_control"],
                          "worst_suite": worst[0], "worst_vs_TA": worst[1]}
        out[regime] = {"suites": agg["suites"], "methods": rows}
    return out


def ci(c: Optional[dict[str, float]]) -> str:
    return "—" if not c else f"{c['diff']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]"


def _pm(values: list[float]) -> str:
    """``mean ± std`` over seeds in percent (just the mean for one seed)."""
    m, sd = ql.mean_std([100 * v for v in values])
    return f"{m:.1f} ± {sd:.1f}" if len(values) > 1 else f"{m:.1f}"


def markdown(report: dict[str, Any]) -> str:
    agg = report["aggregate"]
    suites = agg["suites"]
    names = [n for n in report["method_names"] if n in agg["mean"]]
    lines = [f"# Quality benchmark: {len(suites)} suite(s), seeds {report['seeds']}", "",
             f"Command: `{report['command']}`  ",
             f"Wall time {report['wall_seconds'] / 60:.1f} min; new merge+score evaluations {report['evals']}; "
             f"grid budget {report['grid']['budget']} per tuned method; teacher-forced EM vs generation agreement "
             f"on TA's test picks {report['tf_agreement']:.4f}.", "",
             "Normalised test accuracy (%, merged ÷ own expert, mean over the 4 tasks; settings picked on "
             "validation). Suite = family/regime/kind; regime B: base half-knows every task; A: base knows none. "
             "`mean` = mean of the suite means (methods absent from a suite, e.g. PEFT on full experts, are "
             "averaged over the suites they have). Intervals: paired bootstrap over test items, 95%, points.", "",
             "## Normalised accuracy per suite (mean ± std over seeds)", "",
             "| method | " + " | ".join(suites) + " | mean |", "|---|" + "---|" * (len(suites) + 1)]
    for n in names:
        cells = [_pm(agg["per_suite"][s]["methods"][n]["seeds"]) if n in agg["per_suite"][s]["methods"]
                 else "—" for s in suites]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {100 * agg['mean'][n]['test']:.1f} |")
    for regime, r in report.get("per_regime", {}).items():
        lines += ["", f"## Regime {regime}: mean over its {len(r['suites'])} suites [95% CI]", "",
                  "| method | normalised | − tuned TA | worst suite − tuned TA | − its control |", "|---|---|---|---|---|"]
        for n in names:
            if n in r["methods"]:
                m = r["methods"][n]
                worst = f"{ci(m['worst_vs_TA'])} ({m['worst_suite']})" if m["worst_suite"] else "—"
                lines.append(f"| {n} | {100 * m['test']:.1f} | {ci(m['vs_TA'])} | {worst} | {ci(m['vs_control'])} |")
    for title, key in (("Gain over tuned TA", "vs_TA"), ("Gain over the information-free control", "vs_control")):
        rows = [n for n in names if agg["mean"][n][key]]
        if not rows:
            continue
        lines += ["", f"## {title} [95% CI]", "", "| method | " + " | ".join(suites) + " | mean |",
                  "|---|" + "---|" * (len(suites) + 1)]
        for n in rows:
            cells = [ci(agg["per_suite"][s]["methods"].get(n, {}).get(key)) for s in suites]
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {ci(agg['mean'][n][key])} |")
    lines += ["", "## Answer log-likelihood per suite (test, nats per answer token, mean over seeds)", "",
              "A graded reading where exact match is at the floor (regime A): how much of each task a merge keeps.",
              "", "| method | " + " | ".join(suites) + " | mean |", "|---|" + "---|" * (len(suites) + 1)]
    for n in names:
        cells = [f"{agg['per_suite'][s]['methods'][n]['loglik']:.2f}" if n in agg["per_suite"][s]["methods"]
                 else "—" for s in suites]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {agg['mean'][n]['loglik']:.2f} |")
    lines += ["", "## Suites", "", "| suite | cells (seeds; A2: two pairs per seed) | expert test acc (mean over tasks) | base test acc | "
              "TA picks (λ) | methods with λ at a grid edge |", "|---|---|---|---|---|---|"]
    for s in suites:
        ps = agg["per_suite"][s]
        exp = np.mean([np.mean(list(e.values())) for e in ps["expert_acc"]])
        base = np.mean([np.mean(list(b.values())) for b in ps["base_acc"]])
        edges = [n for n, r in ps["methods"].items() if r["lam_at_grid_edge"]]
        lines.append(f"| {s} | {len(ps['expert_acc'])} | {100 * exp:.1f} | {100 * base:.1f} | "
                     f"{', '.join(str(x['lam']) for x in ps['methods'][REFERENCE]['settings'])} | "
                     f"{', '.join(edges) or '—'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Heat map of each method's gain over tuned TA per suite and on the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = report["aggregate"]
    cols = agg["suites"] + ["mean"]
    names = [n for n in report["method_names"] if n in agg["mean"] and n != REFERENCE]
    grid = np.full((len(names), len(cols)), np.nan)
    for i, n in enumerate(names):
        for j, s in enumerate(cols):
            row = agg["mean"].get(n) if s == "mean" else agg["per_suite"][s]["methods"].get(n)
            if row and row["vs_TA"]:
                grid[i, j] = row["vs_TA"]["diff"]
    lim = max(1.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0)
    fig, ax = plt.subplots(figsize=(5.5 + 1.2 * len(cols), 1.2 + 0.42 * len(names)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(names)):
        for j in range(len(cols)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title("normalised test accuracy − tuned TA (points)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="maps + conflict, regime B, LoRA, 1 seed, grid budget 4, 100 val / 200 test items")
    p.add_argument("--families", default=None, help="comma list (default: maps,recall,conflict,perm,scan)")
    p.add_argument("--regimes", default=None,
                   help="comma list of A,B,A2 (default: all three); A2 = regime A's experts merged two at a time "
                        f"(pairs {PAIRS})")
    p.add_argument("--kinds", default=None, help="comma list of lora,full (default: both)")
    p.add_argument("--seeds", type=int, default=None, help="expert seeds 0..N-1 (default 3)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sens_peft_quality_suites"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default=None, help="output stem (default quality_suites, quick: quality_quick)")
    p.add_argument("--val-n", type=int, default=None)
    p.add_argument("--test-n", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="expert steps (default: families.expert_kwargs)")
    p.add_argument("--base-steps", type=int, default=None, help="base pre-training steps (smoke tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exclude", default="", help="comma list of suite prefixes to leave out (e.g. conflict/A)")
    p.add_argument("--cached-only", action="store_true",
                   help="skip cells whose experts are not trained yet (e.g. to report a run that was split up)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--methods", default="",
                   help="comma list of method names to run (default: all); controls follow their method, and "
                        f"{REFERENCE!r}, {DEFAULT!r} and the base always run")
    args = p.parse_args(argv)
    q = args.quick
    args.families = (args.families or ("maps,conflict" if q else "maps,recall,conflict,perm,scan")).split(",")
    args.regimes = (args.regimes or ("B" if q else "A,A2,B")).split(",")
    args.kinds = (args.kinds or ("lora" if q else "lora,full")).split(",")
    args.seeds = args.seeds or (1 if q else 3)
    args.val_n = args.val_n or (100 if q else 200)
    args.test_n = args.test_n or (200 if q else 300)
    args.tag = args.tag or ("quality_quick" if q else "quality_suites")
    args.grid = GRIDS["quick" if q else "full"]
    args.exclude = [x for x in args.exclude.split(",") if x]
    unknown = set(args.regimes) - {"A", "B", "A2"}
    if unknown:
        p.error(f"--regimes: unknown {sorted(unknown)} (A, B, A2)")
    args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    return args


def select_methods(methods: list[Method], names: list[str]) -> list[Method]:
    """``methods`` restricted to ``names`` (and their controls, the reference, the default and the base)."""
    if not names:
        return methods
    known = {m.name for m in methods}
    missing = [n for n in names if n not in known]
    if missing:
        raise SystemExit(f"--methods: unknown {missing}; known: {sorted(known)}")
    keep = set(names) | {REFERENCE, DEFAULT, BASE}
    return [m for m in methods if m.name in keep or m.control_of in keep]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("sens_peft", "transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    methods = select_methods(with_controls(METHODS), args.methods)
    check_budget(methods, args.grid)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = toy.build_tokenizer()
    overrides = {"steps": args.base_steps} if args.base_steps else {}
    cells = []
    scorer_sets: dict[str, dict[str, ql.Scorer]] = {}
    bases: dict[tuple[str, str], Any] = {}

    def run_one(seed: int, family: str, regime: str, kind: str) -> None:
        if family not in scorer_sets:
            tasks = families.get_family(family).tasks
            scorer_sets[family] = {"validation": ql.Scorer(tokenizer, tasks, "validation", args.val_n),
                                   "test": ql.Scorer(tokenizer, tasks, "test", args.test_n)}
        scorers = scorer_sets[family]
        trained = "A" if regime == "A2" else regime  # A2 merges the experts trained in regime A
        if (family, trained) not in bases:
            bases[family, trained] = families.pretrain_family_base(family, trained, progress=True,
                                                                   **overrides).eval()
        base = bases[family, trained]
        # experts are cached per base: a changed base (new digest) never reuses stale experts
        workdir = args.workdir / Path(str(base.name_or_path)).name
        root = ql.cell_root(workdir, family, trained, kind, seed, args.steps)
        if any(f"{family}/{regime}/{kind}".startswith(x) for x in args.exclude):
            return
        if args.cached_only and not all((root / t / "done.json").exists() for t in scorers["test"].tasks):
            logger.info("%s/%s/%s/seed%d: experts not trained, skipped (--cached-only)", family, regime, kind, seed)
            return
        t0 = time.perf_counter()
        cell = ql.prepare_cell(base, family, trained, kind, seed, workdir, tokenizer, scorers=scorers,
                               steps=args.steps)
        for part, part_scorers, part_root in cell_parts(cell, regime, scorers, root):
            res = run_cell(part, methods, args.grid, part_scorers, part_root, tokenizer)
            cells.append(res)
            r = res["methods"]
            logger.info("%s done in %.0f s: experts %s, TA %.1f, default %.1f, base %.1f", part.label(),
                        time.perf_counter() - t0, {t: round(a, 2) for t, a in res["expert_acc"]["test"].items()},
                        100 * r["TA"]["test"]["avg_norm"], 100 * r[DEFAULT]["test"]["avg_norm"],
                        100 * r[BASE]["test"]["avg_norm"])

    # seeds outermost: an interrupted run (Ctrl-C, SIGTERM) reports the cells done, every suite at its first seeds
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    todo = itertools.product(range(args.seeds), args.families, args.regimes, args.kinds)
    try:
        for seed, family, regime, kind in todo:
            run_one(seed, family, regime, kind)
    except KeyboardInterrupt:
        logger.warning("interrupted: reporting the %d cells done", len(cells))
        if not cells:
            return 1
    report = {
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "families": args.families, "regimes": args.regimes, "kinds": args.kinds,
        "seeds": sorted({int(c["cell"].rsplit("seed", 1)[1].split(".")[0]) for c in cells}),
        "grid": args.grid, "val_n": args.val_n, "test_n": args.test_n, "torch_threads": args.threads,
        "method_names": [m.name for m in methods], "default_setting": ql.lib_default_setting(),
        "sens_reading": ql.lib_sens_reading(),
        "cells": [{k: v for k, v in c.items()} for c in cells],
        "evals": sum(c["evals"] for c in cells),
        "tf_agreement": float(np.mean([c["tf_vs_generation_agreement"] for c in cells])),
    }
    report["aggregate"] = aggregate(cells, methods, args.resamples)
    report["per_regime"] = per_regime(cells, methods, args.resamples)
    report["wall_seconds"] = time.perf_counter() - start
    (args.out / f"{args.tag}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out / f"{args.tag}.md").write_text(md)
    plot(report, args.out / f"{args.tag}.png")
    print(md)
    logger.info("wrote %s/%s.{json,md,png}; wall time %.1f min", args.out, args.tag, report["wall_seconds"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
