"""Building blocks of ``benchmarks/quality.py``: experts per seed (cached), fast scoring, coefficients, merges, stats.

Speed is what makes a grid of hundreds of merges per seed possible on two shared CPU cores:

* each expert's ΔW per module is computed once (fp32), and a merge is ``methods.merge_deltas`` per module with the
  coefficient vector of that module's group, added into one reusable evaluation model (no PEFT round trip);
* scoring is *teacher-forced exact match*: greedy decoding reproduces the answer iff, given the true prefix, the
  argmax at every answer position is the true token (and the end is EOS / pad). One forward pass over all items
  gives the same per-item verdict as ``toy.evaluate``'s generation (agreement is measured and reported) and the
  answer log-likelihood (the tie-breaker) for free.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sens_peft.coefficients import compute_coefficients
from sens_peft.groups import layer_group
from sens_peft.methods import MergeMethod, magnitude_trim_mask, merge_deltas, register_method
from sens_peft.store import (
    ProbeSet,
    SensitivityRecord,
    load_probe,
    load_sensitivity,
    save_probe,
    save_sensitivity,
)
from sens_peft.testing import toy

logger = logging.getLogger("quality")

ALIGNMENTS = ("cosine", "neg_l2", "neg_kl", "l2")
# (weight_source, mode) pairs measured per expert; element maps are kept for theta/delta (|w ⊙ G| of the full
# weight names, what merge.py's trim_by="sensitivity" and the importance method read for LoRA experts).
SOURCES = (("theta", "after"), ("delta", "after"), ("adapter", "after"), ("adapter", "during"))


class TrimmedTaskArithmetic(MergeMethod):
    """Benchmark-only method: TIES's per-tensor trim (by |ΔW| or by importance), then a plain weighted sum.

    The TA-side test of sensitivity-guided trimming: no sign election, no disjoint mean.
    """

    name = "trim_ta"
    description = "Benchmark-only: TIES's trim, then a plain weighted sum"
    uses = ("density", "trim_by")

    def combine(self, stacked, coefficients, ctx):
        density, trim_by, importance = ctx.params["density"], ctx.params["trim_by"], ctx.statistic("element_maps")
        if density < 1.0:
            scores = stacked.abs() if trim_by == "magnitude" else importance
            keep = torch.stack([magnitude_trim_mask(scores[k], density) for k in range(stacked.shape[0])])
            stacked = stacked * keep
        return (stacked * coefficients.reshape(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)


register_method(TrimmedTaskArithmetic)


def stable_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


class Scorer:
    """Teacher-forced exact match and answer log-likelihood per item, for every task of a split.

    Args:
        tokenizer: Toy tokenizer.
        tasks: Task names.
        split: ``validation`` or ``test``.
        n: Items per task (first ``n`` of the split).
        batch_size: Sequences per forward pass.
    """

    def __init__(self, tokenizer, tasks: Sequence[str], split: str, n: Optional[int], batch_size: int = 200):
        self.tasks = list(tasks)
        self.split = split
        self.batches: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.pairs: dict[str, list[tuple[str, str]]] = {}
        collate = toy.ToyCollator(tokenizer.pad_token_id)
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        for task in self.tasks:
            pairs = toy.task_splits(task)[split][:n]
            self.pairs[task] = pairs
            rows = [toy.encode_example(tokenizer, task, x, y) for x, y in pairs]
            self.batches[task] = [collate(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)]

    @torch.inference_mode()
    def score(self, model) -> dict[str, dict[str, Any]]:
        """``{task: {"correct": bool ndarray [n], "loglik": float}}``."""
        out = {}
        for task in self.tasks:
            correct, ll_sum, ll_n = [], 0.0, 0
            for batch in self.batches[task]:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                logits = logits[:, :-1]
                target = batch["labels"][:, 1:]
                scored = target != -100
                pred = logits.argmax(-1)
                ok = (pred == target) | ~scored
                # the last scored token is EOS: a pad prediction there also ends decoding with the same answer
                is_eos = scored & (target == self.eos)
                ok = ok | (is_eos & (pred == self.pad))
                correct.append(ok.all(dim=1).numpy())
                logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                ll_sum += float(logp[scored].sum())
                ll_n += int(scored.sum())
            out[task] = {"correct": np.concatenate(correct), "loglik": ll_sum / max(ll_n, 1)}
        return out


def generation_correct(model, tokenizer, scorer: Scorer) -> dict[str, np.ndarray]:
    """Per-item exact match by ``toy.predict`` (greedy generation), the toy suite's official metric."""
    out = {}
    for task in scorer.tasks:
        pairs = scorer.pairs[task]
        preds = toy.predict(model, task, [x for x, _ in pairs], tokenizer=tokenizer)
        out[task] = np.array([p == y for p, (_, y) in zip(preds, pairs)])
    return out


