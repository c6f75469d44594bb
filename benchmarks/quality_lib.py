"""Building blocks of ``benchmarks/quality.py``: the library adapter, experts per cell (cached), fast scoring,
statistics with their information-free controls, merges, and paired-bootstrap statistics.

A *cell* is one (family, regime, kind, seed): a base, K experts (LoRA or full) trained on the family's tasks,
their sensitivity sidecars and transferability matrix. Speed is what makes a grid of merges per cell possible on
two shared CPU cores:

* each expert's ΔW per tensor is computed once (fp32), and a merge is one library call per tensor, added into one
  reusable evaluation model (no PEFT round trip);
* scoring is *teacher-forced exact match*: greedy decoding reproduces the answer iff, given the true prefix, the
  argmax at every answer position is the true token (and the end is EOS / pad). One forward pass gives the same
  per-item verdict as ``toy.evaluate``'s generation (agreement is measured and reported) and the answer
  log-likelihood (the tie-breaker).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sens_peft.testing import families, toy

logger = logging.getLogger("quality")


def stable_int(*parts: Any) -> int:
    """A process-independent 63-bit seed from ``parts`` (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ==========================================================================================================
# Library adapter: every call from the benchmark into sens_peft goes through the functions of this section,
# so that a refactor of sens_peft.methods / sens_peft.merge is ported here and nowhere else.
# ==========================================================================================================


def lib_merge_tensor(method: str, deltas: Sequence[torch.Tensor], coefficients: torch.Tensor, *, density: float,
                     scale: float, seed: int, name: str, importance: Optional[Sequence[torch.Tensor]] = None,
                     trim_by: str = "magnitude", statistics: Optional[dict[str, Any]] = None,
                     **params: Any) -> torch.Tensor:
    """One tensor's merged delta (``scale * combine(deltas)``) by a registered merge method."""
    from sens_peft.methods import merge_deltas

    return merge_deltas(method, deltas, coefficients, density=density, scale=scale, seed=seed, name=name,
                        importance=importance, trim_by=trim_by, statistics=statistics, **params)


def lib_statistic(record, kind: str, name: str) -> Optional[torch.Tensor]:
    """An expert's captured statistic of one tensor as the merge engine reads it (Grams as means ``E[x xᵀ]``)."""
    from sens_peft.merging.plan import statistic_of

    return statistic_of(record, kind, name)


def lib_coefficients(records, transfer: torch.Tensor, tasks: Sequence[str], reading: dict[str, Any]):
    """Sens-Merging coefficients (without λ): ``(values [K, G], groups, name -> [K] lookup)``."""
    from sens_peft.coefficients import compute_coefficients

    table = compute_coefficients(records, transfer, expert_names=list(tasks), sens=reading["sens"],
                                 temperature=reading["T"], normalization=reading["normalization"],
                                 granularity=reading["granularity"], tau_normalization=reading["tau_norm"])
    return table.values.clone(), list(table.groups), table


def lib_group(name: str, granularity: str) -> str:
    """The coefficient group of a tensor name."""
    from sens_peft.groups import layer_group

    return layer_group(name, granularity)


def lib_default_setting() -> dict[str, Any]:
    """``MergeConfig()``'s choices as a benchmark setting (what a user gets with no arguments)."""
    from sens_peft.config import PROBES, MergeConfig, choose_method

    cfg = MergeConfig()
    if cfg.method is None:  # the benchmark's experts store every statistic and a probe set
        method, params = choose_method({"element_maps", "gram", "fisher", PROBES})
        cfg = dataclasses.replace(cfg, method=method, params=params)
    trim = "sensitivity" if cfg.trim_by in ("auto", "sensitivity") else "magnitude"  # every expert has maps here
    setting = {"method": cfg.method, "density": cfg.density, "trim_by": trim, "lam": cfg.resolved_scale(trim)}
    # the chosen method's own defaults (e.g. RegMean's shrinkage) are part of what "the default" is: a changed
    # default must not be served from the evaluation cache of the old one
    own = {k: v for k, v in cfg.method_params().items() if k not in setting and isinstance(v, (int, float, str))}
    setting["defaults"] = dict(sorted(own.items()))
    if cfg.sens is not None:
        setting.update({**lib_sens_reading(), "coef": "sens", "sens": cfg.sens, "T": cfg.temperature})
    return setting


def lib_sens_reading() -> dict[str, Any]:
    """The reading of the paper's method the library recommends (``MergeConfig``'s defaults), sens task+cross."""
    from sens_peft.config import MergeConfig

    cfg = MergeConfig()
    return {"sens": "task+cross", "normalization": cfg.normalization, "tau_norm": cfg.tau_normalization,
            "alignment": cfg.alignment, "granularity": cfg.granularity}


def lib_callback(task: str, seed: int):
    """The sensitivity callback of a benchmark expert: the calibration pass after training, with element maps,
    input Grams (RegMean) and Fisher maps."""
    from sens_peft.config import SensitivityConfig
    from sens_peft.sensitivity.callback import SensitivityCallback

    return SensitivityCallback(SensitivityConfig(task=task, mode="after", seed=seed, element_maps=True,
                                                 gram="full", fisher=True, probe_samples=16,
                                                 calibration_samples=32))


def lib_save_sidecars(record, probe, folder: Path) -> None:
    from sens_peft.store import save_probe, save_sensitivity

    save_sensitivity(record, folder / "sensitivity.safetensors")
    save_probe(probe, folder / "probe.safetensors")


def lib_load_sidecars(folder: Path):
    from sens_peft.store import load_probe, load_sensitivity

    return load_sensitivity(folder / "sensitivity.safetensors"), load_probe(folder / "probe.safetensors")


def lib_lora_deltas(peft, tasks: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """``{full weight name: [ΔW_k]}`` of every LoRA module adapted by all ``tasks`` (fp32, CPU)."""
    from sens_peft.lora import delta_weight, lora_modules

    out = {}
    for module in lora_modules(peft):
        factors = [module.factors(t) for t in tasks]
        if any(f is None for f in factors):
            raise RuntimeError(f"module {module.name} is not adapted by every expert")
        out[module.weight_name] = [delta_weight(module, f, torch.device("cpu")) for f in factors]
    return out


def lib_transfer_lora(peft, tasks: Sequence[str], probes, alignment: str) -> torch.Tensor:
    from sens_peft.transfer import transferability_for_adapters

    return transferability_for_adapters(peft, list(tasks), probes, alignment=alignment, device="cpu",
                                        vocab_size=peft.config.vocab_size)


def lib_transfer_full(models: Sequence[Any], probes, alignment: str, vocab_size: int) -> torch.Tensor:
    from sens_peft.transfer import transferability_for_models

    return transferability_for_models(lambda i: models[i], len(models), probes, alignment=alignment, device="cpu",
                                      vocab_size=vocab_size)


def lib_merge_adapters_default(peft, tasks: Sequence[str], records, transfer, probes=None) -> Any:
    """The public API with no merge arguments: ``merge_adapters(..., output="full")`` (the LoRA default row); the
    sidecars a user's folders would hold are passed explicitly (the adapters are given by name)."""
    from sens_peft.merge import merge_adapters

    report = merge_adapters(copy.deepcopy(peft), list(tasks), output="full", sensitivities=records,
                            transferability=transfer, probes=probes, device="cpu")
    return report.model


def lib_merge_models_default(base_dir: Path, expert_dirs: Sequence[Path], out_dir: Path, records,
                             transfer, probes=None) -> Any:
    """The public API with no merge arguments for full experts: ``merge_models`` folder to folder, loaded back."""
    import shutil

    from transformers import LlamaForCausalLM

    from sens_peft.merge import merge_models

    shutil.rmtree(out_dir, ignore_errors=True)
    merge_models(base_dir, list(expert_dirs), out_dir, sensitivities=records, transferability=transfer,
                 probes=probes, device="cpu", progress=False)
    return LlamaForCausalLM.from_pretrained(out_dir).eval()


# ==========================================================================================================
# Scoring
# ==========================================================================================================


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
        self.n_items = len(next(iter(self.pairs.values()))) if self.pairs else 0

    def subset(self, tasks: Sequence[str]) -> Scorer:
        """The same scorer on ``tasks`` only (their batches shared, not rebuilt)."""
        view = copy.copy(self)
        view.tasks = list(tasks)
        view.batches = {t: self.batches[t] for t in tasks}
        view.pairs = {t: self.pairs[t] for t in tasks}
        return view

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


# ==========================================================================================================
# Statistics and their information-free controls
# ==========================================================================================================


@dataclass(frozen=True)
class Statistic:
    """A per-expert statistic a data-aware method reads, and its information-free version.

    Args:
        load: ``(cell, key) -> value`` (e.g. the element maps of one tensor, a coefficient table of a reading).
        shuffle: ``(value, seed) -> value`` with the same values and no alignment with the weights/experts
            (the control a method reading this statistic is compared with).
    """

    load: Callable[[Cell, Any], Any]
    shuffle: Callable[[Any, int], Any]


STATISTICS: dict[str, Statistic] = {}


def register_statistic(kind: str, load: Callable[[Cell, Any], Any], shuffle: Callable[[Any, int], Any]) -> None:
    """Declare a statistic (e.g. ``"gram"`` for RegMean's per-module input Gram matrices, ``"fisher"``): a method
    that lists it in ``uses`` gets a control entry that reads ``shuffle(load(...))`` instead."""
    STATISTICS[kind] = Statistic(load, shuffle)


def _permute_within(t: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = t.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=gen)].reshape(t.shape)


def _load_element_maps(cell: Cell, name: str) -> list[torch.Tensor]:
    maps = []
    for k, r in enumerate(cell.records):
        if name not in r.element_maps:
            raise KeyError(f"expert {cell.tasks[k]} ({cell.label()}) has no element map for {name!r}; "
                           f"it has {sorted(r.element_maps)[:3]}...")
        maps.append(r.element_maps[name])
    return maps


def _shuffle_element_maps(maps: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Each map's entries permuted within its tensor (independently per expert)."""
    return [_permute_within(m, stable_int(seed, k)) for k, m in enumerate(maps)]


def _load_sens_table(cell: Cell, reading_key: str):
    reading = json.loads(reading_key)
    values, groups, _ = lib_coefficients(cell.records, cell.transfer[reading["alignment"]], cell.tasks, reading)
    return values, groups


def _shuffle_sens_table(table, seed: int):
    """Per group, the K coefficients assigned to the experts in a random order (same values, same spread)."""
    values, groups = table
    gen = torch.Generator().manual_seed(seed)
    out = values.clone()
    for g in range(values.shape[1]):
        out[:, g] = values[torch.randperm(values.shape[0], generator=gen), g]
    return out, groups


def _load_records_statistic(kind: str) -> Callable[[Cell, str], Optional[list[torch.Tensor]]]:
    """The experts' statistic ``kind`` of one tensor, or None when no expert has one for it (e.g. no Gram for a
    tensor that is no Linear's weight); an expert lacking what the others have is an error."""
    def load(cell: Cell, name: str) -> Optional[list[torch.Tensor]]:
        values = [lib_statistic(r, kind, name) for r in cell.records]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise KeyError(f"{cell.label()}: some experts have no {kind!r} statistic for {name!r}")
        return values

    return load


def _permute_grams(grams: Optional[list[torch.Tensor]], seed: int) -> Optional[list[torch.Tensor]]:
    """Each Gram's input features permuted (``P G Pᵀ``, independently per expert): the same spectrum and scale,
    positive semi-definite, no alignment with the weights' input columns."""
    if grams is None:
        return None
    out = []
    for k, g in enumerate(grams):
        perm = torch.randperm(g.shape[-1], generator=torch.Generator().manual_seed(stable_int(seed, k)))
        out.append(g[perm][:, perm] if g.dim() == 2 else g[perm])
    return out


def _shuffle_fisher(maps: Optional[list[torch.Tensor]], seed: int) -> Optional[list[torch.Tensor]]:
    return None if maps is None else _shuffle_element_maps(maps, seed)


GRAM_SKETCH_RANK = 8  # the toy's 128 / 256-wide inputs at k = 8 keep 1/16 / 1/32: a 7B's 4096 / 11008 at k = 256


def _load_lowrank_grams(cell: Cell, name: str) -> Optional[list[torch.Tensor]]:
    """Each expert's mean Gram as ``gram="lowrank"`` would have stored it: the exact diagonal plus the rank-k
    Nystrom factor of the streamed sketch ``Y = G @ omega`` (the callback's seeded ``omega`` and factorisation,
    applied here to the stored full Gram; inputs no wider than k stay full, as in the callback)."""
    from sens_peft.regmean import lowrank_gram, nystrom_factor
    from sens_peft.sensitivity.stats import CalibrationStats

    grams = _load_records_statistic("gram")(cell, name)
    if grams is None:
        return None
    sketcher = CalibrationStats([], gram="lowrank", gram_rank=GRAM_SKETCH_RANK, seed=cell.seed)
    out = []
    for g in grams:
        if g.dim() != 2 or g.shape[0] <= GRAM_SKETCH_RANK:
            out.append(g)
            continue
        omega = sketcher.omega(g.shape[0])
        factor = nystrom_factor((g @ omega).float(), omega)
        out.append(lowrank_gram(factor, torch.diagonal(g).double()).float())
    return out


register_statistic("element_maps", _load_element_maps, _shuffle_element_maps)
register_statistic("gram_lowrank", _load_lowrank_grams, _permute_grams)
register_statistic("gram", _load_records_statistic("gram"), _permute_grams)
register_statistic("fisher", _load_records_statistic("fisher"), _shuffle_fisher)
register_statistic("sens_table", _load_sens_table, _shuffle_sens_table)


# ==========================================================================================================
# Cells: the experts of one (family, regime, kind, seed)
# ==========================================================================================================


@dataclass
class Cell:
    family: str
    regime: str
    kind: str  # "lora" or "full"
    seed: int
    tasks: list[str]
    base: Any
    deltas: dict[str, list[torch.Tensor]]  # tensor name -> K ΔW (fp32)
    records: list[Any]  # one SensitivityRecord per expert (theta, after, with element maps)
    transfer: dict[str, torch.Tensor]  # alignment -> [K, K]
    peft: Any = None  # LoRA: a PeftModel holding every expert adapter (named by task)
    expert_scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> {task: scores}
    base_scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_seconds: float = 0.0
    root: Optional[Path] = None  # where the experts are saved (``<root>/<task>/model``)
    shuffled: frozenset = frozenset()
    part: str = ""  # which experts of the seed's cell this one merges ("" = all; "p01" = experts 0 and 1)
    _stats: dict = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.family}/{self.regime}/{self.kind}/seed{self.seed}" + (f".{self.part}" if self.part else "")

    def stat(self, kind: str, key: Any) -> Any:
        """A statistic (cached), shuffled when this cell is a control view for ``kind``."""
        ck = (kind, key)
        if ck not in self._stats:
            value = STATISTICS[kind].load(self, key)
            if kind in self.shuffled:
                value = STATISTICS[kind].shuffle(value, stable_int("shuffle", self.seed, kind, key))
            self._stats[ck] = value
        return self._stats[ck]

    def with_shuffled(self, kinds: Sequence[str]) -> Cell:
        """A view of this cell whose statistics ``kinds`` are shuffled (the information-free control)."""
        key = frozenset(kinds)
        views = self._stats.setdefault(("views",), {})
        if key not in views:
            views[key] = dataclasses.replace(self, shuffled=key, _stats={})
        return views[key]


def sub_cell(cell: Cell, idx: Sequence[int], regime: str) -> Cell:
    """The cell restricted to the experts ``idx`` (their tasks, ΔW, sidecars, transferability, reference scores),
    reported under ``regime``: regime A2 merges regime A's experts two at a time."""
    idx = list(idx)
    tasks = [cell.tasks[i] for i in idx]
    return dataclasses.replace(
        cell, regime=regime, tasks=tasks, part="p" + "".join(str(i) for i in idx),
        deltas={n: [d[i] for i in idx] for n, d in cell.deltas.items()},
        records=[cell.records[i] for i in idx],
        transfer={a: t[idx][:, idx] for a, t in cell.transfer.items()},
        expert_scores={s: {t: v[t] for t in tasks} for s, v in cell.expert_scores.items()},
        base_scores={s: {t: v[t] for t in tasks} for s, v in cell.base_scores.items()},
        shuffled=frozenset(), _stats={})


def expert_acc(cell: Cell, split: str) -> dict[str, float]:
    return {t: float(v["correct"].mean()) for t, v in cell.expert_scores[split].items()}


def _train_expert(base, task: str, cell_dir: Path, kind: str, regime: str, seed: int, steps: Optional[int],
                  tokenizer) -> float:
    start = time.perf_counter()
    folder = cell_dir / task
    cb = lib_callback(task, seed)
    kwargs = families.expert_kwargs(regime, lora=kind == "lora", family=families.family_of(task))
    if steps is not None:
        kwargs["steps"] = steps
    model = toy.train_expert(base, task, callbacks=[cb], output_dir=str(folder / "trainer"), seed=seed,
                             lora=kind == "lora", tokenizer=tokenizer, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder / "model"))
    if cb.record is None or cb.probe is None:
        raise RuntimeError(f"{folder}: the sensitivity callback produced no record/probe")
    lib_save_sidecars(cb.record, cb.probe, folder)
    seconds = time.perf_counter() - start
    (folder / "done.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def _full_deltas(base, models: Sequence[Any], names: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    params0 = dict(base.named_parameters())
    out = {}
    for name in names:
        ps = [dict(m.named_parameters())[name].detach().float() for m in models]
        out[name] = [p - params0[name].detach().float() for p in ps]
    return out


def cell_root(workdir: Path, family: str, regime: str, kind: str, seed: int, steps: Optional[int]) -> Path:
    """A cell's cache folder; named by its training recipe too, so a changed recipe never reuses old experts."""
    recipe = {"train": families.expert_kwargs(regime, kind == "lora", family), "steps": steps,
              # logging-only settings do not change the experts: left out so that caches stay valid
              "callback": repr(lib_callback("x", seed).config).replace(", log_scores=True", "")}
    tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return workdir / family / regime / kind / f"seed{seed}-{tag}"


def prepare_cell(base, family: str, regime: str, kind: str, seed: int, workdir: Path, tokenizer, *,
                 scorers: dict[str, Scorer], steps: Optional[int] = None,
                 alignments: Sequence[str] = ("cosine",)) -> Cell:
    """Train (or load cached) the experts of one cell, their sidecars, transferability, ΔW and reference scores.

    Full experts are merged on every tensor their sidecars hold an element map for (all parameters of the toy
    Llama: embeddings, norms and head included); LoRA experts on their adapted modules.
    """
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tasks = list(families.get_family(family).tasks)
    root = cell_root(workdir, family, regime, kind, seed, steps)
    train_seconds = 0.0
    for task in tasks:
        if not (root / task / "done.json").exists():
            logger.info("%s: training expert %s", root, task)
            secs = _train_expert(base, task, root, kind, regime, seed, steps, tokenizer)
            logger.info("%s: expert %s trained + calibrated in %.0f s", root, task, secs)
        train_seconds += json.loads((root / task / "done.json").read_text())["seconds"]
    loaded = [lib_load_sidecars(root / t) for t in tasks]
    records, probes = [r for r, _ in loaded], [p for _, p in loaded]

    transfer_cache = root / "transfer.json"
    transfer = ({k: torch.tensor(v) for k, v in json.loads(transfer_cache.read_text()).items()}
                if transfer_cache.exists() else {})
    peft = None
    if kind == "lora":
        for task in tasks:
            path = str(root / task / "model")
            if peft is None:
                peft = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=task)
            else:
                peft.load_adapter(path, adapter_name=task)
        peft.eval()
        deltas = lib_lora_deltas(peft, tasks)
        for a in alignments:
            if a not in transfer:
                transfer[a] = lib_transfer_lora(peft, tasks, probes, a)
    else:
        models = [LlamaForCausalLM.from_pretrained(root / t / "model").eval() for t in tasks]
        names = [n for n in records[0].element_maps if n in dict(base.named_parameters())]
        if not names:
            raise RuntimeError(f"{root}: the full experts' sidecars hold no element maps of base parameters")
        deltas = _full_deltas(base, models, names)
        for a in alignments:
            if a not in transfer:
                transfer[a] = lib_transfer_full(models, probes, a, base.config.vocab_size)
        del models
    transfer_cache.write_text(json.dumps({k: v.tolist() for k, v in transfer.items()}))
    cell = Cell(family, regime, kind, seed, tasks, base, deltas, records, transfer, peft,
                train_seconds=train_seconds, root=root)
    _reference_scores(cell, root / "reference_scores.json", scorers)
    return cell


