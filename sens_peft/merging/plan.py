"""The merge plan: everything decided before a tensor is merged, shared by :func:`~sens_peft.merging.merge_adapters`
and :func:`~sens_peft.merging.merge_models`.

:func:`plan_merge` resolves the settings the method decides (``trim_by="auto"``, the default scale), loads the
sidecars the merge needs (sensitivity records for the coefficients and for the method's statistics, probes for the
transferability), computes the coefficient table, and returns a frozen :class:`MergePlan`. The engines read an
expert's captured statistic of a tensor through :func:`statistic_of` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config import AUTO_METHODS, PROBES, MergeConfig, auto_requirements, choose_method
from ..errors import MergeError, SidecarError
from ..methods import get_method
from ..validation import check_output_dtype, check_path_list, check_probe

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

__all__ = ["MergePlan", "MergeReport", "expert_names", "plan_merge", "resolve_config", "statistic_of",
           "statistics_for"]

# How each statistic kind is stored in a sensitivity sidecar (the key prefix of its tensors).
_SIDECAR_PREFIX = {"element_maps": "element.", "gram": "gram.", "fisher": "fisher."}


@dataclass
class MergeReport:
    """What a merge did.

    Attributes:
        config: The merge configuration used (settings resolved).
        coefficients: The final coefficient table (c per expert and group, incl. weights and scale).
        experts: Expert names, in order.
        output_dir: Folder written (None when nothing was saved).
        adapter_name: Name of the new adapter (``output="lora"``), else None.
        seconds: Wall time of the merge.
        peak_rss_mb: Peak resident memory of the process so far (``ru_maxrss``), in MB.
        transfer: The K×K transferability matrix used, if any.
        model: The PeftModel holding the new adapter (``output="lora"``) or the merged base model (``"full"``);
            None for ``merge_models``.
        sources: Where each expert came from (folder, or ``adapter:<name>``).
        details: Extra facts (ranks, shard files, counts of merged / copied tensors).
    """

    config: MergeConfig
    coefficients: Any
    experts: list[str]
    output_dir: Optional[Path]
    adapter_name: Optional[str]
    seconds: float
    peak_rss_mb: Optional[float]
    transfer: Optional[torch.Tensor]
    model: Any = None
    sources: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergePlan:
    """What every tensor of one merge shares.

    Attributes:
        config: The resolved configuration (``trim_by`` and ``scale`` decided).
        experts: Expert names. folders: Their folders (None for adapters given by name).
        records: Sensitivity records (None when the merge needs none). transfer: The K×K matrix, if used.
        table: The coefficient table. needs: The statistic kinds the method needs with these settings.
        fit: What a model-in-the-loop method's :meth:`~sens_peft.methods.MergeMethod.fit` reported (its table then
            replaced the planned one), else None.
    """

    config: MergeConfig
    experts: list[str]
    folders: list[Optional[Path]]
    records: Optional[list]
    transfer: Optional[torch.Tensor]
    table: Any
    needs: tuple[str, ...]
    fit: Optional[dict[str, Any]] = None

    @property
    def method(self):
        return get_method(self.config.method)

    def params(self) -> dict[str, Any]:
        return self.config.method_params()

    def statistics_summary(self) -> dict[str, tuple[str, dict[str, Optional[int]]]]:
        """For the merge card: each statistic kind the method read, and per expert how many samples (or, for
        Grams, tokens of the first module) it averages."""
        out = {}
        for kind in self.needs:
            unit = "tokens" if kind == "gram" else "samples"
            counts = {}
            for name, record in zip(self.experts, self.records or [None] * len(self.experts)):
                count = None
                if record is not None and hasattr(record, "statistic_count"):
                    first = next(iter(record.grams), None) if kind == "gram" else None
                    count = record.statistic_count(kind, first)
                counts[name] = count
            out[kind] = (unit, counts)
        return out

    def statistics(self, name: str, idx: Sequence[int]) -> dict[str, list[torch.Tensor]]:
        return statistics_for(self.records, name, idx, self.needs, self.method.optional_statistics, self.experts)

    def tensor_params(self, name: str, idx: Sequence[int]) -> dict[str, Any]:
        """Every method parameter for tensor ``name`` merged from experts ``idx``: the per-expert ``densities``
        of those experts (per-tensor ones from ``tensor_settings``, else ``MergeConfig.densities``)."""
        params = self.params()
        densities = params.get("densities")
        per_tensor = self._per_tensor(name, idx).get("densities")
        if per_tensor is not None:
            densities = per_tensor
        elif densities is not None:
            densities = [densities[k] for k in idx]
        return {**params, "densities": densities}

    def _per_tensor(self, name: str, idx: Sequence[int]) -> dict[str, Any]:
        settings = self.config.tensor_settings
        if not settings:
            return {}
        from ..tensor_settings import tensor_values

        try:
            return tensor_values(settings, name, idx)
        except ValueError as err:
            raise MergeError(str(err)) from err

    def coefficients(self, name: str) -> torch.Tensor:
        """``[K]`` coefficients of tensor ``name``: the table's, times the per-tensor weights of
        ``tensor_settings`` (when it holds weights)."""
        table = self.table.for_name(name)
        weights = self._per_tensor(name, range(len(self.experts))).get("weights")
        return table if weights is None else table * torch.tensor(weights, dtype=table.dtype)

    def tensor_kwargs(self, name: str, idx: Sequence[int], device: Optional[torch.device] = None,
                      statistics: Optional[dict[str, list[torch.Tensor]]] = None) -> dict[str, Any]:
        """The keyword arguments of ``merge_deltas`` / ``merge_streamed`` for tensor ``name`` merged from experts
        ``idx``: every method parameter, and the needed statistics (fp32 on ``device``; element maps as
        ``importance``, without which a TIES trim is by magnitude; ``statistics``: :meth:`statistics` of the
        tensor when the caller loaded them already)."""
        loaded = statistics if statistics is not None else self.statistics(name, idx)
        stats = {kind: [m.to(device=device, dtype=torch.float32) if device is not None else m for m in maps]
                 for kind, maps in loaded.items()}
        importance = stats.pop("element_maps", None)
        params = self.tensor_params(name, idx)
        return {**params, "trim_by": params["trim_by"] if importance is not None else "magnitude",
                "importance": importance, "statistics": stats, "name": name}


def resolve_config(config: Optional[MergeConfig], config_kwargs: dict[str, Any]) -> MergeConfig:
    """``config`` with ``config_kwargs`` applied (or a new one from them)."""
    if config is None:
        return MergeConfig(**config_kwargs)
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config must be a MergeConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **config_kwargs) if config_kwargs else config


# Which sidecar attribute holds each statistic kind, and the SensitivityConfig option that records it.
_KIND_SOURCE = {"element_maps": ("element_maps", "element_maps=True"), "gram": ("grams", "gram='full'"),
                "fisher": ("fisher", "fisher=True")}


def statistic_of(record, kind: str, name: str) -> Optional[torch.Tensor]:
    """Expert ``record``'s captured statistic ``kind`` of tensor ``name`` (canonical weight name), or None.

    The one place the engines read captured statistics through: ``"element_maps"`` (per element ``mean |w*g|``),
    ``"fisher"`` (per element ``E[g²]``), ``"gram"`` (the *mean* input Gram ``E[x xᵀ]`` of the Linear owning the
    weight, ``[in, in]``, or its diagonal ``[in]``: the stored token sum divided by the token count, so that every
    expert weighs the same whatever the size of its calibration set).
    """
    if record is None:
        return None
    getter = getattr(record, "statistic", None)
    if not callable(getter):
        return record.element_maps.get(name) if kind == "element_maps" else None
    value = getter(kind, name)
    if value is not None and kind == "gram":
        tokens = record.statistic_count("gram", name)
        if not tokens:
            raise MergeError(f"the input Gram of {name!r} has no token count in its sidecar; re-record it")
        value = value / float(tokens)
    return value


def statistics_for(records, name: str, idx: Sequence[int], kinds: Sequence[str],
                   optional: Sequence[str] = (), experts: Optional[Sequence[str]] = None
                   ) -> dict[str, list[torch.Tensor]]:
    """The statistics ``kinds`` of tensor ``name`` for the experts ``idx``; MergeError naming the one lacking it.

    A kind in ``optional`` that no expert has for this tensor is left out (the method documents its fallback).
    """
    out: dict[str, list[torch.Tensor]] = {}
    for kind in kinds:
        values = [statistic_of(records[k] if records is not None else None, kind, name) for k in idx]
        if kind in optional and all(v is None for v in values):
            continue
        for k, value in zip(idx, values):
            if value is None:
                option = _KIND_SOURCE.get(kind, (kind, f"{kind}=True"))[1]
                raise MergeError(
                    f"the merge needs the captured statistic {kind!r} of tensor {name!r} from every expert; expert "
                    f"{experts[k] if experts is not None else '#' + str(k)!r} has none (record it with SensitivityConfig({option}), or pick a method or settings that "
                    "do not need it, e.g. trim_by='magnitude')"
                )
        out[kind] = values
    return out


def _sidecar_kinds(item) -> set[str]:
    """The statistic kinds a sidecar (record or path/folder) holds, without loading its tensors."""
    from safetensors import safe_open

    from ..store import SENSITIVITY_FILE, SensitivityRecord

    if isinstance(item, SensitivityRecord):
        return {kind for kind in _SIDECAR_PREFIX if statistic_available(item, kind)}
    path = Path(item)
    path = path / SENSITIVITY_FILE if path.is_dir() else path
    if not path.is_file():
        return set()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
    except Exception:  # an unreadable sidecar is reported by the real load, with its file name
        return set()
    return {kind for kind, prefix in _SIDECAR_PREFIX.items() if any(key.startswith(prefix) for key in keys)}


def statistic_available(record, kind: str) -> bool:
    """Whether a loaded record holds any statistic of ``kind``."""
    attribute = _KIND_SOURCE.get(kind, (None,))[0]
    return attribute is not None and bool(getattr(record, attribute, None))


def _untuned_sum_hint(cfg: MergeConfig) -> str:
    # task arithmetic's own λ is 1, the plain sum of the task vectors: on the quality benchmark's 24 suites that
    # untuned sum kept 8.5 % of the experts' accuracy, the average (λ = 1/K) 17.1 %, λ tuned on validation 20.2 %
    if cfg.method != "task_arithmetic" or cfg.scale is not None:
        return ""
    return ("; with scale=None that is the sum of the task vectors (λ 1): pass scale= (1/K averages; tune it on "
            "validation)")


def resolve_settings(cfg: MergeConfig, sensitivities, folders: Sequence[Optional[PathLike]],
                     probes_usable: bool = False) -> MergeConfig:
    """The settings the method decides from what every expert has stored (``method=None``, ``trim_by="auto"``),
    then the scale. ``probes_usable``: every expert has a probe set and the merge can run the model on them (what
    the default's first choice, probe-fitted RegMean, needs besides the Grams)."""
    sources = list(sensitivities) if sensitivities is not None else list(folders)
    available: set[str] = set()
    if sources and all(s is not None for s in sources):
        kinds = [_sidecar_kinds(s) for s in sources]
        available = set.intersection(*kinds) if kinds else set()
    if cfg.method is None:
        cfg = _auto_method(cfg, available | ({PROBES} if probes_usable else set()))
    updates = get_method(cfg.method).resolve(cfg.method_params(), available)
    if cfg.trim_by == "auto" and updates.get("trim_by"):
        logger.info("trim_by='auto': %s trims by %s", cfg.method, updates["trim_by"])
    cfg = dataclasses.replace(cfg, **updates)
    return dataclasses.replace(cfg, scale=cfg.resolved_scale())


def _auto_label(method: str, params: dict[str, Any]) -> str:
    return f"{method} ({', '.join(f'{k}={v!r}' for k, v in params.items())})" if params else method


def _auto_method(cfg: MergeConfig, available: set[str]) -> MergeConfig:
    """``cfg`` with the method ``method=None`` resolves to; a fallback from the preferred choice is a warning that
    says what was missing."""
    method, params = choose_method(available)
    preferred = _auto_label(*AUTO_METHODS[0])
    chosen = _auto_label(method, params)
    stats = sorted(available - {PROBES}) or "none"
    if chosen != preferred:  # the user asked for the default and gets a fallback: say so, and why
        missing = sorted(auto_requirements(*AUTO_METHODS[0]) - available)
        resolved = dataclasses.replace(cfg, method=method, params=params)
        logger.warning("method=None: merging with %s, not the default %s: %s missing (statistics every expert has: "
                       "%s; SensitivityCallback stores Grams unless gram=None, and probe sets unless "
                       "store_probe=False)%s", chosen, preferred, _missing_text(missing), stats,
                       _untuned_sum_hint(resolved))
    else:
        logger.info("method=None: merging with %s (statistics every expert has: %s; probe sets: yes)", chosen, stats)
    return dataclasses.replace(cfg, method=method, params=params)


def _missing_text(missing: Sequence[str]) -> str:
    parts = [f"{kind!r} statistics" for kind in missing if kind != PROBES]
    if PROBES in missing:
        parts.append("probe sets the merge can fit on (every expert's probe.safetensors, or probes=, within the fit's "
                     "memory limit)")
    return " and ".join(parts)


def probes_present(probes, folders: Sequence[Optional[PathLike]]) -> bool:
    """Whether every expert has a probe set: ``probes`` given (no None), or a ``probe.safetensors`` in every folder
    (nothing is loaded)."""
    from ..store import PROBE_FILE

    if probes is not None:
        items = list(probes)
        return bool(items) and all(p is not None for p in items)
    return bool(folders) and all(f is not None and (Path(f) / PROBE_FILE).is_file() for f in folders)


def sens_parts(config: MergeConfig) -> tuple[bool, bool]:
    """Whether the coefficients use the task factor and the cross-task factor."""
    sens = config.sens
    return sens in ("task", "task+cross"), sens in ("cross", "task+cross")


def expert_names(folders: Sequence[PathLike]) -> list[str]:
    """Adapter-safe names from folder names: dots are not allowed in PEFT module keys; duplicates get ``_2``..."""
    names: list[str] = []
    for folder in folders:
        stem = Path(folder).resolve().name or "expert"
        name = re.sub(r"[^0-9A-Za-z_-]", "_", stem)
        if name in "lora_" or name.isdigit():
            name = f"expert_{name}"  # PEFT warns on names that are substrings of "lora_"
        candidate, i = name, 2
        while candidate in names:
            candidate, i = f"{name}_{i}", i + 1
        names.append(candidate)
    return names


def _load_sidecars(items, folders: list[Optional[Path]], experts: list[str], *, kind: str, filename: str,
                   load, passthrough: type, pass_hint: str, missing_hint: str) -> list:
    """One sidecar per expert: from explicit ``items`` (objects or paths) or from each expert's folder."""
    if items is not None:
        items = check_path_list(items, kind)
        if len(items) != len(experts):
            raise MergeError(f"{kind} has {len(items)} entries for {len(experts)} experts {experts}")
        paths = [None] * len(items)
    else:
        items, paths = [None] * len(experts), []
        for name, folder in zip(experts, folders):
            if folder is None:
                raise MergeError(f"expert {name!r} was given as a loaded adapter name, so its {filename} is unknown; "
                                 f"{pass_hint}")
            path = folder / filename
            if not path.is_file():
                raise MergeError(f"expert {name!r}: {path} is missing; {missing_hint}")
            paths.append(path)
    out = []
    for name, item, path in zip(experts, items, paths):
        try:
            out.append(item if isinstance(item, passthrough) else load(item if path is None else path))
        except SidecarError as err:
            raise MergeError(f"expert {name!r}: {err}") from err
    return out


def load_records(sensitivities, folders: list[Optional[Path]], experts: list[str], config: MergeConfig,
                 needs: Sequence[str]) -> Optional[list]:
    """The experts' sensitivity records when the coefficients or the method's statistics need them, else None."""
    from ..store import SENSITIVITY_FILE, SensitivityRecord, load_sensitivity

    need_task, _ = sens_parts(config)
    if sensitivities is None and not (need_task or needs):
        return None
    need = f"sens={config.sens!r}" if need_task else f"method {config.method!r} (needs {list(needs)})"
    records = _load_sidecars(
        sensitivities, folders, experts, kind="sensitivities", filename=SENSITIVITY_FILE, load=load_sensitivity,
        passthrough=SensitivityRecord,
        pass_hint="pass sensitivities=[...] (records or paths), or sens=None for the plain method",
        missing_hint=f"{need} needs it. Train the expert with SensitivityCallback or run compute_sensitivity(...) on "
                     "it, pass sensitivities=[...], or use sens=None for the plain method",
    )
    for kind in needs:
        for name, record in zip(experts, records):
            if not statistic_available(record, kind):
                raise MergeError(
                    f"method {config.method!r} (trim_by={config.trim_by!r}) needs the captured statistic {kind!r}, "
                    f"and expert {name!r}'s sensitivity record has none: record it with "
                    f"SensitivityConfig({_KIND_SOURCE.get(kind, (kind, kind + '=True'))[1]}), or pick another method"
                )
    return records


def load_probes(probes, folders: list[Optional[Path]], experts: list[str], vocab_size: Optional[int],
                purpose: Optional[str] = None) -> list:
    """The experts' probe sets (for the cross-task factor, or for ``purpose``: a method that fits on them)."""
    from ..store import PROBE_FILE, ProbeSet, load_probe

    if purpose is None:
        pass_hint = "pass probes=[...] or transferability=<K×K tensor>, or use sens='task' / sens=None"
        missing_hint = ("the cross-task factor (sens includes 'cross') needs each expert's probe set. Pass "
                        "probes=[...] or transferability=<K×K tensor>, or use sens='task'")
    else:
        pass_hint = f"pass probes=[...] (ProbeSet objects or probe.safetensors paths): {purpose}"
        missing_hint = (f"{purpose}. Train the expert with SensitivityCallback (store_probe=True, the default) or run "
                        "compute_sensitivity(...) on it, pass probes=[...], or pick a method that needs no probes")
    loaded = _load_sidecars(
        probes, folders, experts, kind="probes", filename=PROBE_FILE,
        load=lambda item: load_probe(item, vocab_size=vocab_size), passthrough=ProbeSet,
        pass_hint=pass_hint, missing_hint=missing_hint,
    )
    for k, (name, probe) in enumerate(zip(experts, loaded)):
        check_probe(probe, f"expert {name!r}", record_source(probes, folders, k, PROBE_FILE), vocab_size)
    return loaded


def check_transfer(transfer, k: int) -> torch.Tensor:
    """``transfer`` as a checked fp32 K×K matrix."""
    transfer = torch.as_tensor(transfer, dtype=torch.float32)
    if tuple(transfer.shape) != (k, k):
        raise MergeError(f"transferability must be a {k}×{k} matrix, got shape {list(transfer.shape)}")
    if not torch.isfinite(transfer).all():
        raise MergeError("transferability contains NaN or Inf")
    return transfer


def coefficient_table(config: MergeConfig, records, transfer, experts: list[str]):
    """The coefficient table of the merge (the settings come from ``config``)."""
    from ..coefficients import compute_coefficients

    if config.weights is not None and len(config.weights) != len(experts):
        raise MergeError(f"weights has {len(config.weights)} entries for {len(experts)} experts {experts}")
    if config.densities is not None and len(config.densities) != len(experts):
        raise MergeError(f"densities has {len(config.densities)} entries for {len(experts)} experts {experts}")
    for key in ("weight", "density"):
        per_expert = (config.tensor_settings or {}).get(key)
        if per_expert is not None and len(per_expert) != len(experts):
            raise MergeError(f"tensor_settings.{key} has {len(per_expert)} entries for {len(experts)} experts "
                             f"{experts}")
    need_task, need_cross = sens_parts(config)
    table = compute_coefficients(records if need_task else None, transfer if need_cross else None,
                                 expert_names=experts, config=config)
    try:
        logger.info("merge coefficients (%s, sens=%s): %s", config.method, config.sens, table.summary())
        logger.debug("coefficient table:\n%s", table)
    except Exception:  # a summary is a nicety; never fail a merge on it
        pass
    return table


def record_source(sensitivities, folders: list[Optional[Path]], k: int, filename: Optional[str] = None) -> str:
    """Where expert k's sensitivity record (or probe set, with ``filename``) came from (for error messages)."""
    from ..store import SENSITIVITY_FILE

    kind = "probes" if filename else "sensitivities"
    if sensitivities is not None:
        item = list(sensitivities)[k]
        return str(item) if isinstance(item, (str, os.PathLike)) else f"{kind}[{k}] (a {type(item).__name__} object)"
    folder = folders[k]
    return str(folder / (filename or SENSITIVITY_FILE)) if folder is not None else f"{kind}[{k}]"


def plan_merge(cfg: MergeConfig, experts: list[str], folders: list[Optional[Path]], *, sensitivities=None,
               probes_usable: bool = False, transferability=None,
               compute_transfer: Optional[Callable[[], torch.Tensor]] = None,
               check_record: Optional[Callable[[int, str, Any, str], None]] = None,
               step: Callable[[], Any] = contextlib.nullcontext) -> MergePlan:
    """Resolve the settings, load and check the sidecars, compute the coefficients: the frozen plan of a merge.

    Args:
        cfg: The configuration as given. experts: Expert names. folders: Their folders (None: given by name).
        sensitivities: Explicit records or paths (default: each folder's sidecar, when needed).
        probes_usable: Every expert has a probe set the merge can fit on (for ``method=None``).
        transferability: Explicit K×K matrix. compute_transfer: Computes it when ``sens`` needs the cross factor
            and none was given (called outside ``step``: a distributed merge runs it on one rank).
        check_record: ``check_record(k, name, record, source)`` validates a record against the model.
        step: Context manager wrapped around each local phase (a distributed merge's error exchange).
    """
    with step():
        cfg = resolve_settings(cfg, sensitivities, folders, probes_usable)
        needs = get_method(cfg.method).needed_statistics(cfg.method_params())
        records = load_records(sensitivities, folders, experts, cfg, needs)
        if records is not None and check_record is not None:
            for k, (name, record) in enumerate(zip(experts, records)):
                check_record(k, name, record, record_source(sensitivities, folders, k))
        transfer = None if transferability is None else check_transfer(transferability, len(experts))
    if transfer is None and sens_parts(cfg)[1]:
        if compute_transfer is None:
            raise MergeError("sens includes 'cross' but no transferability matrix or probes are available")
        transfer = compute_transfer()
    with step():
        table = coefficient_table(cfg, records, transfer, experts)
    return MergePlan(cfg, list(experts), list(folders), records, transfer, table, tuple(needs))


def write_extra_files(folder: Path, files: Optional[dict[str, str]]) -> None:
    """Write caller-provided text files (e.g. the CLI's recipe copy) inside the atomic output folder."""
    for rel, text in (files or {}).items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise MergeError(f"extra file name {rel!r} must be a plain relative path inside the output folder")
        (folder / rel).write_text(text)


def device_of(config: MergeConfig) -> torch.device:
    """The math device: ``config.device``, else CUDA when available, else the CPU."""
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of the process so far, in MB (None where unknown)."""
    import resource
    import sys

    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):  # pragma: no cover
        return None
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def progress_bar(iterable, total: int, desc: str, progress: Optional[bool]):
    """A tqdm bar over ``iterable`` (shown by default when stderr is a terminal)."""
    import sys

    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)


def dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    """The torch dtype named ``name`` (``"bfloat16"``, ``"torch.float16"``...), or None."""
    if name is None:
        return None
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise MergeError(f"dtype={name!r} is not a torch dtype (e.g. 'bfloat16', 'float16', 'float32')")
    return check_output_dtype(value, name)


def records_wanted(cfg: MergeConfig, sources: Sequence[PathLike]) -> bool:
    """Whether a merge with ``cfg`` of experts whose sidecars are ``sources`` reads their sensitivity records (for
    the coefficients, or for the statistics the method needs once its settings are resolved)."""
    resolved = resolve_settings(cfg, list(sources), [])
    return sens_parts(resolved)[0] or bool(get_method(resolved.method).needed_statistics(resolved.method_params()))