def summarize(scores: dict[str, dict[str, Any]], expert_acc: dict[str, float]) -> dict[str, Any]:
    """Accuracy, normalised accuracy (÷ own expert's accuracy on the split) and mean log-likelihood."""
    acc = {t: float(v["correct"].mean()) for t, v in scores.items()}
    norm = {t: acc[t] / expert_acc[t] if expert_acc[t] > 0 else 0.0 for t in acc}
    return {
        "acc": acc,
        "norm": norm,
        "avg_norm": float(np.mean(list(norm.values()))),
        "avg_acc": float(np.mean(list(acc.values()))),
        "loglik": float(np.mean([v["loglik"] for v in scores.values()])),
    }


def bits(arr: np.ndarray) -> str:
    return "".join("1" if x else "0" for x in arr)


def unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")


# ----------------------------------------------------------------------------------------------------------
# Experts of one seed
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SeedData:
    seed: int
    tasks: list[str]
    peft: Any  # PeftModel holding every expert adapter (named by task)
    deltas: dict[str, list[torch.Tensor]]  # full weight name -> K ΔW (fp32)
    records: dict[tuple[str, str], list[SensitivityRecord]]
    probes: list[ProbeSet]
    transfer: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> summary of own experts
    base_scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_seconds: float = 0.0
    w0: dict[str, torch.Tensor] = field(default_factory=dict)  # base weights of the adapted modules


def _train_one(base, task: str, seed: int, folder: Path, steps: Optional[int], calib: int, tokenizer) -> float:
    from sens_peft.config import SensitivityConfig
    from sens_peft.sensitivity.calibrate import compute_sensitivity
    from sens_peft.sensitivity.callback import SensitivityCallback

    start = time.perf_counter()
    cb = SensitivityCallback(SensitivityConfig(task=task, mode="during", seed=seed, probe_samples=16))
    kwargs = {} if steps is None else {"steps": steps}
    model = toy.train_expert(base, task, callbacks=[cb], output_dir=str(folder / "trainer"), seed=seed,
                             tokenizer=tokenizer, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder / "adapter"))
    cb.detach() if hasattr(cb, "detach") else None
    save_sensitivity(cb.record, folder / "sens_adapter_during.safetensors")
    save_probe(cb.probe, folder / "probe.safetensors")
    data = toy.task_dataset(task, "train", tokenizer)
    for source, mode in SOURCES:
        if mode != "after":
            continue
        cfg = SensitivityConfig(task=task, mode="after", weight_source=source, seed=seed, calibration_samples=calib,
                                element_maps=source in ("theta", "delta"), store_probe=False)
        record = compute_sensitivity(model, data, cfg)
        save_sensitivity(record, folder / f"sens_{source}_{mode}.safetensors")
    (folder / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return time.perf_counter() - start


def prepare_seed(base, seed: int, workdir: Path, tasks: Sequence[str], tokenizer, *, steps: Optional[int] = None,
                 calib: int = 32, scorers: dict[str, Scorer]) -> SeedData:
    """Train (or load cached) experts for ``seed``, their sidecars, transferability, ΔW and reference scores."""
    from peft import PeftModel

    from sens_peft.lora import delta_weight, lora_modules
    from sens_peft.transfer import transferability_for_adapters

    root = workdir / f"seed{seed}"
    train_seconds = 0.0
    for task in tasks:
        folder = root / task
        if not (folder / "done.json").exists():
            logger.info("seed %d: training expert %s", seed, task)
            secs = _train_one(base, task, seed, folder, steps, calib, tokenizer)
            logger.info("seed %d: expert %s trained + calibrated in %.0f s", seed, task, secs)
        train_seconds += json.loads((folder / "done.json").read_text())["seconds"]

    peft = None
    for task in tasks:
        path = str(root / task / "adapter")
        if peft is None:
            peft = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=task)
        else:
            peft.load_adapter(path, adapter_name=task)
    peft.eval()
    records = {sm: [load_sensitivity(root / t / f"sens_{sm[0]}_{sm[1]}.safetensors") for t in tasks]
               for sm in SOURCES}
    probes = [load_probe(root / t / "probe.safetensors") for t in tasks]

    cache = root / "transfer.json"
    transfer: dict[str, torch.Tensor] = {}
    if cache.exists():
        transfer = {k: torch.tensor(v) for k, v in json.loads(cache.read_text()).items()}
    for alignment in ALIGNMENTS:
        if alignment not in transfer:
            transfer[alignment] = transferability_for_adapters(
                peft, list(tasks), probes, alignment=alignment, device="cpu", vocab_size=peft.config.vocab_size)
    cache.write_text(json.dumps({k: v.tolist() for k, v in transfer.items()}))

    deltas: dict[str, list[torch.Tensor]] = {}
    for module in lora_modules(peft):
        factors = [module.factors(t) for t in tasks]
        if any(f is None for f in factors):
            raise RuntimeError(f"module {module.name} is not adapted by every expert")
        deltas[module.weight_name] = [delta_weight(module, f, torch.device("cpu")) for f in factors]

    base_params = dict(base.named_parameters())
    w0 = {n: base_params[n].detach().float().clone() for n in deltas}
    data = SeedData(seed, list(tasks), peft, deltas, records, probes, transfer, train_seconds=train_seconds, w0=w0)
    ref_cache = root / "reference_scores.json"
    if ref_cache.exists():
        ref = json.loads(ref_cache.read_text())
    else:
        ref = {}
        for split, scorer in scorers.items():
            own = {}
            for task in tasks:
                peft.set_adapter(task)
                s = scorer.score(peft)
                own[task] = {"correct": bits(s[task]["correct"]), "loglik": s[task]["loglik"]}
            with peft.disable_adapter():
                b = scorer.score(peft)
            ref[split] = {"experts": own, "base": {t: {"correct": bits(v["correct"]), "loglik": v["loglik"]}
                                                   for t, v in b.items()}}
        ref_cache.write_text(json.dumps(ref))
    for split in scorers:
        data.expert_scores[split] = {t: {"correct": unbits(v["correct"]), "loglik": v["loglik"]}
                                     for t, v in ref[split]["experts"].items()}
        data.base_scores[split] = {t: {"correct": unbits(v["correct"]), "loglik": v["loglik"]}
                                   for t, v in ref[split]["base"].items()}
    return data


