"""Quality benchmark: does Sens-Merging beat its base method on the toy suite, and which reading is best?

Protocol (per seed; experts are trained once per seed and cached under ``--workdir``):

1. plain TA / TIES / DARE-TIES: grid over (density, λ); the validation-best setting is reported on test;
2. Sens+X for each X ∈ {TA, TIES, DARE-TIES} and each sens mode (task, cross, task+cross) with the default reading:
   T grid × a local λ grid around X's validation-best λ, at X's validation-best density;
3. the random-coefficient control for each X: c = K·softmax(N(0,1)/T) per (expert, layer), as many draws × λ as
   the Sens grid of one mode (same T list, same local λ grid), so a gain from searching alone shows up here too;
4. reading ablation on TA (one factor at a time around the default, at TA's best λ, wide T grid): α normalisation,
   alignment score and sign, τ normalisation, weight source, mode, granularity, the literal third-party reading;
5. beyond the paper: per-element importance merging (``importance`` method with |ΔW ⊙ G| maps) and
   sensitivity-guided TIES trimming (``trim_by="sensitivity"``), with and without Sens coefficients;
6. PEFT ``add_weighted_adapter`` (cat, linear, ties_svd, dare_ties_svd) on the same experts; mergekit (optional).

Everything is tuned on the validation split (normalised accuracy = accuracy ÷ the task's own expert accuracy,
averaged over tasks; answer log-likelihood breaks ties) and reported on the test split, with paired-bootstrap 95%
intervals over test items (resampled within each task and seed) for Sens+X − X and Sens+X − control.

Usage::

    python benchmarks/quality.py --seeds 3            # full run; writes benchmarks/results/quality.{json,md,png}
    python benchmarks/quality.py --quick              # 1 seed, tiny grid (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_lib as ql  # noqa: E402

from sens_peft.testing import toy  # noqa: E402

logger = logging.getLogger("quality")

SINGLE = "Single expert (val-picked)"
METHODS = {"TA": "task_arithmetic", "TIES": "ties", "DARE-TIES": "dare_ties"}
DEFAULT_READING = {"sens": "task+cross", "normalization": "mean1", "alignment": "cosine", "tau_norm": "exp_z",
                   "source": "theta", "mode": "after", "granularity": "layer"}

FULL = {
    "lam": {"task_arithmetic": [0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0],
            "ties": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5],
            "dare_ties": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5]},
    "density": {"task_arithmetic": [1.0], "ties": [0.2, 0.4, 0.7], "dare_ties": [0.3, 0.5, 0.7]},
    "T": [0.3, 1.0, 3.0, 10.0],
    "T_abl": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
    "local": [0.8, 1.0, 1.25],
}
QUICK = {
    "lam": {"task_arithmetic": [0.5, 0.8], "ties": [1.0], "dare_ties": [1.0]},
    "density": {"task_arithmetic": [1.0], "ties": [0.4], "dare_ties": [0.5]},
    "T": [1.0, 3.0],
    "T_abl": [0.1, 1.0],
    "local": [1.0],
}

# One factor at a time around DEFAULT_READING (stage 4).
ABLATIONS = {
    "normalization=l2": {"normalization": "l2"},
    "normalization=sum1": {"normalization": "sum1"},
    "normalization=zscore": {"normalization": "zscore"},
    "alignment=neg_l2": {"alignment": "neg_l2"},
    "alignment=neg_kl": {"alignment": "neg_kl"},
    "alignment=l2 (literal, tau sum1)": {"alignment": "l2", "tau_norm": "sum1"},
    "tau_norm=zscore": {"tau_norm": "zscore"},
    "tau_norm=mean1": {"tau_norm": "mean1"},
    "source=delta": {"source": "delta"},
    "source=adapter": {"source": "adapter"},
    "mode=during (adapter)": {"source": "adapter", "mode": "during"},
    "granularity=module_type": {"granularity": "module_type"},
    "granularity=projection": {"granularity": "projection"},
    "sens=task": {"sens": "task"},
    "sens=cross": {"sens": "cross"},
    "third-party reading (l2 alpha, l2 dist, tau sum1)": {"normalization": "l2", "alignment": "l2",
                                                         "tau_norm": "sum1"},
}
QUICK_ABLATIONS = ("normalization=l2", "alignment=neg_l2", "source=delta", "granularity=module_type")


def rnd(x: float) -> float:
    return float(f"{x:.4g}")


# ----------------------------------------------------------------------------------------------------------
# Runner: cached validation / test evaluations of settings
# ----------------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, data: ql.SeedData, base, scorers: dict[str, ql.Scorer], cache: Path, tokenizer):
        self.data, self.scorers, self.cache_path, self.tokenizer = data, scorers, cache, tokenizer
        self.mm = ql.MergedModel(base, list(data.deltas))
        self.cache: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
        self.norm = {s: ql.expert_acc(data, s) for s in scorers}
        self.evals = 0
        self.seconds = 0.0
        self._dirty = 0

    def flush(self) -> None:
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache))
        os.replace(tmp, self.cache_path)
        self._dirty = 0

    def _model(self, setting: dict[str, Any]):
        if "peft" in setting:
            ql.peft_weighted(self.data, setting["peft"], setting["lam"], setting.get("density"))
            return self.data.peft, {}
        merged, spread = ql.merged_deltas(setting, self.data)
        return self.mm.load(merged), spread

    def run(self, setting: dict[str, Any], split: str = "validation") -> dict[str, Any] | None:
        key = f"{split}|{ql.setting_key(setting)}"
        if key in self.cache:
            return self.cache[key]
        start = time.perf_counter()
        try:
            model, spread = self._model(setting)
        except ValueError as err:  # e.g. tau_norm=mean1 with non-positive row means
            logger.info("skip %s: %s", setting, err)
            self.cache[key] = None
            return None
        scores = self.scorers[split].score(model)
        out = ql.summarize(scores, self.norm[split])
        out["c_min"], out["c_max"] = spread.get("min"), spread.get("max")
        if split == "test":
            out["items"] = {t: ql.bits(v["correct"]) for t, v in scores.items()}
        self.cache[key] = out
        self.evals += 1
        self.seconds += time.perf_counter() - start
        self._dirty += 1
        if self._dirty >= 10:
            self.flush()
        return out

    def best(self, settings: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validation-best setting (normalised accuracy, then log-likelihood) and its validation summary."""
        scored = [(s, self.run(s)) for s in settings]
        scored = [(s, r) for s, r in scored if r is not None]
        if not scored:
            raise RuntimeError("no setting of this variant could be evaluated")
        return max(scored, key=lambda sr: (round(sr[1]["avg_norm"], 9), sr[1]["loglik"]))