def _reference_scores(cell: Cell, cache: Path, scorers: dict[str, Scorer]) -> None:
    """Each expert alone on its own task, and the base, per split (cached as bit strings)."""
    ref = json.loads(cache.read_text()) if cache.exists() else {}
    # keyed by split and item count: a run with other --val-n/--test-n must not normalise by another subset
    keys = {split: f"{split}:{scorer.n_items}" for split, scorer in scorers.items()}
    for split, scorer in scorers.items():
        legacy = ref.get(split)
        if keys[split] not in ref and legacy and len(next(iter(legacy["base"].values()))["correct"]) == scorer.n_items:
            ref[keys[split]] = legacy
    missing = [split for split in scorers if keys[split] not in ref]
    if missing:
        mm = MergedModel(cell.base, list(cell.deltas))
        for split in missing:
            scorer = scorers[split]
            own = {}
            for k, task in enumerate(cell.tasks):
                model = mm.load({n: d[k] for n, d in cell.deltas.items()})
                s = scorer.score(model)
                own[task] = {"correct": bits(s[task]["correct"]), "loglik": s[task]["loglik"]}
            b = scorer.score(mm.load({n: torch.zeros_like(d[0]) for n, d in cell.deltas.items()}))
            ref[keys[split]] = {"experts": own, "base": {t: {"correct": bits(v["correct"]), "loglik": v["loglik"]}
                                                         for t, v in b.items()}}
        cache.write_text(json.dumps(ref))
    for split in scorers:
        cell.expert_scores[split] = {t: {"correct": unbits(v["correct"]), "loglik": v["loglik"]}
                                     for t, v in ref[keys[split]]["experts"].items()}
        cell.base_scores[split] = {t: {"correct": unbits(v["correct"]), "loglik": v["loglik"]}
                                   for t, v in ref[keys[split]]["base"].items()}