def expert_acc(data: SeedData, split: str) -> dict[str, float]:
    return {t: float(v["correct"].mean()) for t, v in data.expert_scores[split].items()}


# ----------------------------------------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------------------------------------


def random_coefficients(num: int, groups: Sequence[str], temperature: float, draw_seed: int) -> dict[str, torch.Tensor]:
    """The random control: ``c[:, g] = K * softmax(N(0, 1) / T)`` per group, independent per group."""
    gen = torch.Generator().manual_seed(draw_seed)
    z = torch.randn(num, len(groups), generator=gen, dtype=torch.float64)
    c = num * torch.softmax(z / temperature, dim=0)
    return {g: c[:, i].float() for i, g in enumerate(groups)}


def coefficient_fn(setting: dict[str, Any], data: SeedData):
    """``name -> [K] coefficients`` for a setting (without λ), plus a summary of the spread of ``c``."""
    num = len(data.tasks)
    kind = setting.get("coef", "plain")
    if kind == "plain":
        ones = torch.ones(num)
        return (lambda name: ones), {"min": 1.0, "max": 1.0}
    if kind == "random":
        gran = setting.get("granularity", "layer")
        groups = sorted({layer_group(n, gran) for n in data.deltas})
        table = random_coefficients(num, groups, setting["T"], stable_int("ctrl", data.seed, setting["draw"]))
        vals = torch.stack(list(table.values()))
        return (lambda name: table[layer_group(name, gran)]), {"min": float(vals.min()), "max": float(vals.max())}
    if kind == "onehot":  # one expert alone (the "pick a single expert" reference)
        onehot = torch.zeros(num)
        onehot[int(setting["expert"])] = 1.0
        return (lambda name: onehot), {"min": 0.0, "max": 1.0}
    if kind == "sens":
        records = data.records[(setting.get("source", "theta"), setting.get("mode", "after"))]
        transfer = data.transfer[setting.get("alignment", "cosine")]
        table = compute_coefficients(
            records, transfer, expert_names=data.tasks, sens=setting.get("sens", "task+cross"),
            temperature=setting["T"], normalization=setting.get("normalization", "mean1"),
            granularity=setting.get("granularity", "layer"),
            tau_normalization=setting.get("tau_norm", "exp_z"))
        return table.for_name, {"min": float(table.values.min()), "max": float(table.values.max())}
    raise ValueError(f"unknown coefficient kind {kind!r}")