def sens_setting(method: str, lam: float, density: float, T: float, **reading) -> dict[str, Any]:
    r = {**DEFAULT_READING, **reading}
    return {"coef": "sens", "method": method, "lam": rnd(lam), "density": density, "T": T, **r}


def run_seed(seed: int, args, grid, base, scorers, tokenizer) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = ql.prepare_seed(base, seed, args.workdir, toy.TASK_NAMES, tokenizer, steps=args.steps,
                           calib=args.calib, scorers=scorers)
    t_prep = time.perf_counter() - t0
    logger.info("seed %d: experts ready (%.0f s; training+calibration %.0f s). expert test acc %s, base %s", seed,
                t_prep, data.train_seconds, {k: round(v, 3) for k, v in ql.expert_acc(data, "test").items()},
                {t: round(float(v["correct"].mean()), 3) for t, v in data.base_scores["test"].items()})
    runner = Runner(data, base, scorers, args.workdir / f"seed{seed}" / "results.json", tokenizer)
    variants: dict[str, list[dict[str, Any]]] = {}
    family: dict[str, str] = {}

    def add(name: str, settings: list[dict[str, Any]], fam: str) -> None:
        variants[name] = settings
        family[name] = fam

    def progress(stage: str) -> None:
        logger.info("seed %d: %s done (%d evals, %.0f s of merging+scoring so far)", seed, stage, runner.evals,
                    runner.seconds)

    # 1. plain methods
    best_plain: dict[str, dict[str, Any]] = {}
    for label, method in METHODS.items():
        settings = [{"coef": "plain", "method": method, "lam": lam, "density": d}
                    for d in grid["density"][method] for lam in grid["lam"][method]]
        add(label, settings, "plain")
        best_plain[label], _ = runner.best(settings)
        if best_plain[label]["lam"] in (min(grid["lam"][method]), max(grid["lam"][method])):
            logger.warning("seed %d: %s's best λ %s is at the edge of its grid", seed, label, best_plain[label]["lam"])
    progress("plain grid")

    # 2-3. Sens (three modes) and the random control, per method
    local: dict[str, list[float]] = {}
    for label, method in METHODS.items():
        bp = best_plain[label]
        lams = sorted({rnd(bp["lam"] * f) for f in grid["local"]})
        local[label] = lams
        for mode in ("task+cross", "task", "cross"):
            name = f"Sens-{label}" if mode == "task+cross" else f"Sens-{label} [{mode}]"
            add(name, [sens_setting(method, lam, bp["density"], T, sens=mode) for T in grid["T"] for lam in lams],
                "sens")
            runner.best(variants[name])
        ctrl = [{"coef": "random", "method": method, "lam": lam, "density": bp["density"], "T": T, "draw": d}
                for d, T in enumerate(grid["T"]) for lam in lams]
        add(f"Control-{label}", ctrl, "control")
        runner.best(ctrl)
        progress(f"Sens + control for {label}")

    # 4. reading ablation on TA at its best λ
    lam_ta = best_plain["TA"]["lam"]
    abl_names = ABLATIONS if not args.quick else {k: ABLATIONS[k] for k in QUICK_ABLATIONS}
    add("TA ablation: default reading", [sens_setting("task_arithmetic", lam_ta, 1.0, T) for T in grid["T_abl"]],
        "ablation")
    runner.best(variants["TA ablation: default reading"])
    for abl, change in abl_names.items():
        add(f"TA ablation: {abl}", [sens_setting("task_arithmetic", lam_ta, 1.0, T, **change) for T in grid["T_abl"]],
            "ablation")
        runner.best(variants[f"TA ablation: {abl}"])
    progress("reading ablation")
    # Sens-TA with the reading picked on validation among all of the above (more search: compare with care)
    sens_all = [s for n, v in variants.items() if n.startswith(("Sens-TA", "TA ablation")) for s in v]
    add("Sens-TA (any reading, val-picked)", sens_all, "sens-any")

    # 5. beyond the paper
    ta_lams = grid["lam"]["task_arithmetic"]
    add("Importance-TA (c=1, ΔW⊙G maps)",
        [{"coef": "plain", "method": "importance", "lam": lam, "imp_source": "delta"} for lam in ta_lams], "beyond")
    add("Importance-TA (c=1, θ⊙G maps)",
        [{"coef": "plain", "method": "importance", "lam": lam, "imp_source": "theta"} for lam in ta_lams], "beyond")
    add("Importance-TA (c=1, mean abs G maps)",
        [{"coef": "plain", "method": "importance", "lam": lam, "imp_source": "grad"} for lam in ta_lams], "beyond")
    add("Importance-TA (c=1, shuffled θ⊙G maps: control)",
        [{"coef": "plain", "method": "importance", "lam": lam, "imp_source": "theta_perm"} for lam in ta_lams],
        "beyond")
    add("Sens-Importance-TA (ΔW⊙G maps)",
        [{**sens_setting("importance", lam, 1.0, T), "imp_source": "delta"} for T in grid["T"]
         for lam in local["TA"]], "beyond")
    add("Sens-Importance-TA (θ⊙G maps)",
        [{**sens_setting("importance", lam, 1.0, T), "imp_source": "theta"} for T in grid["T"]
         for lam in local["TA"]], "beyond")
    dties = grid["density"]["ties"]
    add("TIES trim_by=sensitivity (c=1, ΔW⊙G maps)",
        [{"coef": "plain", "method": "ties", "lam": lam, "density": d, "trim_by": "sensitivity",
          "imp_source": "delta"} for d in dties for lam in grid["lam"]["ties"]], "beyond")
    add("TIES trim_by=sensitivity (c=1, θ⊙G maps)",
        [{"coef": "plain", "method": "ties", "lam": lam, "density": d, "trim_by": "sensitivity",
          "imp_source": "theta"} for d in dties for lam in grid["lam"]["ties"]], "beyond")
    add("TIES trim_by=sensitivity (c=1, shuffled θ⊙G maps: control)",
        [{"coef": "plain", "method": "ties", "lam": lam, "density": d, "trim_by": "sensitivity",
          "imp_source": "theta_perm"} for d in dties for lam in grid["lam"]["ties"]], "beyond")
    for label, src in (("TA trim_by=magnitude (c=1)", None), ("TA trim_by=sensitivity (c=1, θ⊙G maps)", "theta"),
                       ("TA trim_by=sensitivity (c=1, shuffled θ⊙G maps: control)", "theta_perm")):
        extra = {"trim_by": "sensitivity", "imp_source": src} if src else {"trim_by": "magnitude"}
        add(label, [{"coef": "plain", "method": "trim_ta", "lam": lam, "density": d, **extra}
                    for d in dties for lam in ta_lams], "beyond")
    bp = best_plain["TIES"]
    add("Sens-TIES trim_by=sensitivity",
        [{**sens_setting("ties", lam, bp["density"], T), "trim_by": "sensitivity", "imp_source": "delta"}
         for T in grid["T"] for lam in local["TIES"]], "beyond")
    # reference: no merge at all, the single expert that scores best on validation (a hard per-model selection,
    # which is what very sharp Sens coefficients degenerate into)
    add("Single expert (val-picked)", [{"coef": "onehot", "method": "task_arithmetic", "lam": 1.0, "expert": k}
                                       for k in range(len(data.tasks))], "beyond")
    for name in [n for n, f in family.items() if f == "beyond"]:
        runner.best(variants[name])
    progress("beyond-the-paper variants")

    # 6. PEFT add_weighted_adapter
    add("PEFT cat", [{"peft": "cat", "lam": lam} for lam in ta_lams], "peft")
    add("PEFT linear", [{"peft": "linear", "lam": lam} for lam in ta_lams], "peft")
    add("PEFT ties_svd", [{"peft": "ties_svd", "lam": lam, "density": best_plain["TIES"]["density"]}
                          for lam in grid["lam"]["ties"]], "peft")
    add("PEFT dare_ties_svd", [{"peft": "dare_ties_svd", "lam": lam, "density": best_plain["DARE-TIES"]["density"]}
                               for lam in grid["lam"]["dare_ties"]], "peft")
    for name in [n for n, f in family.items() if f == "peft"]:
        runner.best(variants[name])
    if "qmerged" in data.peft.peft_config:
        data.peft.delete_adapter("qmerged")
    progress("PEFT add_weighted_adapter")

    # selections → test
    result: dict[str, Any] = {"seed": seed, "variants": {}, "curves": {}}
    for name, settings in variants.items():
        best, val = runner.best(settings)
        test = runner.run(best, "test")
        result["variants"][name] = {
            "family": family[name], "setting": best, "budget": len(settings),
            "val": {k: val[k] for k in ("avg_norm", "avg_acc", "loglik", "norm")},
            "test": {k: test[k] for k in ("avg_norm", "avg_acc", "loglik", "norm", "acc", "c_min", "c_max")},
            "items": test["items"],
        }
        # validation curve over T (best λ at each T)
        by_t: dict[float, float] = {}
        for s in settings:
            if "T" in s:
                r = runner.run(s)
                if r is not None:
                    by_t[s["T"]] = max(by_t.get(s["T"], -1.0), r["avg_norm"])
        if by_t:
            result["curves"][name] = sorted(by_t.items())
    runner.flush()

    # TF exact match vs generation (toy.predict) on the headline selections
    agree, total = 0, 0
    for name in ["TA", "TIES", "DARE-TIES", "Sens-TA", "Sens-TIES", "Sens-DARE-TIES"]:
        model, _ = runner._model(result["variants"][name]["setting"])
        gen = ql.generation_correct(model, tokenizer, scorers["test"])
        for t, arr in gen.items():
            tf = ql.unbits(result["variants"][name]["items"][t])
            agree += int((arr == tf).sum())
            total += arr.size
    result["tf_vs_generation_agreement"] = agree / max(total, 1)
    logger.info("seed %d: teacher-forced EM agrees with generation on %.4f of %d test items", seed,
                result["tf_vs_generation_agreement"], total)

    # the checks must never cost the grid: an error is recorded, not raised
    if seed == args.seed_list[0]:
        try:
            result["merge_adapters_check"] = check_against_merge_adapters(data, base, args.workdir / f"seed{seed}")
        except Exception as err:  # noqa: BLE001
            logger.warning("merge_adapters check failed: %r", err)
            result["merge_adapters_check"] = {"error": repr(err)}
    if args.mergekit and seed == args.seed_list[0]:
        try:
            result["mergekit"] = run_mergekit(data, base, runner, best_plain, args, tokenizer)
        except Exception as err:  # noqa: BLE001
            logger.warning("mergekit comparison failed: %r", err)
            result["mergekit"] = {"error": repr(err)}

    result["expert_acc"] = {s: ql.expert_acc(data, s) for s in scorers}
    result["base_acc"] = {s: {t: float(v["correct"].mean()) for t, v in data.base_scores[s].items()} for s in scorers}
    result["base_norm"] = {s: ql.summarize(data.base_scores[s], ql.expert_acc(data, s))["avg_norm"] for s in scorers}
    result["transfer"] = {k: v.tolist() for k, v in data.transfer.items()}
    result["alpha_theta_after"] = {t: r.group_dict() for t, r in zip(data.tasks, data.records[("theta", "after")])}
    result["evals"], result["eval_seconds"] = runner.evals, runner.seconds
    result["train_seconds"], result["seconds"] = data.train_seconds, time.perf_counter() - t0
    logger.info("seed %d finished in %.0f s (%d new evaluations)", seed, result["seconds"], runner.evals)
    return result