# ==========================================================================================================
# Merges
# ==========================================================================================================


def coefficient_lookup(setting: dict[str, Any], cell: Cell) -> tuple[Callable[[str], torch.Tensor], dict]:
    """``name -> [K]`` coefficients (without λ) for a setting, and the spread of ``c`` (min / max)."""
    num = len(cell.tasks)
    if setting.get("coef", "plain") == "plain":
        ones = torch.ones(num)
        return (lambda name: ones), {"c_min": 1.0, "c_max": 1.0}
    if setting["coef"] != "sens":
        raise ValueError(f"unknown coefficient kind {setting['coef']!r}")
    reading = {k: setting[k] for k in ("sens", "normalization", "tau_norm", "alignment", "granularity", "T")}
    values, groups = cell.stat("sens_table", json.dumps(reading, sort_keys=True))
    index = {g: i for i, g in enumerate(groups)}
    gran = reading["granularity"]
    ones = torch.ones(num)

    def lookup(name: str) -> torch.Tensor:
        g = lib_group(name, gran)
        return values[:, index[g]] if g in index else ones

    return lookup, {"c_min": float(values.min()), "c_max": float(values.max())}


def merge_fast(setting: dict[str, Any], cell: Cell) -> tuple[dict[str, torch.Tensor], dict]:
    """Merged ΔW per tensor for a setting (method, λ, density, trim_by, coefficients), via the library."""
    coef, spread = coefficient_lookup(setting, cell)
    needs_maps = setting["method"] == "importance" or setting.get("trim_by") == "sensitivity"
    kinds = {"regmean": "gram", "fisher": "fisher"}  # the statistic each data-aware method reads
    needs = kinds.get(setting["method"])  # the statistic the method reads ...
    kind = setting.get("gram_stat") or needs  # ... and where it comes from (gram_stat: a sketched-Gram variant)
    params = {"shrinkage": setting["shrinkage"]} if "shrinkage" in setting else {}
    out = {}
    for name, deltas in cell.deltas.items():
        stats = cell.stat(kind, name) if kind else None
        out[name] = lib_merge_tensor(
            setting["method"], deltas, coef(name), density=setting.get("density", 1.0), scale=setting["lam"],
            seed=cell.seed, name=name, importance=cell.stat("element_maps", name) if needs_maps else None,
            trim_by=setting.get("trim_by", "magnitude"), statistics={needs: stats} if stats is not None else None,
            **params)
    return out, spread