def importance_maps(setting: dict[str, Any], data: SeedData, name: str) -> Optional[list[torch.Tensor]]:
    """Per-element importance of each expert for one tensor.

    ``theta`` / ``delta``: the stored maps mean |w ⊙ g| (w = W0 + ΔW_k or ΔW_k). ``grad``: mean |g| itself,
    recovered exactly as the theta map ÷ |W0 + ΔW_k| (w is fixed during calibration). ``theta_perm``: the theta
    maps with their entries shuffled within each tensor (same values, no alignment with the weights): the control
    for per-element importance.
    """
    src = setting.get("imp_source")
    if not src:
        return None
    if src in ("theta", "delta"):
        return [r.element_maps[name] for r in data.records[(src, "after")]]
    maps = [r.element_maps[name] for r in data.records[("theta", "after")]]
    if src == "grad":
        return [m / (data.w0[name] + d).abs().clamp_min(1e-6) for m, d in zip(maps, data.deltas[name])]
    if src == "theta_perm":
        out = []
        for k, m in enumerate(maps):
            gen = torch.Generator().manual_seed(stable_int("perm", data.seed, name, k))
            flat = m.reshape(-1)
            out.append(flat[torch.randperm(flat.numel(), generator=gen)].reshape(m.shape))
        return out
    raise ValueError(f"unknown importance source {src!r}")


def merged_deltas(setting: dict[str, Any], data: SeedData) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    coef, spread = coefficient_fn(setting, data)
    out = {}
    for name, deltas in data.deltas.items():
        out[name] = merge_deltas(
            setting["method"], deltas, coef(name), density=setting.get("density", 1.0),
            scale=setting["lam"], seed=setting.get("dare_seed", data.seed), name=name,
            importance=importance_maps(setting, data, name), trim_by=setting.get("trim_by", "magnitude"))
    return out, spread


class MergedModel:
    """One evaluation model whose adapted weights are rewritten to ``W0 + merged ΔW`` for every setting."""

    def __init__(self, base, names: Sequence[str]):
        self.model = copy.deepcopy(base).eval()
        params = dict(self.model.named_parameters())
        self.params = {n: params[n] for n in names}
        self.w0 = {n: p.detach().clone() for n, p in self.params.items()}

    def load(self, merged: dict[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.w0[n] + merged[n])
        return self.model


# ----------------------------------------------------------------------------------------------------------
# PEFT add_weighted_adapter
# ----------------------------------------------------------------------------------------------------------


def peft_weighted(data: SeedData, combination: str, lam: float, density: Optional[float]) -> str:
    name = "qmerged"
    if name in data.peft.peft_config:
        data.peft.delete_adapter(name)
    kwargs: dict[str, Any] = {}
    if density is not None:
        kwargs["density"] = density
    torch.manual_seed(data.seed)  # PEFT's DARE draws from the global RNG
    data.peft.add_weighted_adapter(data.tasks, [lam] * len(data.tasks), name, combination_type=combination, **kwargs)
    data.peft.set_adapter(name)
    return name


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------


def paired_bootstrap(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]], norms: list[dict[str, float]],
                     *, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """95% interval of mean-over-seeds normalised-accuracy difference ``a - b`` (points), items resampled per task.

    Args:
        a, b: Per seed, ``{task: bool [n]}`` per-item correctness on the same items.
        norms: Per seed, ``{task: own expert accuracy}`` (held fixed).

    Returns:
        ``{"diff", "lo", "hi", "p_le0"}`` in normalised-accuracy points (×100).
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    point = 0.0
    for sa, sb, nm in zip(a, b, norms):
        tasks = list(sa)
        for t in tasks:
            d = (sa[t].astype(float) - sb[t].astype(float)) / (nm[t] if nm[t] > 0 else 1.0)
            idx = rng.integers(0, d.size, size=(resamples, d.size))
            total += d[idx].mean(1) / len(tasks)
            point += d.mean() / len(tasks)
    total /= len(a)
    point /= len(a)
    lo, hi = np.percentile(total, [2.5, 97.5])
    return {"diff": 100 * point, "lo": 100 * float(lo), "hi": 100 * float(hi), "p_le0": float((total <= 0).mean())}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def setting_key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True)


def fmt_pm(values: Sequence[float], scale: float = 100.0) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.1f} ± {s:.1f}"


def isfinite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