def check_against_merge_adapters(data: ql.SeedData, base, root: Path) -> dict[str, float]:
    """The fast path (ΔW + merge_deltas) equals ``merge_adapters(..., output="full")`` for Sens settings."""
    from peft import PeftModel

    from sens_peft.merging import merge_adapters

    out = {}
    for method, density in (("task_arithmetic", 1.0), ("ties", 0.4), ("dare_ties", 0.5)):
        setting = sens_setting(method, 0.7, density, 1.0)
        merged, _ = ql.merged_deltas(setting, data)
        peft = None
        for t in data.tasks:
            path = str(root / t / "adapter")
            if peft is None:
                peft = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=t)
            else:
                peft.load_adapter(path, adapter_name=t)
        report = merge_adapters(peft, data.tasks, method=method, density=density, scale=0.7, sens="task+cross",
                                temperature=1.0, normalization="mean1", alignment="cosine", granularity="layer",
                                output="full", sensitivities=data.records[("theta", "after")],
                                transferability=data.transfer["cosine"], seed=data.seed, device="cpu")
        params = dict(report.model.named_parameters())
        w0 = dict(base.named_parameters())
        diff = max(float((params[n].detach() - (w0[n].detach() + d)).abs().max()) for n, d in merged.items())
        out[method] = diff
    logger.info("fast path vs merge_adapters(output='full'): max |diff| %s", out)
    return out