def merge_default(setting: dict[str, Any], cell: Cell) -> tuple[Any, dict]:
    """What a user gets with no merge arguments, through the public API (``merge_adapters`` / ``merge_models``).

    Falls back to the fast path with ``MergeConfig()``'s choices (and says so in the spread dict) if the public
    call fails, so that one library error does not cost the grid of the whole cell.
    """
    try:
        probes = _load_probes(cell, None)
        if cell.kind == "lora":
            return lib_merge_adapters_default(cell.peft, cell.tasks, cell.records, cell.transfer["cosine"],
                                              probes), {}
        return lib_merge_models_default(Path(cell.base.name_or_path), [cell.root / t / "model" for t in cell.tasks],
                                        cell.root / "default_merge", cell.records, cell.transfer["cosine"],
                                        probes), {}
    except Exception as err:  # noqa: BLE001
        logger.warning("%s: the public API default merge failed (%r); using the fast path", cell.label(), err)
        merged, spread = merge_fast(lib_default_setting(), cell)
        return merged, {**spread, "api_fallback": 1.0}


def peft_weighted(cell: Cell, combination: str, lam: float, density: Optional[float]) -> Any:
    """PEFT ``add_weighted_adapter`` on the cell's LoRA experts; returns the PeftModel with the merge active."""
    name = "qmerged"
    if name in cell.peft.peft_config:
        cell.peft.delete_adapter(name)
    kwargs: dict[str, Any] = {}
    if density is not None:
        kwargs["density"] = density
    torch.manual_seed(cell.seed)  # PEFT's DARE draws from the global RNG
    cell.peft.add_weighted_adapter(cell.tasks, [lam] * len(cell.tasks), name, combination_type=combination,
                                   **kwargs)
    cell.peft.set_adapter(name)
    return cell.peft


def _load_probes(cell: Cell, key: Any) -> list[Any]:
    return [lib_load_sidecars(cell.root / t)[1] for t in cell.tasks]


def _shuffle_probe_answers(probes: list[Any], seed: int) -> list[Any]:
    """Every probe row's answer (its scored tokens) replaced by a random row's answer, over every task's probe (rows
    with as many scored tokens): the same prompts and answers, no link between a prompt and its answer."""
    from sens_peft.store import ProbeSet

    rows = [(k, i) for k, p in enumerate(probes) for i in range(len(p))]
    spans = {(k, i): probes[k].labels[i] != -100 for k, i in rows}
    gen = torch.Generator().manual_seed(seed)
    out = [ProbeSet(p.input_ids.clone(), p.attention_mask.clone(), p.labels.clone(), dict(p.metadata)) for p in probes]
    for length in sorted({int(m.sum()) for m in spans.values()}):
        same = [r for r in rows if int(spans[r].sum()) == length]
        for (k, i), j in zip(same, torch.randperm(len(same), generator=gen).tolist()):
            answer = probes[same[j][0]].labels[same[j][1]][spans[same[j]]]
            out[k].labels[i][spans[(k, i)]] = answer
            out[k].input_ids[i][spans[(k, i)]] = answer
    return out