def run_mergekit(data: ql.SeedData, base, runner: Runner, best_plain, args, tokenizer) -> dict[str, Any]:
    """mergekit task_arithmetic / ties / dare_ties on the experts merged to full, at our validation-best settings."""
    exe = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    if not exe.exists():
        return {"skipped": f"{exe} not found"}
    root = args.workdir / f"seed{data.seed}" / "mergekit"
    root.mkdir(parents=True, exist_ok=True)
    base_dir = root / "base"
    if not (base_dir / "config.json").exists():
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    for k, t in enumerate(data.tasks):
        d = root / f"full_{t}"
        if not (d / "config.json").exists():
            m = copy.deepcopy(base)
            params = dict(m.named_parameters())
            with torch.no_grad():
                for n, deltas in data.deltas.items():
                    params[n].add_(deltas[k])
            m.save_pretrained(d)
            tokenizer.save_pretrained(d)
    from transformers import LlamaForCausalLM

    out = {}
    names = {"TA": "task_arithmetic", "TIES": "ties", "DARE-TIES": "dare_ties"}
    for label, mk_method in names.items():
        bp = dict(best_plain[label])
        if mk_method == "task_arithmetic":
            params: dict[str, Any] = {"weight": bp["lam"]}
        else:
            # mergekit's normalize=True divides by the summed weights of the agreeing entries: the disjoint mean
            # of TIES, with no global λ on top, so the comparable setting of ours is λ = 1
            bp["lam"] = 1.0
            params = {"weight": 1.0, "density": bp["density"]}
        models = [{"model": str(root / f"full_{t}"), "parameters": params} for t in data.tasks]
        cfg = {"merge_method": mk_method, "base_model": str(base_dir), "models": models, "dtype": "float32"}
        if mk_method != "task_arithmetic":
            cfg["parameters"] = {"normalize": True}
        yml = root / f"{mk_method}.yml"
        yml.write_text(json.dumps(cfg))
        dest = root / f"out_{mk_method}"
        shutil.rmtree(dest, ignore_errors=True)
        proc = subprocess.run([str(exe), str(yml), str(dest), "--copy-tokenizer", "--allow-crimes"],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            out[label] = {"error": proc.stderr[-800:]}
            continue
        model = LlamaForCausalLM.from_pretrained(dest).eval()
        res = {}
        for split in ("validation", "test"):
            res[split] = ql.summarize(runner.scorers[split].score(model), runner.norm[split])["avg_norm"]
        ours, _ = ql.merged_deltas(bp, data)
        ours_res = ql.summarize(runner.scorers["test"].score(runner.mm.load(ours)), runner.norm["test"])["avg_norm"]
        mk_params, w0 = dict(model.named_parameters()), dict(base.named_parameters())
        diff = max(float((mk_params[n].detach() - w0[n].detach() - d).abs().max()) for n, d in ours.items())
        out[label] = {"setting": bp, "val_avg_norm": res["validation"], "test_avg_norm": res["test"],
                      "ours_test_avg_norm": ours_res, "max_abs_weight_diff_vs_ours": diff}
        logger.info("mergekit %s: %s", mk_method, out[label])
    return out


# ----------------------------------------------------------------------------------------------------------
# Aggregation and reports
# ----------------------------------------------------------------------------------------------------------


def aggregate(results: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    names = list(results[0]["variants"])
    summary: dict[str, Any] = {}
    for name in names:
        vs = [r["variants"][name] for r in results]
        summary[name] = {
            "family": vs[0]["family"], "budget": vs[0]["budget"],
            "test_avg_norm": [v["test"]["avg_norm"] for v in vs], "val_avg_norm": [v["val"]["avg_norm"] for v in vs],
            "test_avg_acc": [v["test"]["avg_acc"] for v in vs],
            "settings": [v["setting"] for v in vs],
            "c_range": [[v["test"]["c_min"], v["test"]["c_max"]] for v in vs],
        }
    items = {name: [{t: ql.unbits(b) for t, b in r["variants"][name]["items"].items()} for r in results]
             for name in names}
    norms = [r["expert_acc"]["test"] for r in results]

    def ci(a: str, b: str) -> dict[str, float]:
        return ql.paired_bootstrap(items[a], items[b], norms, resamples=resamples)

    comparisons = {}
    for label in METHODS:
        for name in sens_names(summary, label) + [f"Control-{label}"]:
            comparisons[f"{name} - {label}"] = ci(name, label)
        for name in sens_names(summary, label):
            comparisons[f"{name} - Control-{label}"] = ci(name, f"Control-{label}")
            if SINGLE in summary:
                comparisons[f"{name} - {SINGLE}"] = ci(name, SINGLE)
    shuffled = [n for n in names if "shuffled" in n and n.startswith("Importance")]
    for name in [n for n in names if n.startswith(("Importance-TA", "Sens-Importance-TA")) and "shuffled" not in n]:
        for other in shuffled + ([SINGLE] if SINGLE in summary else []):
            comparisons[f"{name} - {other}"] = ci(name, other)
    for name in [n for n in names if "trim_by=" in n and "shuffled" not in n]:
        ctrl = trim_control(name, names)
        for other in ([ctrl] if ctrl else []) + ([SINGLE] if SINGLE in summary else []):
            comparisons[f"{name} - {other}"] = ci(name, other)
    for name in [n for n, s in summary.items() if s["family"] in ("beyond", "peft")]:
        ref = reference_of(name)
        comparisons[f"{name} - {ref}"] = ci(name, ref)
        if ref == "TA" and "Sens" in name:
            comparisons[f"{name} - Control-TA"] = ci(name, "Control-TA")
    return {"variants": summary, "comparisons": comparisons}


def sens_names(summary: dict[str, Any], label: str) -> list[str]:
    """The Sens variants of one base method (the three modes, plus the any-reading pick for TA)."""
    return [n for n, s in summary.items() if s["family"] in ("sens", "sens-any")
            and (n == f"Sens-{label}" or n.startswith((f"Sens-{label} [", f"Sens-{label} (")))]


def trim_control(name: str, names) -> str | None:
    """The shuffled-map control of a trim variant: same base method (first word), shuffled maps."""
    prefix = name.split()[0].replace("Sens-", "")
    found = [n for n in names if "shuffled" in n and n.startswith(f"{prefix} trim")]
    return found[0] if found else None


def reference_of(name: str) -> str:
    low = name.lower()
    return "DARE-TIES" if "dare" in low else ("TIES" if "ties" in low else "TA")


def pm(values: list[float]) -> str:
    return ql.fmt_pm(values)


def ci_str(c: dict[str, float]) -> str:
    return f"{c['diff']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]"


def markdown(report: dict[str, Any]) -> str:
    agg = report["aggregate"]
    v, comp = agg["variants"], agg["comparisons"]
    seeds = report["seeds"]
    lines = [f"# Quality benchmark (toy suite, {len(seeds)} seed(s): {seeds})", "",
             f"Command: `{report['command']}`  ",
             f"Wall time: {report['wall_seconds'] / 60:.1f} min; new merge+score evaluations: {report['evals']}; "
             f"teacher-forced EM vs generation agreement on test: {report['tf_agreement']:.4f}", "",
             "Normalised accuracy (merged accuracy ÷ the task's own expert accuracy, mean over the 4 tasks), test "
             "split, mean ± std over seeds; hyper-parameters picked on the validation split. CIs: paired bootstrap "
             "over test items (95%), in points.", "",
             "## Headline: plain vs Sens (task+cross, default reading) vs random-coefficient control", "",
             "| method | plain | Sens | control | Sens − plain [95% CI] | Sens − control [95% CI] | "
             "budget plain / Sens / control |",
             "|---|---|---|---|---|---|---|"]
    for label in METHODS:
        s, c = f"Sens-{label}", f"Control-{label}"
        lines.append(f"| {label} | {pm(v[label]['test_avg_norm'])} | {pm(v[s]['test_avg_norm'])} | "
                     f"{pm(v[c]['test_avg_norm'])} | {ci_str(comp[f'{s} - {label}'])} | "
                     f"{ci_str(comp[f'{s} - {c}'])} | {v[label]['budget']} / {v[s]['budget']} / {v[c]['budget']} |")
    imp = [n for n in v if n.startswith(("Importance-TA", "Sens-Importance-TA")) and "shuffled" not in n]
    imp_ctrl = [n for n in v if "shuffled" in n and n.startswith("Importance")]
    trim = [n for n in v if "trim_by=" in n and "shuffled" not in n]
    trim_ctrl = [n for n in v if "shuffled" in n and " trim" in n]
    if (imp and imp_ctrl) or (trim and trim_ctrl):
        lines += ["", "## Per-element sensitivity (element maps) vs shuffled-map controls", "",
                  "`importance`: Σ_k c_k I_k ΔW_k / mean_k I_k per element; `trim_by=sensitivity`: TIES keeps the "
                  "top-density entries of I_k instead of |ΔW_k|. I_k = mean |w ⊙ g| from the expert's calibration "
                  "pass (w = θ = W0 + ΔW, or ΔW). The controls shuffle each map's entries within its tensor (same "
                  "values, no alignment with the weights) and get the same grid.", "",
                  "| variant | test | val | − base method [95% CI] | − shuffled-map control [95% CI] | "
                  "− single expert [95% CI] | budget | picked |", "|---|---|---|---|---|---|---|---|"]
        for group, ctrl in ((imp, imp_ctrl), (trim, trim_ctrl)):
            for name in group + ctrl:
                ref = reference_of(name)
                own_ctrl = trim_control(name, list(v)) if "trim" in name else (ctrl[0] if ctrl else None)
                vs_ctrl = comp.get(f"{name} - {own_ctrl}") if own_ctrl else None
                vs_single = comp.get(f"{name} - {SINGLE}")
                lines.append(f"| {name} | {pm(v[name]['test_avg_norm'])} | {pm(v[name]['val_avg_norm'])} | "
                             f"{ci_str(comp[f'{name} - {ref}'])} (vs {ref}) | {ci_str(vs_ctrl) if vs_ctrl else '—'} | "
                             f"{ci_str(vs_single) if vs_single else '—'} | {v[name]['budget']} | "
                             f"{'; '.join(_short(s) for s in v[name]['settings'])} |")
    lines += ["", "## Sens modes per method", "", "| variant | test | val | − plain [95% CI] | − control [95% CI] | "
              "− single expert [95% CI] | val-picked settings per seed |", "|---|---|---|---|---|---|---|"]
    for label in METHODS:
        for name in [n for n in sens_names(v, label) if "any reading" not in n] + [f"Control-{label}"]:
            picks = "; ".join(_short(s) for s in v[name]["settings"])
            vs_c = comp.get(f"{name} - Control-{label}")
            vs_s = comp.get(f"{name} - {SINGLE}")
            lines.append(f"| {name} | {pm(v[name]['test_avg_norm'])} | {pm(v[name]['val_avg_norm'])} | "
                         f"{ci_str(comp[f'{name} - {label}'])} | {ci_str(vs_c) if vs_c else '—'} | "
                         f"{ci_str(vs_s) if vs_s else '—'} | {picks} |")
    name = "Sens-TA (any reading, val-picked)"
    if name in v:
        lines.append(f"| {name} (budget {v[name]['budget']}) | {pm(v[name]['test_avg_norm'])} | "
                     f"{pm(v[name]['val_avg_norm'])} | {ci_str(comp[f'{name} - TA'])} | "
                     f"{ci_str(comp[f'{name} - Control-TA'])} | "
                     f"{ci_str(comp[f'{name} - {SINGLE}']) if f'{name} - {SINGLE}' in comp else '—'} | "
                     f"{'; '.join(_short(s) for s in v[name]['settings'])} |")
    lines += ["", "## Reading ablation (Sens-TA, one choice changed from the default, TA's best λ, T picked on val)",
              "", "| reading | val | test | c range at picked T | picked T per seed |", "|---|---|---|---|---|"]
    for name in [n for n in v if v[n]["family"] == "ablation"]:
        rng = v[name]["c_range"]
        lines.append(f"| {name.replace('TA ablation: ', '')} | {pm(v[name]['val_avg_norm'])} | "
                     f"{pm(v[name]['test_avg_norm'])} | {min(r[0] for r in rng):.2f}–{max(r[1] for r in rng):.2f} | "
                     f"{', '.join(str(s['T']) for s in v[name]['settings'])} |")
    lines += ["", "## Beyond the paper, PEFT and references", "", "| variant | test | val | − reference [95% CI] | "
              "picked settings |", "|---|---|---|---|---|"]
    for name in [n for n in v if v[n]["family"] in ("beyond", "peft")]:
        ref = reference_of(name)
        lines.append(f"| {name} | {pm(v[name]['test_avg_norm'])} | {pm(v[name]['val_avg_norm'])} | "
                     f"{ci_str(comp[f'{name} - {ref}'])} (vs {ref}) | "
                     f"{'; '.join(_short(s) for s in v[name]['settings'])} |")
    base_test = [r["base_norm"]["test"] for r in report["per_seed"]]
    lines += ["", f"Base model (no expert): {pm(base_test)} normalised test accuracy. Expert test accuracy per seed: "
              + "; ".join(json.dumps({t: round(a, 3) for t, a in r["expert_acc"]["test"].items()})
                          for r in report["per_seed"])]
    mk = [r.get("mergekit") for r in report["per_seed"] if r.get("mergekit")]
    if mk:
        lines += ["", f"mergekit (seed {report['per_seed'][0]['seed']}, at our validation-best plain settings, "
                  "test normalised accuracy, ours at the same setting, max |weight difference|): "
                  + json.dumps({k: ([round(x["test_avg_norm"] * 100, 1), round(x["ours_test_avg_norm"] * 100, 1),
                                     float(f"{x['max_abs_weight_diff_vs_ours']:.2e}")]
                                    if isinstance(x, dict) and "test_avg_norm" in x else x)
                                for k, x in mk[0].items()})]
    chk = report["per_seed"][0].get("merge_adapters_check")
    if chk:
        shown = {k: float(f"{x:.2e}") if isinstance(x, float) else x for k, x in chk.items()}
        lines += ["", f"Fast path vs `merge_adapters(output='full')` (Sens task+cross, T=1, λ=0.7): max |ΔW| "
                  f"difference {json.dumps(shown)}"]
    return "\n".join(lines) + "\n"


def _short(s: dict[str, Any]) -> str:
    keys = ("peft", "expert", "lam", "density", "T", "draw", "sens", "normalization", "alignment", "tau_norm", "source",
            "mode", "granularity")
    parts = []
    for k in keys:
        if k in s and not (k in DEFAULT_READING and s[k] == DEFAULT_READING[k]):
            parts.append(f"{k}={s[k]}")
    return ",".join(parts)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in report["per_seed"]:
        for name, pts in r["curves"].items():
            for T, val in pts:
                curves[name][T].append(val)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"TA": "C0", "TIES": "C1", "DARE-TIES": "C2"}
    plain = report["aggregate"]["variants"]
    ax = axes[0]
    for label, color in colors.items():
        for name, style in ((f"Sens-{label}", "-o"), (f"Control-{label}", ":x")):
            if name in curves:
                ts = sorted(curves[name])
                ax.plot(ts, [100 * np.mean(curves[name][t]) for t in ts], style, color=color, label=name)
        ax.axhline(100 * np.mean(plain[label]["val_avg_norm"]), color=color, ls="--", lw=1, label=f"{label} (plain)")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T (control: T of K·softmax(N(0,1)/T))")
    ax.set_ylabel("validation normalised accuracy (%), best λ per T, mean over seeds")
    ax.set_title("Sens-Merging vs plain and random control")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in [n for n in curves if n.startswith("TA ablation")]:
        ts = sorted(curves[name])
        ax.plot(ts, [100 * np.mean(curves[name][t]) for t in ts], "-o", ms=3,
                label=name.replace("TA ablation: ", ""))
    ax.axhline(100 * np.mean(plain["TA"]["val_avg_norm"]), color="k", ls="--", lw=1, label="TA (plain)")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_title("Sens-TA readings (TA's best λ)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def defaults_evidence(report: dict[str, Any]) -> dict[str, Any]:
    """Mean validation score of each ablation reading (the defaults are picked on validation, shown with test)."""
    v = report["aggregate"]["variants"]
    rows = {n.replace("TA ablation: ", ""): {"val": float(np.mean(v[n]["val_avg_norm"])),
                                            "test": float(np.mean(v[n]["test_avg_norm"])),
                                            "T": [s["T"] for s in v[n]["settings"]]}
            for n in v if v[n]["family"] == "ablation"}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["val"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="number of expert-training seeds (0..N-1)")
    p.add_argument("--quick", action="store_true", help="1 seed, tiny grid, few items (smoke test)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sens_peft_quality"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--val-n", type=int, default=200)
    p.add_argument("--test-n", type=int, default=300)
    p.add_argument("--steps", type=int, default=None, help="expert training steps (default: toy.train_expert's)")
    p.add_argument("--calib", type=int, default=32, help="calibration samples per expert")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--mergekit", action="store_true", help="also run mergekit (from --mergekit-venv) on seed 0")
    p.add_argument("--mergekit-venv", default="/work/mk-venv")
    p.add_argument("--toy-overrides", default="{}", help="JSON ToySettings overrides for the base (smoke tests)")
    p.add_argument("--tag", default="quality", help="output file stem under --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("sens_peft", "transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds = 1
        args.val_n, args.test_n = min(args.val_n, 100), min(args.test_n, 100)
    args.seed_list = list(range(args.seeds))
    grid = QUICK if args.quick else FULL
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = toy.build_tokenizer()
    base = toy.pretrain_base(**json.loads(args.toy_overrides))
    base.eval()
    # experts are cached per base: a changed toy (new digest) never reuses stale experts
    args.workdir = args.workdir / Path(str(getattr(base, "name_or_path", "") or "base")).name
    args.workdir.mkdir(parents=True, exist_ok=True)
    scorers = {"validation": ql.Scorer(tokenizer, toy.TASK_NAMES, "validation", args.val_n),
               "test": ql.Scorer(tokenizer, toy.TASK_NAMES, "test", args.test_n)}
    logger.info("base ready (%.0f s): %s", time.perf_counter() - start, getattr(base, "name_or_path", ""))
    results = [run_seed(seed, args, grid, base, scorers, tokenizer) for seed in args.seed_list]
    report = {
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seed_list, "grid": grid, "default_reading": DEFAULT_READING,
        "toy_settings": json.loads(args.toy_overrides), "base": str(getattr(base, "name_or_path", "")),
        "val_n": args.val_n, "test_n": args.test_n, "torch_threads": args.threads,
        "per_seed": [{k: v for k, v in r.items() if k != "variants"} | {"variants": {
            n: {k: x for k, x in d.items() if k != "items"} for n, d in r["variants"].items()}} for r in results],
        "evals": sum(r["evals"] for r in results),
        "tf_agreement": float(np.mean([r["tf_vs_generation_agreement"] for r in results])),
    }
    report["aggregate"] = aggregate(results, args.resamples)
    report["wall_seconds"] = time.perf_counter() - start
    report["defaults_evidence"] = defaults_evidence(report)
    (args.out / f"{args.tag}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out / f"{args.tag}.md").write_text(md)
    plot(report, args.out / f"{args.tag}.png")
    print(md)
    logger.info("wrote %s/%s.{json,md,png}; wall time %.1f min", args.out, args.tag, report["wall_seconds"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