register_statistic("probes", _load_probes, _shuffle_probe_answers)


def merge_probe_fit_permuted(setting: dict[str, Any], cell: Cell) -> tuple[dict[str, torch.Tensor], dict]:
    """The control of ``probe_fit`` with the same knobs and no information: the same fit, then its fitted table
    permuted over (expert, group) cells — the same coefficient values and spread, assigned at random."""
    return merge_probe_fit(setting, cell, permute=True)


def merge_probe_fit(setting: dict[str, Any], cell: Cell, permute: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """``probe_fit`` (its library fit hook) on the cell's deltas and probes (``permute``: the fitted table's
    values permuted over its cells, seeded per cell)."""
    from sens_peft.config import MergeConfig
    from sens_peft.merging.fitting import delta_logits, fitting_mode
    from sens_peft.methods import FitProblem, get_method

    own = {k: v for k, v in setting.items() if k not in ("method", "lam")}
    cfg = MergeConfig(method="probe_fit", scale=setting["lam"], seed=cell.seed, trim_by="magnitude", params=own)
    params = {**cfg.method_params(), "scale": setting["lam"]}
    idx = list(range(len(cell.tasks)))

    kinds = get_method("probe_fit").needed_statistics(params)  # its base method's (RegMean: the Grams)

    def merge(name: str, coeffs: torch.Tensor) -> torch.Tensor:
        stats = {kind: cell.stat(kind, name) for kind in kinds}
        stats = {kind: value for kind, value in stats.items() if value is not None}  # tensors no Linear reads
        return lib_merge_tensor("probe_fit", cell.deltas[name], coeffs, density=cfg.density, scale=1.0,
                                seed=cell.seed, name=name, statistics=stats or None, **own)

    problem = FitProblem(experts=list(cell.tasks), tensors={n: idx for n in cell.deltas},
                         deltas=lambda n: cell.deltas[n], merge=merge,
                         coefficients=lambda n: torch.full((len(idx),), float(setting["lam"])),
                         logits=delta_logits(cell.base, {n: n for n in cell.deltas}),
                         probes=cell.stat("probes", "all"), params=params)
    with fitting_mode(cell.base, torch.device("cpu")):
        table = get_method("probe_fit").fit(problem).table
    if permute:
        gen = torch.Generator().manual_seed(stable_int("permute_fit", cell.seed, cell.label()))
        flat = table.values.flatten()
        table = dataclasses.replace(table, values=flat[torch.randperm(flat.numel(), generator=gen)].view_as(
            table.values))
    merged = {n: merge(n, table.for_name(n)) for n in cell.deltas}
    return merged, {"c_min": float(table.values.min()), "c_max": float(table.values.max())}


class MergedModel:
    """One evaluation model whose merged weights are rewritten to ``W0 + merged ΔW`` for every setting."""

    def __init__(self, base, names: Sequence[str]):
        self.model = copy.deepcopy(base).eval()
        params = dict(self.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"MergedModel: the base has no parameters {missing[:3]} (of {len(missing)})")
        self.params = {n: params[n] for n in names}
        self.w0 = {n: p.detach().clone() for n, p in self.params.items()}

    def load(self, merged: dict[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.w0[n] + merged[n])
        return self.model


# ==========================================================================================================
# Statistics
# ==========================================================================================================


def paired_bootstrap(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]], norms: list[dict[str, float]],
                     *, groups: Optional[Sequence[Any]] = None, resamples: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """95% interval of the normalised-accuracy difference ``a - b`` (points), items resampled within each task.

    The statistic is the mean over groups (suites) of the mean over a group's cells (seeds) of the mean over
    tasks of ``(correct_a - correct_b) / expert accuracy``; each cell's items are resampled independently.

    Args:
        a, b: Per cell, ``{task: bool [n]}`` per-item correctness on the same items.
        norms: Per cell, ``{task: own expert accuracy}`` (held fixed).
        groups: Per cell, its group (suite); default: one group.
        resamples: Bootstrap resamples.
        seed: Resampling seed.

    Returns:
        ``{"diff", "lo", "hi", "p_le0"}`` in normalised-accuracy points (×100).
    """
    groups = list(groups) if groups is not None else [0] * len(a)
    if not (len(a) == len(b) == len(norms) == len(groups)):
        raise ValueError(f"paired_bootstrap: {len(a)}, {len(b)}, {len(norms)}, {len(groups)} cells differ")
    count = {g: groups.count(g) for g in set(groups)}
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    point = 0.0
    for sa, sb, nm, g in zip(a, b, norms, groups):
        w = 1.0 / (len(count) * count[g] * len(sa))
        for t in sa:
            d = (sa[t].astype(float) - sb[t].astype(float)) / (nm[t] if nm[t] > 0 else 1.0)
            idx = rng.integers(0, d.size, size=(resamples, d.size))
            total += w * d[idx].mean(1)
            point += w * d.mean()
    lo, hi = np.percentile(total, [2.5, 97.5])
    return {"diff": 100 * point, "lo": 100 * float(lo), "hi": 100 * float(hi), "p_le0": float((total <= 0).mean())}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else 0.0)


def setting_key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True)


# ==========================================================================================================
# mergekit (optional, from its own virtual environment)
# ==========================================================================================================

MERGEKIT_PYTHON = Path("/work/mk-venv/bin/python")

_MK_WORKER = r'''
import json, sys
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
opts = dict(device="cpu", copy_tokenizer=False, lazy_unpickle=False, quiet=True)
try:
    options = MergeOptions(**opts)
except Exception:
    opts.pop("quiet")
    options = MergeOptions(**opts)
for line in sys.stdin:
    job = json.loads(line)
    try:
        run_merge(MergeConfiguration.model_validate(job["config"]), job["out"], options=options)
        print(json.dumps({"ok": True}), flush=True)
    except Exception as err:  # reported to the parent, which skips that setting
        print(json.dumps({"ok": False, "error": repr(err)[-600:]}), flush=True)
'''


def mergekit_available(python: Path = MERGEKIT_PYTHON) -> bool:
    """Whether ``python`` exists and imports mergekit (checked once per process)."""
    import subprocess

    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", "import mergekit"], capture_output=True).returncode == 0


class MergekitWorker:
    """One long-lived mergekit process (its import costs seconds) that merges one YAML config per request."""

    def __init__(self, python: Path = MERGEKIT_PYTHON):
        self.python, self.proc = python, None

    def merge(self, config: dict[str, Any], out: Path) -> None:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([str(self.python), "-c", _MK_WORKER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps({"config": config, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline() or '{"ok": false, "error": "mergekit worker died"}')
        if not reply["ok"]:
            raise ValueError(f"mergekit failed on {out}: {reply['error']}")


MERGEKIT = MergekitWorker()


def merge_mergekit(setting: dict[str, Any], cell: Cell) -> tuple[Any, dict]:
    """Full experts merged by mergekit's ``run_merge`` (``setting["mk"]``: task_arithmetic or ties) from the
    saved expert folders; TA: ``weight = λ``, TIES: mergekit's disjoint mean (``normalize: true``) × ``lambda``."""
    import shutil

    from transformers import LlamaForCausalLM

    if cell.kind != "full" or cell.root is None:
        raise ValueError("mergekit rows merge saved full fine-tunes only")
    method = setting["mk"]
    params: dict[str, Any] = {"weight": setting["lam"]} if method == "task_arithmetic" else {
        "weight": 1.0, "density": setting["density"]}
    config = {"merge_method": method, "base_model": str(cell.base.name_or_path), "dtype": "float32",
              "models": [{"model": str(cell.root / t / "model"), "parameters": params} for t in cell.tasks],
              "parameters": ({"normalize": False} if method == "task_arithmetic"
                             else {"normalize": True, "lambda": setting["lam"]})}
    out = cell.root / "mergekit_out"
    shutil.rmtree(out, ignore_errors=True)
    MERGEKIT.merge(config, out)
    model = LlamaForCausalLM.from_pretrained(out).eval()
    shutil.rmtree(out, ignore_errors=True)
    return model, {}
